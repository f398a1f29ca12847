//! Stage two: the validated job spec the rest of distill uses.
//!
//! Every default is filled in and every invariant checked, so code holding a
//! [`JobSpec`] never re-validates. Serialising a `JobSpec` (to JSON for the
//! wire, say) yields the same structure as the job file, with every default
//! written out; parsing that output gives back an equal spec.

use serde::{Serialize, Serializer};

/// A validated distillation job.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub task: Task,
    pub teacher: Teacher,
    pub data: Data,
    pub student: Student,
    pub distill: Distill,
    pub training: Training,
    pub quantization: Quantization,
    pub evaluation: Evaluation,
    pub cluster: Cluster,
}

impl JobSpec {
    /// Whether the training task fine-tunes the teacher itself (an online
    /// teacher signal): its holder then trains alone, with no group. With
    /// an offline signal the teacher is fine-tuned in a stage of its own,
    /// before labelling, and training is data-parallel as usual.
    pub fn fine_tunes_in_training(&self) -> bool {
        self.teacher.fine_tune && self.distill.teacher_signal == TeacherSignal::Online
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Task {
    TextClassification,
    TextPairClassification,
    SentenceEmbedding,
}

impl Task {
    pub const NAMES: &'static [&'static str] = &[
        "text_classification",
        "text_pair_classification",
        "sentence_embedding",
    ];

    /// Whether the task predicts class labels (and so has a label field).
    pub fn is_classification(self) -> bool {
        !matches!(self, Task::SentenceEmbedding)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Teacher {
    /// A Hugging Face model directory or an object-store URI.
    pub path: String,
    pub fine_tune: bool,
    /// Epochs of teacher fine-tuning (its own budget, independent of
    /// `[training]`); the best dev checkpoint is kept. Ignored unless
    /// `fine_tune`.
    pub epochs: u32,
    /// Peak learning rate of teacher fine-tuning (`None`: training.learning_rate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Data {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub train: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unlabelled: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test: Option<String>,
    pub text_field: String,
    /// Set exactly when the task is `text_pair_classification`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text_pair_field: Option<String>,
    pub label_field: String,
    /// Label names in class-index order; `None` means "read them from the data".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub labels: Option<Vec<String>>,
    pub max_length: u32,
    /// Samples per teacher-signal shard (one task each).
    pub shard_size: u64,
    /// Samples in train + unlabelled, when the user states it; otherwise the
    /// coordinator counts the examples of those files at planning, with the
    /// reader the worker uses (`distill-data`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub num_samples: Option<u64>,
    /// What a bad example (invalid UTF-8, malformed JSON, a missing field)
    /// does: stop the job naming file and line, or skip it and count it.
    pub on_bad_example: BadExample,
    /// Pseudo-label data augmentation: new unlabelled training examples
    /// made from the training texts, labelled by the teacher.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub augment: Option<Augment>,
}

impl Data {
    /// Examples in the global training order for `n` read from
    /// train + unlabelled: those, then `factor` augmented copies of each.
    pub fn with_augmented(&self, n: u64) -> u64 {
        n * (1 + self.augment.as_ref().map_or(0, |a| a.factor as u64))
    }
}

/// `[data.augment]`: how augmented examples are made. Each is a pure
/// function of the source example's tokens, the copy number and the seed,
/// so the same job makes the same examples (and the same teacher-signal
/// shards) on every machine.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Augment {
    pub method: AugmentMethod,
    /// Augmented copies per training example.
    pub factor: u32,
    /// Chance that each token is changed.
    pub probability: f64,
    /// `neighbours`, `mlm`: a replacement is drawn from this many nearest
    /// (or most likely) words.
    pub neighbours: u32,
    /// `None`: the job's `training.seed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Keep an augmented example only when the teacher's top class
    /// probability reaches this (classification); `None`: keep all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_confidence: Option<f64>,
    /// `None`: the kept copies follow the training texts in the epoch order
    /// (a batch holds texts and copies alike, and an epoch counts both).
    /// `Some(k)`: every micro-batch holds `training.batch_size` training
    /// texts in their own order plus `k` copies drawn in theirs, so the
    /// student sees the texts as often as without augmentation, at the
    /// same number of steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub per_batch: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AugmentMethod {
    /// TinyBERT-style word replacement: a whole-word token is replaced by
    /// one of its nearest neighbours (cosine) in the teacher's
    /// input-embedding table.
    Neighbours,
    /// TinyBERT-style word replacement by the teacher's masked-LM head: the
    /// chosen whole words are masked and each is replaced by one of the
    /// `neighbours` whole words the head predicts most likely there (not
    /// the word itself). Needs a checkpoint with `cls.predictions.*`.
    Mlm,
    /// A token becomes `[MASK]`.
    Mask,
    /// A token is deleted.
    Delete,
    /// A token swaps places with the next one of its segment.
    Swap,
}

/// The policy for bad examples in the data files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BadExample {
    /// The first bad example fails the job, naming file, line and reason.
    Fail,
    /// Bad examples are skipped; each is counted and listed in the report.
    Skip,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Student {
    #[serde(flatten)]
    pub size: StudentSize,
    pub init: StudentInit,
    /// Teacher layer index each student layer is initialised from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub layer_map: Option<Vec<u32>>,
}

/// How big the student is. A preset resolves to `Explicit`; a compression
/// ratio is resolved against the teacher's config at plan time.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum StudentSize {
    Explicit(StudentArch),
    Ratio { compression_ratio: f64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StudentArch {
    pub layers: u32,
    pub hidden_size: u32,
    pub num_heads: u32,
    pub intermediate_size: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StudentInit {
    Teacher,
    Random,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Distill {
    pub task: Weight,
    pub kd: Weight,
    pub attention: Weight,
    pub hidden: Weight,
    pub embedding: Weight,
    pub temperature: Temperature,
    pub layer_map: LayerMap,
    pub teacher_signal: TeacherSignal,
}

/// A loss-term weight: fixed, or adapted during training.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Weight {
    Auto,
    Fixed(f64),
}

impl Serialize for Weight {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Weight::Auto => s.serialize_str("auto"),
            Weight::Fixed(w) => s.serialize_f64(*w),
        }
    }
}

/// Distillation temperature, decayed from `start` to `end` over training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Temperature {
    pub start: f64,
    pub end: f64,
}

/// Which teacher layer supervises each student layer.
#[derive(Debug, Clone, PartialEq)]
pub enum LayerMap {
    /// Evenly spaced teacher layers.
    Uniform,
    /// The teacher's last layers.
    Last,
    /// Teacher layer index per student layer.
    Explicit(Vec<u32>),
}

impl Serialize for LayerMap {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            LayerMap::Uniform => s.serialize_str("uniform"),
            LayerMap::Last => s.serialize_str("last"),
            LayerMap::Explicit(v) => v.serialize(s),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TeacherSignal {
    /// Teacher runs beside the student during training.
    Online,
    /// Teacher signal is computed once, sharded, and stored.
    Offline,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Training {
    #[serde(flatten)]
    pub length: TrainingLength,
    pub batch_size: u32,
    pub optimizer: Optimizer,
    pub learning_rate: f64,
    pub warmup_ratio: f64,
    /// Learning-rate decay after warmup.
    pub lr_schedule: LrSchedule,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables clipping.
    pub grad_clip: f64,
    pub grad_accum: u32,
    pub precision: Precision,
    pub checkpoint_every: u64,
    pub eval_every: u64,
    pub seed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrainingLength {
    Epochs(u32),
    Steps(u64),
}

/// The optimiser; AdamW (decoupled weight decay) is the one built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    Adamw,
}

/// Learning rate after the linear warmup: down to 0 at the last step,
/// linearly or along a half cosine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Linear,
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    Bf16,
    Fp16,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quantization {
    pub formats: QuantFormats,
    pub hardware: Hardware,
    /// Largest allowed drop in the task metric versus the FP32 student (0..1).
    pub max_accuracy_drop: f64,
    /// Input columns per scale/zero pair in `int4` (32, 64, 128 or 256).
    pub group_size: u32,
    /// Keep every variant that passes the quality gate, not only the fastest.
    pub keep_all: bool,
}

impl Quantization {
    /// The candidate formats: the list given, or for `"auto"` the table
    /// per hardware target (documented in the job-spec guide):
    /// CPU → int8_dynamic, int8_weight_only, int4, bf16;
    /// NVIDIA GPU → fp16, bf16, int8_weight_only, int4.
    pub fn formats_for_target(&self) -> Vec<QuantFormat> {
        use QuantFormat::*;
        match (&self.formats, self.hardware) {
            (QuantFormats::List(v), _) => v.clone(),
            (QuantFormats::Auto, Hardware::Cpu) => vec![Int8Dynamic, Int8WeightOnly, Int4, Bf16],
            (QuantFormats::Auto, Hardware::NvidiaGpu) => vec![Fp16, Bf16, Int8WeightOnly, Int4],
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum QuantFormats {
    /// Chosen for the hardware target.
    Auto,
    List(Vec<QuantFormat>),
}

impl Serialize for QuantFormats {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            QuantFormats::Auto => s.serialize_str("auto"),
            QuantFormats::List(v) => v.serialize(s),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QuantFormat {
    Fp16,
    Bf16,
    /// The target's INT8: dynamic on a CPU, weight-only on a GPU.
    Int8,
    /// Per-channel int8 weights, activations quantized per batch (FBGEMM,
    /// x86 CPUs only).
    Int8Dynamic,
    /// Per-channel int8 weights, bf16 activations.
    Int8WeightOnly,
    /// Grouped 4-bit weights (`group_size`), bf16 activations.
    Int4,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hardware {
    Cpu,
    /// `"nvidia_gpu"` (`"gpu"` is accepted as the same).
    NvidiaGpu,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evaluation {
    /// Batch sizes latency is measured at (p50/p95).
    pub latency_batch_sizes: Vec<u32>,
    pub latency_iters: u32,
    /// Also train the same student on the labels alone, with the same
    /// step budget, and report it beside the distilled one
    /// (classification only; `distill run --baseline` sets it).
    pub baseline: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Cluster {
    pub min_workers: u32,
    pub max_workers: u32,
    pub devices_per_worker: u32,
    pub device: Device,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Device {
    Cpu,
    Cuda,
}
