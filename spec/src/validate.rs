//! From [`RawSpec`] to [`JobSpec`]: defaults, requirements and ranges.
//!
//! Validation collects every problem (not just the first), each naming its
//! field path (`training.batch_size`, `student.layer_map[2]`); the caller adds
//! line numbers for TOML input.

use crate::raw::*;
use crate::types::*;
use crate::FieldError;

/// Collects problems while converting, so one pass reports all of them.
#[derive(Default)]
struct Check {
    errors: Vec<FieldError>,
}

impl Check {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            line: None,
            message: message.into(),
        });
    }

    /// An integer in `min..=max`, or `default` when absent.
    fn int<T: TryFrom<i64> + Copy>(
        &mut self,
        field: &str,
        v: Option<i64>,
        default: T,
        min: i64,
        max: i64,
    ) -> T {
        match v {
            None => default,
            Some(x) if x < min || x > max => {
                if min == 1 && x < 1 {
                    self.err(field, format!("must be a positive integer, got {x}"));
                } else if min == 0 && x < 0 {
                    self.err(field, format!("must not be negative, got {x}"));
                } else {
                    self.err(field, format!("must be between {min} and {max}, got {x}"));
                }
                default
            }
            Some(x) => T::try_from(x).ok().unwrap_or(default),
        }
    }

    /// A finite float checked by `ok`, or `default` when absent.
    fn float(
        &mut self,
        field: &str,
        v: Option<f64>,
        default: f64,
        ok: impl Fn(f64) -> bool,
        want: &str,
    ) -> f64 {
        match v {
            None => default,
            Some(x) if !x.is_finite() || !ok(x) => {
                self.err(field, format!("must be {want}, got {x}"));
                default
            }
            Some(x) => x,
        }
    }

    /// One of `choices` (snake_case words), or `default` when absent.
    fn word<T: Copy>(
        &mut self,
        field: &str,
        v: Option<&str>,
        default: T,
        choices: &[(&str, T)],
    ) -> T {
        let Some(v) = v else { return default };
        match choices.iter().find(|(name, _)| *name == v) {
            Some((_, t)) => *t,
            None => {
                let names: Vec<_> = choices.iter().map(|(n, _)| format!("\"{n}\"")).collect();
                self.err(
                    field,
                    format!(
                        "unknown value \"{v}\", expected one of {}",
                        names.join(", ")
                    ),
                );
                default
            }
        }
    }

    fn non_empty(&mut self, field: &str, v: Option<String>) -> Option<String> {
        match v {
            Some(s) if s.trim().is_empty() => {
                self.err(field, "must not be empty");
                None
            }
            other => other,
        }
    }
}

pub(crate) fn validate(raw: RawSpec) -> Result<JobSpec, Vec<FieldError>> {
    let mut c = Check::default();

    let task = match raw.task.as_deref() {
        None => {
            c.err(
                "task",
                format!("missing; expected one of {}", quoted(Task::NAMES)),
            );
            Task::TextClassification
        }
        Some(t) => c.word(
            "task",
            Some(t),
            Task::TextClassification,
            &[
                ("text_classification", Task::TextClassification),
                ("text_pair_classification", Task::TextPairClassification),
                ("sentence_embedding", Task::SentenceEmbedding),
            ],
        ),
    };

    let teacher = match raw.teacher {
        None => {
            c.err("teacher", "missing section [teacher]; set teacher.path to a model directory or object-store uri");
            Teacher {
                path: String::new(),
                fine_tune: false,
                epochs: 2,
                learning_rate: None,
            }
        }
        Some(t) => {
            let path = match c.non_empty("teacher.path", t.path) {
                Some(p) => p,
                None => {
                    if !c.errors.iter().any(|e| e.field == "teacher.path") {
                        c.err(
                            "teacher.path",
                            "missing; set it to a model directory or object-store uri",
                        );
                    }
                    String::new()
                }
            };
            let epochs = c.int("teacher.epochs", t.epochs, 2u32, 1, 1000);
            let learning_rate = t.learning_rate.map(|lr| {
                c.float(
                    "teacher.learning_rate",
                    Some(lr),
                    5e-5,
                    |x| x > 0.0 && x < 1.0,
                    "in (0, 1)",
                )
            });
            Teacher {
                path,
                fine_tune: t.fine_tune.unwrap_or(false),
                epochs,
                learning_rate,
            }
        }
    };

    if let Some(name) = &raw.name {
        if !safe_name(name) {
            c.err(
                "name",
                format!("{name:?} is not a safe job name: use 1 to 64 letters, digits, '-', '_' or '.', starting with a letter or digit (it names the output directory)"),
            );
        }
    }
    let data = data(&mut c, task, raw.data.unwrap_or_default());
    let student = student(&mut c, raw.student.unwrap_or_default());
    let distill = distill(&mut c, task, &student, raw.distill.unwrap_or_default());
    let training = training(&mut c, raw.training.unwrap_or_default());
    let quantization = quantization(&mut c, raw.quantization.unwrap_or_default());
    let evaluation = evaluation(&mut c, raw.evaluation.unwrap_or_default());
    let cluster = cluster(&mut c, raw.cluster.unwrap_or_default());

    if c.errors.is_empty() {
        Ok(JobSpec {
            name: raw.name,
            task,
            teacher,
            data,
            student,
            distill,
            training,
            quantization,
            evaluation,
            cluster,
        })
    } else {
        Err(c.errors)
    }
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("\"{n}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

fn data(c: &mut Check, task: Task, d: RawData) -> Data {
    let train = c.non_empty("data.train", d.train);
    let unlabelled = c.non_empty("data.unlabelled", d.unlabelled);
    if train.is_none()
        && unlabelled.is_none()
        && !c.errors.iter().any(|e| e.field.starts_with("data."))
    {
        c.err(
            "data.train",
            "missing; give data.train (labelled) or data.unlabelled (or both)",
        );
    }
    let text_pair_field = match (task, d.text_pair_field) {
        (Task::TextPairClassification, f) => Some(f.unwrap_or_else(|| "text_pair".to_string())),
        (_, Some(_)) => {
            c.err(
                "data.text_pair_field",
                "only allowed when task = \"text_pair_classification\"",
            );
            None
        }
        (_, None) => None,
    };
    if let Some(labels) = &d.labels {
        if !task.is_classification() {
            c.err("data.labels", "only allowed for classification tasks");
        } else if labels.len() < 2 {
            c.err(
                "data.labels",
                format!("needs at least 2 labels, got {}", labels.len()),
            );
        }
        for (i, l) in labels.iter().enumerate() {
            if labels[..i].contains(l) {
                c.err(
                    format!("data.labels[{i}]"),
                    format!("duplicate label \"{l}\""),
                );
            }
        }
    }
    Data {
        train,
        unlabelled,
        eval: c.non_empty("data.eval", d.eval),
        test: c.non_empty("data.test", d.test),
        text_field: c
            .non_empty("data.text_field", d.text_field)
            .unwrap_or_else(|| "text".into()),
        text_pair_field,
        label_field: c
            .non_empty("data.label_field", d.label_field)
            .unwrap_or_else(|| "label".into()),
        labels: d.labels,
        max_length: c.int("data.max_length", d.max_length, 128, 1, 8192),
        shard_size: c.int("data.shard_size", d.shard_size, 1024, 1, 100_000_000),
        num_samples: d
            .num_samples
            .map(|n| c.int("data.num_samples", Some(n), 1, 1, i64::MAX)),
        on_bad_example: c.word(
            "data.on_bad_example",
            d.on_bad_example.as_deref(),
            BadExample::Fail,
            &[("fail", BadExample::Fail), ("skip", BadExample::Skip)],
        ),
        augment: d.augment.map(|a| augment(c, task, a)),
    }
}

fn augment(c: &mut Check, task: Task, a: RawAugment) -> Augment {
    use AugmentMethod as M;
    let method = match a.method.as_deref() {
        None => {
            c.err(
                "data.augment.method",
                "missing; expected one of \"neighbours\", \"mlm\", \"mask\", \"delete\", \"swap\"",
            );
            M::Mask
        }
        m => c.word(
            "data.augment.method",
            m,
            M::Mask,
            &[
                ("neighbours", M::Neighbours),
                ("mlm", M::Mlm),
                ("mask", M::Mask),
                ("delete", M::Delete),
                ("swap", M::Swap),
            ],
        ),
    };
    let min_confidence = a.min_confidence.map(|x| {
        c.float(
            "data.augment.min_confidence",
            Some(x),
            0.0,
            |x| (0.0..1.0).contains(&x),
            "in [0, 1)",
        )
    });
    if min_confidence.is_some() && !task.is_classification() {
        c.err(
            "data.augment.min_confidence",
            "only for classification tasks (it filters on the teacher's class probabilities)",
        );
    }
    Augment {
        method,
        factor: c.int("data.augment.factor", a.factor, 1, 1, 100),
        probability: c.float(
            "data.augment.probability",
            a.probability,
            0.15,
            |x| x > 0.0 && x <= 1.0,
            "in (0, 1]",
        ),
        neighbours: c.int("data.augment.neighbours", a.neighbours, 8, 1, 1000),
        seed: a
            .seed
            .map(|s| c.int("data.augment.seed", Some(s), 0u64, 0, i64::MAX)),
        min_confidence,
        per_batch: a
            .per_batch
            .map(|k| c.int("data.augment.per_batch", Some(k), 1u32, 1, 4096)),
    }
}

/// A job name that is safe as one path component: 1–64 ASCII letters,
/// digits, `-`, `_`, `.`, starting with a letter or digit (so never `..`,
/// never a separator).
pub fn safe_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// Parses a preset name `L<layers>-H<hidden>` (e.g. `L4-H312`).
pub fn parse_preset(name: &str) -> Option<(u32, u32)> {
    let (l, h) = name.split_once('-')?;
    let layers = l.strip_prefix('L')?.parse().ok()?;
    let hidden = h.strip_prefix('H')?.parse().ok()?;
    (layers > 0 && hidden > 0).then_some((layers, hidden))
}

/// Default head count for a hidden size: 12 heads when it divides (TinyBERT
/// L4-H312, MiniLM L3/L6-H384), else 64-wide heads.
pub fn default_heads(hidden: u32) -> Option<u32> {
    [12, hidden / 64]
        .into_iter()
        .find(|&h| h > 0 && hidden % h == 0)
}

fn student(c: &mut Check, s: RawStudent) -> Student {
    let explicit = s.layers.is_some()
        || s.hidden_size.is_some()
        || s.num_heads.is_some()
        || s.intermediate_size.is_some();
    let given = [s.preset.is_some(), explicit, s.compression_ratio.is_some()];
    let fallback = StudentSize::Ratio {
        compression_ratio: 0.5,
    };
    let size = if given.iter().filter(|g| **g).count() > 1 {
        c.err(
            "student",
            "give exactly one of preset, explicit layers/hidden_size, or compression_ratio",
        );
        fallback
    } else if let Some(p) = &s.preset {
        match parse_preset(p).and_then(|(l, h)| Some((l, h, default_heads(h)?))) {
            Some((layers, hidden, heads)) => StudentSize::Explicit(StudentArch {
                layers,
                hidden_size: hidden,
                num_heads: heads,
                intermediate_size: 4 * hidden,
            }),
            None => {
                c.err(
                    "student.preset",
                    format!("\"{p}\" is not of the form L<layers>-H<hidden>, e.g. \"L4-H312\""),
                );
                fallback
            }
        }
    } else if explicit {
        let (Some(_), Some(_)) = (s.layers, s.hidden_size) else {
            let missing = if s.layers.is_none() {
                "student.layers"
            } else {
                "student.hidden_size"
            };
            c.err(
                missing,
                "missing; an explicit student needs both layers and hidden_size",
            );
            return Student {
                size: fallback,
                init: StudentInit::Teacher,
                layer_map: None,
            };
        };
        let layers = c.int("student.layers", s.layers, 1, 1, 1024);
        let hidden = c.int("student.hidden_size", s.hidden_size, 1, 1, 65536);
        let heads = match s.num_heads {
            Some(_) => c.int("student.num_heads", s.num_heads, 1, 1, 1024),
            None => default_heads(hidden).unwrap_or(1),
        };
        if hidden % heads != 0 {
            c.err(
                "student.num_heads",
                format!("hidden_size {hidden} is not divisible by num_heads {heads}"),
            );
        }
        let intermediate = c.int(
            "student.intermediate_size",
            s.intermediate_size,
            4 * hidden,
            1,
            1 << 20,
        );
        StudentSize::Explicit(StudentArch {
            layers,
            hidden_size: hidden,
            num_heads: heads,
            intermediate_size: intermediate,
        })
    } else {
        let r = c.float(
            "student.compression_ratio",
            s.compression_ratio,
            0.5,
            |r| r > 0.0 && r < 1.0,
            "in (0, 1)",
        );
        StudentSize::Ratio {
            compression_ratio: r,
        }
    };
    let init = c.word(
        "student.init",
        s.init.as_deref(),
        StudentInit::Teacher,
        &[
            ("teacher", StudentInit::Teacher),
            ("random", StudentInit::Random),
        ],
    );
    let layer_map = s
        .layer_map
        .map(|m| layer_indices(c, "student.layer_map", &m, &size));
    Student {
        size,
        init,
        layer_map,
    }
}

/// Checks a list of teacher layer indices against the student's depth.
fn layer_indices(c: &mut Check, field: &str, m: &[i64], size: &StudentSize) -> Vec<u32> {
    if let StudentSize::Explicit(a) = size {
        if m.len() != a.layers as usize {
            c.err(
                field,
                format!(
                    "has {} entries but the student has {} layers",
                    m.len(),
                    a.layers
                ),
            );
        }
    }
    m.iter()
        .enumerate()
        .map(|(i, &x)| c.int(&format!("{field}[{i}]"), Some(x), 0, 0, 1023))
        .collect()
}

fn weight(c: &mut Check, field: &str, v: Option<NumberOrWord>) -> Weight {
    match v {
        None => Weight::Auto,
        Some(NumberOrWord::Word(w)) if w == "auto" => Weight::Auto,
        Some(NumberOrWord::Word(w)) => {
            c.err(field, format!("expected a number or \"auto\", got \"{w}\""));
            Weight::Auto
        }
        Some(NumberOrWord::Number(x)) => {
            Weight::Fixed(c.float(field, Some(x), 0.0, |x| x >= 0.0, "a non-negative number"))
        }
    }
}

fn distill(c: &mut Check, task: Task, student: &Student, d: RawDistill) -> Distill {
    let w = |c: &mut Check, name: &str, v| weight(c, &format!("distill.{name}"), v);
    let out = Distill {
        task: w(c, "task", d.task),
        kd: w(c, "kd", d.kd),
        attention: w(c, "attention", d.attention),
        hidden: w(c, "hidden", d.hidden),
        embedding: w(c, "embedding", d.embedding),
        temperature: {
            let t = d.temperature.unwrap_or_default();
            let start = c.float(
                "distill.temperature.start",
                t.start,
                4.0,
                |x| x > 0.0,
                "a positive number",
            );
            let end = c.float(
                "distill.temperature.end",
                t.end,
                1.0,
                |x| x > 0.0,
                "a positive number",
            );
            Temperature { start, end }
        },
        layer_map: match d.layer_map {
            None => LayerMap::Uniform,
            Some(WordOrList::Word(w)) if w == "uniform" => LayerMap::Uniform,
            Some(WordOrList::Word(w)) if w == "last" => LayerMap::Last,
            Some(WordOrList::Word(w)) => {
                c.err(
                    "distill.layer_map",
                    format!(
                        "expected \"uniform\", \"last\" or a list of teacher layers, got \"{w}\""
                    ),
                );
                LayerMap::Uniform
            }
            Some(WordOrList::List(m)) => {
                LayerMap::Explicit(layer_indices(c, "distill.layer_map", &m, &student.size))
            }
        },
        teacher_signal: c.word(
            "distill.teacher_signal",
            d.teacher_signal.as_deref(),
            TeacherSignal::Offline,
            &[
                ("online", TeacherSignal::Online),
                ("offline", TeacherSignal::Offline),
            ],
        ),
    };
    let all = [out.task, out.kd, out.attention, out.hidden, out.embedding];
    if all.iter().all(|w| *w == Weight::Fixed(0.0)) {
        c.err(
            "distill",
            "every loss weight is 0; at least one must be positive or \"auto\"",
        );
    }
    if out.teacher_signal == TeacherSignal::Offline {
        for (name, w) in [("attention", out.attention), ("hidden", out.hidden)] {
            if matches!(w, Weight::Fixed(x) if x > 0.0) {
                c.err(
                    format!("distill.{name}"),
                    "needs the teacher online (intermediate layers are not stored); set teacher_signal = \"online\" or this weight to 0",
                );
            }
        }
    }
    if task == Task::SentenceEmbedding && matches!(out.task, Weight::Fixed(x) if x > 0.0) {
        c.err(
            "distill.task",
            "sentence_embedding has no labelled task loss; use distill.embedding",
        );
    }
    out
}

fn training(c: &mut Check, t: RawTraining) -> Training {
    let length = match (t.epochs, t.steps) {
        (Some(_), Some(_)) => {
            c.err(
                "training",
                "give training.epochs or training.steps, not both",
            );
            TrainingLength::Epochs(3)
        }
        (None, Some(_)) => TrainingLength::Steps(c.int("training.steps", t.steps, 1, 1, i64::MAX)),
        (e, None) => TrainingLength::Epochs(c.int("training.epochs", e, 3, 1, 10_000)),
    };
    Training {
        length,
        batch_size: c.int("training.batch_size", t.batch_size, 32, 1, 1 << 20),
        optimizer: c.word(
            "training.optimizer",
            t.optimizer.as_deref(),
            Optimizer::Adamw,
            &[("adamw", Optimizer::Adamw)],
        ),
        learning_rate: c.float(
            "training.learning_rate",
            t.learning_rate,
            5e-5,
            |x| x > 0.0,
            "a positive number",
        ),
        warmup_ratio: c.float(
            "training.warmup_ratio",
            t.warmup_ratio,
            0.1,
            |x| (0.0..1.0).contains(&x),
            "in [0, 1)",
        ),
        lr_schedule: c.word(
            "training.lr_schedule",
            t.lr_schedule.as_deref(),
            LrSchedule::Linear,
            &[
                ("linear", LrSchedule::Linear),
                ("cosine", LrSchedule::Cosine),
            ],
        ),
        weight_decay: c.float(
            "training.weight_decay",
            t.weight_decay,
            0.01,
            |x| x >= 0.0,
            "a non-negative number",
        ),
        grad_clip: c.float(
            "training.grad_clip",
            t.grad_clip,
            1.0,
            |x| x >= 0.0,
            "a non-negative number (0 disables)",
        ),
        grad_accum: c.int("training.grad_accum", t.grad_accum, 1, 1, 1 << 16),
        precision: c.word(
            "training.precision",
            t.precision.as_deref(),
            Precision::Fp32,
            &[
                ("fp32", Precision::Fp32),
                ("bf16", Precision::Bf16),
                ("fp16", Precision::Fp16),
            ],
        ),
        checkpoint_every: c.int(
            "training.checkpoint_every",
            t.checkpoint_every,
            500,
            1,
            i64::MAX,
        ),
        eval_every: c.int("training.eval_every", t.eval_every, 500, 1, i64::MAX),
        seed: c.int("training.seed", t.seed, 42, 0, i64::MAX),
    }
}

fn quantization(c: &mut Check, q: RawQuantization) -> Quantization {
    let formats = match q.formats {
        None => QuantFormats::Auto,
        Some(WordOrList::Word(w)) if w == "auto" => QuantFormats::Auto,
        Some(WordOrList::Word(w)) => {
            c.err(
                "quantization.formats",
                format!("expected \"auto\" or a list of formats, got \"{w}\""),
            );
            QuantFormats::Auto
        }
        Some(WordOrList::List(v)) => {
            if v.is_empty() {
                c.err(
                    "quantization.formats",
                    "must not be empty; use \"auto\" to let distill choose",
                );
            }
            let choices = [
                ("fp16", QuantFormat::Fp16),
                ("bf16", QuantFormat::Bf16),
                ("int8", QuantFormat::Int8),
                ("int8_dynamic", QuantFormat::Int8Dynamic),
                ("int8_weight_only", QuantFormat::Int8WeightOnly),
                ("int4", QuantFormat::Int4),
            ];
            let list = v.iter().enumerate().map(|(i, f)| {
                c.word(
                    &format!("quantization.formats[{i}]"),
                    Some(f),
                    QuantFormat::Int8,
                    &choices,
                )
            });
            QuantFormats::List(list.collect())
        }
    };
    let hardware = c.word(
        "quantization.hardware",
        q.hardware.as_deref(),
        Hardware::Cpu,
        &[
            ("cpu", Hardware::Cpu),
            ("nvidia_gpu", Hardware::NvidiaGpu),
            ("gpu", Hardware::NvidiaGpu),
        ],
    );
    // A format that has no kernel on the target is refused here, so
    // `distill plan` reports it before any compute is spent.
    if let QuantFormats::List(list) = &formats {
        for (i, f) in list.iter().enumerate() {
            if *f == QuantFormat::Int8Dynamic && hardware == Hardware::NvidiaGpu {
                c.err(
                    &format!("quantization.formats[{i}]"),
                    "\"int8_dynamic\" runs on FBGEMM, an x86 CPU kernel; hardware \"nvidia_gpu\" cannot run it (use \"int8_weight_only\", or \"int8\" for the target's INT8)",
                );
            }
        }
    }
    let group_size = c.int("quantization.group_size", q.group_size, 32u32, 1, 1 << 20);
    if ![32, 64, 128, 256].contains(&group_size) {
        c.err(
            "quantization.group_size",
            format!("{group_size} is not one of 32, 64, 128, 256 (the sizes libtorch's int4 kernels take)"),
        );
    }
    Quantization {
        formats,
        hardware,
        group_size,
        keep_all: q.keep_all.unwrap_or(false),
        max_accuracy_drop: c.float(
            "quantization.max_accuracy_drop",
            q.max_accuracy_drop,
            0.01,
            |x| (0.0..=1.0).contains(&x),
            "in [0, 1]",
        ),
    }
}

fn evaluation(c: &mut Check, e: RawEvaluation) -> Evaluation {
    let sizes = match e.latency_batch_sizes {
        None => vec![1, 32],
        Some(v) => {
            if v.is_empty() {
                c.err("evaluation.latency_batch_sizes", "must not be empty");
            }
            v.iter()
                .enumerate()
                .map(|(i, &b)| {
                    c.int(
                        &format!("evaluation.latency_batch_sizes[{i}]"),
                        Some(b),
                        1,
                        1,
                        1 << 16,
                    )
                })
                .collect()
        }
    };
    Evaluation {
        latency_batch_sizes: sizes,
        latency_iters: c.int(
            "evaluation.latency_iters",
            e.latency_iters,
            50,
            1,
            1_000_000,
        ),
        baseline: e.baseline.unwrap_or(false),
    }
}

fn cluster(c: &mut Check, k: RawCluster) -> Cluster {
    let min = c.int("cluster.min_workers", k.min_workers, 1u32, 1, 100_000);
    let max = c.int("cluster.max_workers", k.max_workers, min, 1, 100_000);
    if max < min {
        c.err(
            "cluster.min_workers",
            format!("min_workers ({min}) is greater than max_workers ({max})"),
        );
    }
    Cluster {
        min_workers: min,
        max_workers: max,
        devices_per_worker: c.int(
            "cluster.devices_per_worker",
            k.devices_per_worker,
            1,
            1,
            1024,
        ),
        device: c.word(
            "cluster.device",
            k.device.as_deref(),
            Device::Cpu,
            &[("cpu", Device::Cpu), ("cuda", Device::Cuda)],
        ),
    }
}
