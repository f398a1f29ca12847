//! The stages of a distillation job, as the worker's tasks run them
//! (`crate::agent::exec`; `distill run` goes through the same tasks on an
//! in-process coordinator): load and check the inputs, fine-tune the
//! teacher if asked, derive and initialise the student, distil (online or
//! offline teacher signal), optionally train a labels-only baseline with
//! the same budget, evaluate on the test split, export the student as a
//! Hugging Face directory and write `report.json`/`report.md`.
//!
//! Every stage checkpoints under the job's directory; running a stage
//! again resumes where it stopped (a finished stage is reused).

use crate::autocast::Reduced;
use crate::data::{read_with, Example, Skipped};
use crate::distill::loss::IGNORE_LABEL;
use crate::distill::schedule::{Decay, TermWeight};
use crate::distill::train::{accuracy, StepLog, TrainConfig, TrainData, Trainer};
use crate::fsutil::write_atomic;
use crate::infer::{infer, InferOptions};
use crate::model::export::export;
use crate::model::student::{
    derive_config, init_from_teacher, last_layer_map, uniform_layer_map, StudentShape,
};
use crate::model::{Task, TaskModel};
use crate::quant::Scheme;
use crate::tokenize::{Encoded, TextTokenizer};
use crate::{Error, Result};
use distill_spec::{JobSpec, LayerMap, LrSchedule, Precision, StudentInit, TrainingLength, Weight};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;
use tch::{Device, Kind, Tensor};

pub use crate::report::{render, ModelReport, Report};
use crate::report::{Bench, Variant, Verdict};

pub(crate) struct Split {
    pub(crate) examples: Vec<Encoded>,
    pub(crate) labels: Vec<i64>,
}

fn read_split(
    path: &str,
    spec: &JobSpec,
    labels: &[String],
    tok: &TextTokenizer,
    require_labels: bool,
) -> Result<(Split, Vec<Skipped>)> {
    // Labels are read only where they mean something (the label set is
    // known or required), as `distill_data::training_examples` does, so the
    // coordinator's count and the worker's examples agree.
    let fields = crate::data::fields(spec, require_labels || !labels.is_empty());
    let p = Path::new(path);
    let read = read_with(p, &fields, spec.data.on_bad_example)?;
    let ex = read.examples;
    let ids = label_ids(&ex, labels, p, require_labels)?;
    let texts: Vec<&str> = ex.iter().map(|e| e.text.as_str()).collect();
    let pairs: Option<Vec<&str>> = fields.text_pair.as_ref().map(|_| {
        ex.iter()
            .map(|e| e.text_pair.as_deref().unwrap_or(""))
            .collect()
    });
    Ok((
        Split {
            examples: tok.encode(&texts, pairs.as_deref())?,
            labels: ids,
        },
        read.skipped,
    ))
}

fn label_ids(ex: &[Example], labels: &[String], path: &Path, require: bool) -> Result<Vec<i64>> {
    ex.iter()
        .map(|e| match &e.label {
            None if require && !labels.is_empty() => Err(Error::Data {
                path: path.to_path_buf(),
                message: format!("line {}: no label", e.line),
            }),
            None => Ok(IGNORE_LABEL),
            Some(_) if labels.is_empty() => Ok(IGNORE_LABEL),
            Some(l) => labels
                .iter()
                .position(|x| x == l)
                .map(|i| i as i64)
                .ok_or_else(|| Error::Data {
                    path: path.to_path_buf(),
                    message: format!(
                        "line {}: label '{l}' is not one of the job's labels {labels:?}",
                        e.line
                    ),
                }),
        })
        .collect()
}

fn weight(w: Weight) -> TermWeight {
    match w {
        Weight::Auto => TermWeight::Auto,
        Weight::Fixed(v) => TermWeight::Fixed(v),
    }
}

/// Optimizer steps of a job over `n_train` training examples.
pub fn total_steps(spec: &JobSpec, n_train: usize) -> u64 {
    let t = &spec.training;
    let per_step = (t.batch_size * t.grad_accum) as u64;
    match t.length {
        TrainingLength::Steps(s) => s,
        TrainingLength::Epochs(e) => (n_train as u64).div_ceil(per_step) * e as u64,
    }
}

fn train_config(spec: &JobSpec, n_train: usize, layer_map: Vec<i64>) -> TrainConfig {
    let t = &spec.training;
    let total = total_steps(spec, n_train);
    let d = &spec.distill;
    TrainConfig {
        total_steps: total,
        batch_size: t.batch_size as usize,
        grad_accum: t.grad_accum as usize,
        learning_rate: t.learning_rate,
        warmup_steps: (t.warmup_ratio * total as f64).round() as u64,
        decay: match t.lr_schedule {
            LrSchedule::Linear => Decay::Linear,
            LrSchedule::Cosine => Decay::Cosine,
        },
        weight_decay: t.weight_decay,
        grad_clip: t.grad_clip,
        seed: t.seed,
        eval_every: t.eval_every,
        checkpoint_every: t.checkpoint_every,
        weights: [
            weight(d.task),
            weight(d.kd),
            weight(d.attention),
            weight(d.hidden),
            weight(d.embedding),
        ],
        temperature: (d.temperature.start, d.temperature.end),
        layer_map,
        max_bad_steps: 3,
        precision: match t.precision {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(Reduced::Bf16),
            // Refused by `check_supported` before any work (needs loss scaling).
            Precision::Fp16 => Some(Reduced::Fp16),
        },
    }
}

/// The rows a job's epochs count: all `n_all` rows of the training order,
/// or under `[data.augment] per_batch` those before the `n_augmented`
/// copies (which then ride along in every batch instead).
pub fn order_rows(spec: &JobSpec, n_all: usize, n_augmented: usize) -> usize {
    match spec.data.augment.as_ref().and_then(|a| a.per_batch) {
        Some(_) => n_all - n_augmented.min(n_all),
        None => n_all,
    }
}

fn log_step(stage: &'static str, total: u64) -> impl FnMut(&StepLog) {
    let mut p = crate::progress::StepProgress::new(stage, total);
    move |l: &StepLog| p.step(l)
}

/// Test metric and throughput of a model.
fn measure(
    model: &TaskModel,
    tok: &TextTokenizer,
    split: &Split,
    teacher_emb: Option<&Tensor>,
) -> Result<(f64, f64)> {
    let t0 = Instant::now();
    let out = infer(
        model,
        tok,
        &split.examples,
        InferOptions::default(),
        |_, _| {},
    )?;
    let eps = split.examples.len() as f64 / t0.elapsed().as_secs_f64();
    let metric = match (model.task, teacher_emb) {
        (Task::Classification, _) => {
            let gold = Tensor::from_slice(&split.labels);
            let c = out
                .argmax(-1, false)
                .eq_tensor(&gold)
                .sum(Kind::Int64)
                .int64_value(&[]);
            c as f64 / split.labels.len() as f64
        }
        (Task::Embedding, Some(t)) => Tensor::cosine_similarity(&out, t, -1, 1e-8)
            .mean(Kind::Float)
            .double_value(&[]),
        (Task::Embedding, None) => 1.0,
    };
    Ok((metric, eps))
}

/// What this build cannot train, refused before any work starts.
pub fn check_supported(spec: &JobSpec) -> Result<()> {
    if spec.training.precision == Precision::Fp16 {
        return Err(Error::Invalid(
            "training.precision: \"fp16\" training needs loss scaling, which distill does not do yet; use \"bf16\" or \"fp32\"".into(),
        ));
    }
    Ok(())
}

/// Hooks a caller gives a long stage: a stop flag checked at step
/// boundaries (training then checkpoints and returns [`Error::Stopped`]),
/// and a progress callback `(stage, step log, total steps)`.
#[derive(Default)]
pub struct Hooks<'a> {
    pub stop: Option<Arc<AtomicBool>>,
    pub progress: Option<&'a mut dyn FnMut(&str, &StepLog, u64)>,
}

impl<'a> Hooks<'a> {
    /// A step logger for `stage` that also reports progress.
    fn on_step<'b>(
        &'b mut self,
        stage: &'static str,
        total: u64,
    ) -> impl FnMut(&StepLog) + use<'a, 'b> {
        let mut log = log_step(stage, total);
        move |l: &StepLog| {
            log(l);
            if let Some(p) = self.progress.as_deref_mut() {
                p(stage, l, total);
            }
        }
    }
}

/// A job's inputs, read and tokenized once: what every stage starts from.
pub struct Prepared {
    pub task: Task,
    pub teacher_dir: PathBuf,
    pub tok: TextTokenizer,
    pub labels: Vec<String>,
    labelled: Option<Split>,
    unlabelled: Option<Split>,
    eval: Option<Split>,
    test: Split,
    /// `[data.augment]`: every training example's augmented copies, in
    /// the global order after train and unlabelled (unlabelled).
    pub augmented: Vec<Encoded>,
    /// Bad examples skipped under `data.on_bad_example = "skip"`.
    pub skipped: Vec<Skipped>,
}

impl Prepared {
    /// The training examples in the job's global order (`data.train`,
    /// `data.unlabelled`, then the augmented copies) with their label ids:
    /// the order teacher-signal shards index.
    pub fn training(&self) -> (Vec<Encoded>, Vec<i64>) {
        let mut examples = vec![];
        let mut ids = vec![];
        for s in [&self.labelled, &self.unlabelled].into_iter().flatten() {
            examples.extend(s.examples.iter().cloned());
            ids.extend(s.labels.iter().copied());
        }
        examples.extend(self.augmented.iter().cloned());
        ids.extend(std::iter::repeat_n(IGNORE_LABEL, self.augmented.len()));
        (examples, ids)
    }

    /// "logits" or "embeddings": what the teacher signal holds.
    pub fn signal_kind(&self) -> &'static str {
        match self.task {
            Task::Classification => "logits",
            Task::Embedding => "embeddings",
        }
    }
}

/// Reads and tokenizes the job's data (checking labels against the job's
/// label set), under the job's bad-example policy.
pub fn prepare(spec: &JobSpec) -> Result<Prepared> {
    check_supported(spec)?;
    let task = if spec.task.is_classification() {
        Task::Classification
    } else {
        Task::Embedding
    };
    let teacher_dir = PathBuf::from(&spec.teacher.path);
    let base_cfg = crate::model::BertConfig::from_dir(&teacher_dir)?;
    let tok = TextTokenizer::load(&teacher_dir, &base_cfg, spec.data.max_length as usize)?;
    let mut skipped = vec![];

    // Labels: the spec's list, else what the training data uses (sorted).
    let labels: Vec<String> = if task == Task::Embedding {
        vec![]
    } else if let Some(l) = &spec.data.labels {
        l.clone()
    } else {
        let path = spec.data.train.as_deref().ok_or_else(|| {
            Error::Invalid("data.train: a classification job needs labelled training data".into())
        })?;
        let read = read_with(
            Path::new(path),
            &crate::data::fields(spec, true),
            spec.data.on_bad_example,
        )?;
        let mut l: Vec<String> = read.examples.into_iter().filter_map(|e| e.label).collect();
        l.sort();
        l.dedup();
        l
    };
    let need_labels = task == Task::Classification;
    let mut split = |p: &str, labels: &[String], require: bool| -> Result<Split> {
        let (s, skip) = read_split(p, spec, labels, &tok, require)?;
        skipped.extend(skip);
        Ok(s)
    };
    let labelled = spec
        .data
        .train
        .as_deref()
        .map(|p| split(p, &labels, need_labels))
        .transpose()?;
    let unlabelled = spec
        .data
        .unlabelled
        .as_deref()
        .map(|p| split(p, &[], false))
        .transpose()?;
    let eval = spec
        .data
        .eval
        .as_deref()
        .map(|p| split(p, &labels, need_labels))
        .transpose()?;
    let test = match (spec.data.test.as_deref(), spec.data.eval.as_deref()) {
        (Some(p), _) | (None, Some(p)) => split(p, &labels, need_labels)?,
        (None, None) => {
            return Err(Error::Invalid(
                "data.test or data.eval: needed to evaluate the student".into(),
            ))
        }
    };
    for s in &skipped {
        eprintln!("data: skipped {s}");
    }
    let augmented = match &spec.data.augment {
        None => vec![],
        Some(a) => {
            let sources: Vec<Encoded> = [&labelled, &unlabelled]
                .into_iter()
                .flatten()
                .flat_map(|s| s.examples.iter().cloned())
                .collect();
            let t0 = std::time::Instant::now();
            let made = crate::augment::Augmenter::new(
                a,
                spec.training.seed,
                &tok,
                &teacher_dir,
                &sources,
            )?
            .all(&sources);
            eprintln!(
                "augment: {} examples made from {} ({:?}, factor {}, p {}) in {:.1} s",
                made.len(),
                sources.len(),
                a.method,
                a.factor,
                a.probability,
                t0.elapsed().as_secs_f64()
            );
            let f = a.factor as usize;
            let changed = (0..made.len()).find(|&i| made[i].ids != sources[i / f].ids);
            if let Some((src, aug)) = changed.map(|i| (&sources[i / f], &made[i])) {
                eprintln!(
                    "augment: e.g. \"{}\" -> \"{}\"",
                    tok.decode(&src.ids),
                    tok.decode(&aug.ids)
                );
            }
            made
        }
    };
    eprintln!(
        "data: {} labelled, {} unlabelled, {} eval, {} test examples ({} bad skipped); labels {:?}",
        labelled.as_ref().map_or(0, |s| s.examples.len()),
        unlabelled.as_ref().map_or(0, |s| s.examples.len()),
        eval.as_ref().map_or(0, |s| s.examples.len()),
        test.examples.len(),
        skipped.len(),
        labels
    );
    Ok(Prepared {
        task,
        teacher_dir,
        tok,
        labels,
        labelled,
        unlabelled,
        eval,
        test,
        augmented,
        skipped,
    })
}

/// `[data.augment]`: drops the augmented examples (the last of the global
/// order) whose teacher top-class probability is under `min_confidence`,
/// judged on the offline teacher signal when there is one, else by
/// running the teacher over them; writes what was made and kept to
/// `out/augment.json` for the report.
fn augment_filter(
    spec: &JobSpec,
    p: &Prepared,
    teacher: &TaskModel,
    data: TrainData,
    out: &Path,
) -> Result<TrainData> {
    let Some(a) = &spec.data.augment else {
        return Ok(data);
    };
    let n = data.examples.len();
    let made = p.augmented.len().min(n);
    let first = n - made;
    let keep: Vec<bool> = match (a.min_confidence, p.task) {
        (Some(min), Task::Classification) if made > 0 => {
            // The decision's key: the job's configuration and the
            // augmented examples themselves (the data files may change
            // under the same spec).
            let key = {
                use sha2::{Digest, Sha256};
                let mut h = Sha256::new();
                for e in &data.examples[first..] {
                    for (i, t) in e.ids.iter().zip(&e.type_ids) {
                        h.update(i.to_le_bytes());
                        h.update(t.to_le_bytes());
                    }
                    h.update(u64::MAX.to_le_bytes());
                }
                format!("{}-{}", fingerprint(spec), &hex::encode(h.finalize())[..16])
            };
            let decision = out.join("augment-keep.json");
            crate::augment::kept_once(&decision, &key, made, || {
                let logits = match &data.teacher_output {
                    Some(t) => t.narrow(0, first as i64, made as i64),
                    None => infer(
                        teacher,
                        &p.tok,
                        &data.examples[first..],
                        InferOptions::default(),
                        |_, _| {},
                    )?,
                };
                Ok(crate::augment::confident(&logits, min))
            })?
        }
        _ => vec![true; made],
    };
    let kept = keep.iter().filter(|&&k| k).count();
    let stats = crate::augment::AugmentStats {
        method: format!("{:?}", a.method).to_lowercase(),
        generated: made,
        kept,
        min_confidence: a.min_confidence,
    };
    eprintln!(
        "augment: {kept} of {made} augmented examples kept{}",
        a.min_confidence
            .map(|m| format!(" (teacher confidence >= {m})"))
            .unwrap_or_default()
    );
    write_atomic(
        &out.join("augment.json"),
        serde_json::to_string_pretty(&stats).unwrap().as_bytes(),
    )?;
    if kept == made {
        return Ok(data);
    }
    // Every row of the global order: kept unless an augmented one was not.
    let kept_rows: Vec<bool> = (0..n).map(|i| i < first || keep[i - first]).collect();
    let rows: Vec<i64> = (0..n as i64).filter(|&i| kept_rows[i as usize]).collect();
    let teacher_output = data
        .teacher_output
        .as_ref()
        .map(|t| t.index_select(0, &Tensor::from_slice(&rows).to_device(t.device())));
    Ok(TrainData {
        examples: data
            .examples
            .into_iter()
            .zip(&kept_rows)
            .filter_map(|(e, &k)| k.then_some(e))
            .collect(),
        labels: data
            .labels
            .into_iter()
            .zip(&kept_rows)
            .filter_map(|(l, &k)| k.then_some(l))
            .collect(),
        teacher_output,
    })
}

/// The fingerprint of what a job's checkpoints and fine-tuned teacher
/// depend on: the spec without its name, `[evaluation]`, `[quantization]`
/// and `[cluster]` (sha256 of its JSON, 16 hex digits). Checkpoints and the
/// teacher's `.complete` marker carry it, and a job refuses ones written
/// under another: an output directory reused by a job of another
/// configuration would otherwise resume its weights silently.
pub fn fingerprint(spec: &JobSpec) -> String {
    use sha2::{Digest, Sha256};
    let mut v = serde_json::to_value(spec).expect("a spec serialises");
    if let Some(o) = v.as_object_mut() {
        for k in ["name", "evaluation", "quantization", "cluster"] {
            o.remove(k);
        }
    }
    let digest = Sha256::digest(v.to_string().as_bytes());
    hex::encode(&digest[..8])
}

/// Whether the fine-tuned teacher under `out` is complete; an error when it
/// was fine-tuned by a job of another configuration (see [`fingerprint`]).
fn fine_tuned_teacher_done(spec: &JobSpec, out: &Path) -> Result<bool> {
    let marker = out.join("teacher/.complete");
    let Ok(theirs) = std::fs::read_to_string(&marker) else {
        return Ok(false);
    };
    let (theirs, ours) = (theirs.trim(), fingerprint(spec));
    if !theirs.is_empty() && theirs != ours {
        return Err(Error::Invalid(format!(
            "the fine-tuned teacher in {} was made by a job of another configuration (fingerprint {theirs}, this job's {ours}): give the job its own output directory, or delete {}",
            out.join("teacher").display(),
            out.join("teacher").display()
        )));
    }
    Ok(true)
}

/// Where the teacher the job uses lives: the fine-tuned one under `out`
/// once it exists, else the spec's.
pub fn served_teacher_dir(spec: &JobSpec, p: &Prepared, out: &Path) -> Result<PathBuf> {
    Ok(if fine_tuned_teacher_done(spec, out)? {
        out.join("teacher")
    } else {
        p.teacher_dir.clone()
    })
}

/// Loads the teacher as given (any parameter it lacks, such as a new
/// classifier head, is initialised from the job seed, so every worker
/// builds the same teacher), or fine-tunes it under `out/teacher` first
/// when the spec asks (resumable; reused once complete). With a teacher
/// cache (`crate::teachers`), a teacher another job already fine-tuned the
/// same way is taken from there, and one fine-tuned here is published to it.
pub fn teacher(
    spec: &JobSpec,
    p: &Prepared,
    out: &Path,
    device: Device,
    hooks: &mut Hooks,
    cache: Option<&Path>,
) -> Result<TaskModel> {
    let task = p.task;
    let labels = p.labels.clone();
    let done = out.join("teacher");
    if spec.teacher.fine_tune && task == Task::Classification {
        let train = p
            .labelled
            .as_ref()
            .ok_or_else(|| Error::Invalid("teacher.fine_tune: needs data.train".into()))?;
        // The teacher's own budget: teacher.epochs over the labelled data
        // at teacher.learning_rate (warmup and schedule as [training]).
        let mut cfg = train_config(spec, train.examples.len(), vec![]);
        cfg.weights = task_only();
        // Unused without a teacher of its own; fixed so the cache key
        // does not depend on them.
        cfg.temperature = (1.0, 1.0);
        let per_step = (cfg.batch_size * cfg.grad_accum) as u64;
        cfg.total_steps =
            (train.examples.len() as u64).div_ceil(per_step) * spec.teacher.epochs as u64;
        cfg.warmup_steps = (spec.training.warmup_ratio * cfg.total_steps as f64).round() as u64;
        cfg.learning_rate = spec
            .teacher
            .learning_rate
            .unwrap_or(spec.training.learning_rate);
        let cached = match cache {
            Some(dir) => Some((
                dir,
                crate::teachers::key(&crate::teachers::KeyParts {
                    teacher_dir: &p.teacher_dir,
                    task: "text_classification",
                    labels: &labels,
                    train: (&train.examples, &train.labels),
                    eval: p.eval.as_ref().map(|e| (&e.examples[..], &e.labels[..])),
                    config: &cfg,
                    device,
                })?,
            )),
            None => None,
        };
        if fine_tuned_teacher_done(spec, out)? {
            eprintln!(
                "teacher: reusing the fine-tuned teacher in {}",
                done.display()
            );
            if let Some((dir, key)) = &cached {
                publish_teacher(dir, key, &done);
            }
            return TaskModel::load(&done, task, Some(labels), device);
        }
        if let Some((dir, key)) = &cached {
            if crate::teachers::take(dir, key, &done)? {
                write_atomic(&done.join(".complete"), fingerprint(spec).as_bytes())?;
                eprintln!(
                    "teacher: taken from the teacher cache ({}): another job fine-tuned it the same way; no fine-tuning",
                    dir.join(key).display()
                );
                return TaskModel::load(&done, task, Some(labels), device);
            }
        }
        let mut teacher = TaskModel::load_seeded(
            &p.teacher_dir,
            task,
            Some(labels),
            device,
            spec.training.seed,
        )?;
        let data = TrainData {
            examples: train.examples.clone(),
            labels: train.labels.clone(),
            teacher_output: None,
        };
        let total = cfg.total_steps;
        eprintln!(
            "teacher: fine-tuning {} for {total} steps",
            p.teacher_dir.display()
        );
        train_task_only(
            &mut teacher,
            &data,
            cfg,
            &out.join("teacher-ckpt"),
            "teacher",
            spec,
            p,
            hooks,
        )?;
        export(&teacher, &done, &p.teacher_dir)?;
        write_atomic(&done.join(".complete"), fingerprint(spec).as_bytes())?;
        if let Some((dir, key)) = &cached {
            publish_teacher(dir, key, &done);
        }
        return Ok(teacher);
    }
    load_teacher(spec, p, device)
}

/// Publishes the job's complete fine-tuned teacher to the teacher cache,
/// unless a sound copy is there. The job has its teacher: a cache that
/// cannot be written costs later jobs time, not this one its result.
fn publish_teacher(cache: &Path, key: &str, done: &Path) {
    match crate::teachers::publish(cache, key, done) {
        Ok(false) => {}
        Ok(true) => eprintln!(
            "teacher: published to the teacher cache as {}",
            cache.join(key).display()
        ),
        Err(e) => {
            tracing::warn!(cache = %cache.display(), "could not publish the fine-tuned teacher: {e}")
        }
    }
}

/// The teacher that [`teacher`] fine-tuned under `out` earlier (another
/// task of the job did); an error if it is not there. A job that does not
/// fine-tune (or an embedding job, which never does) gets the spec's.
pub fn load_fine_tuned_teacher(
    spec: &JobSpec,
    p: &Prepared,
    out: &Path,
    device: Device,
) -> Result<TaskModel> {
    if !(spec.teacher.fine_tune && p.task == Task::Classification) {
        return load_teacher(spec, p, device);
    }
    let done = out.join("teacher");
    if !fine_tuned_teacher_done(spec, out)? {
        return Err(Error::Invalid(format!(
            "teacher.fine_tune: the fine-tuned teacher is missing from {} (its task should have committed it)",
            done.display()
        )));
    }
    TaskModel::load(&done, p.task, Some(p.labels.clone()), device)
}

/// The spec's teacher, as given: any parameter it lacks (a new classifier
/// head, say) is initialised from the job seed, so every worker and every
/// run builds the same teacher.
pub fn load_teacher(spec: &JobSpec, p: &Prepared, device: Device) -> Result<TaskModel> {
    TaskModel::load_seeded(
        &p.teacher_dir,
        p.task,
        (!p.labels.is_empty()).then(|| p.labels.clone()),
        device,
        spec.training.seed,
    )
}

/// Trains `model` on `data` with the loss terms of `cfg` and no teacher
/// (the teacher's fine-tuning, the labels-only baseline): resumable from
/// checkpoints under `ckpt`, stopped by `hooks.stop`, evaluated on the eval
/// split, and left on its best evaluated weights.
#[allow(clippy::too_many_arguments)]
fn train_task_only(
    model: &mut TaskModel,
    data: &TrainData,
    cfg: TrainConfig,
    ckpt: &Path,
    stage: &'static str,
    spec: &JobSpec,
    p: &Prepared,
    hooks: &mut Hooks,
) -> Result<()> {
    let total = cfg.total_steps;
    let mut tr = Trainer::new(model, None, None, &p.tok, cfg, ckpt.to_path_buf())?;
    tr.stop_on(hooks.stop.clone());
    tr.set_fingerprint(Some(fingerprint(spec)));
    tr.resume()?;
    let mut ev = eval_fn(p.eval.as_ref(), &p.tok);
    tr.train(
        data,
        ev.as_mut()
            .map(|f| f as &mut dyn FnMut(&TaskModel) -> Result<f64>),
        hooks.on_step(stage, total),
    )?;
    tr.restore_best()?;
    Ok(())
}

fn task_only() -> [TermWeight; 5] {
    [
        TermWeight::Fixed(1.0),
        TermWeight::Fixed(0.0),
        TermWeight::Fixed(0.0),
        TermWeight::Fixed(0.0),
        TermWeight::Fixed(0.0),
    ]
}

/// The derived student shape and layer map, and fresh students (seeded
/// from the job seed, initialised from the teacher when the spec asks).
pub struct StudentPlan {
    pub config: crate::model::BertConfig,
    pub layer_map: Vec<i64>,
}

impl StudentPlan {
    pub fn new(spec: &JobSpec, teacher: &TaskModel) -> Result<Self> {
        let shape = StudentShape::from(&spec.student.size);
        let config = derive_config(teacher.config(), &shape)?;
        let (lt, ls) = (teacher.config().num_hidden_layers, config.num_hidden_layers);
        let layer_map: Vec<i64> = match (&spec.student.layer_map, &spec.distill.layer_map) {
            (Some(m), _) | (None, LayerMap::Explicit(m)) => m.iter().map(|&x| x as i64).collect(),
            (None, LayerMap::Uniform) => uniform_layer_map(lt, ls),
            (None, LayerMap::Last) => last_layer_map(lt, ls),
        };
        Ok(Self { config, layer_map })
    }

    pub fn fresh(
        &self,
        spec: &JobSpec,
        p: &Prepared,
        teacher: &TaskModel,
        device: Device,
    ) -> Result<TaskModel> {
        let mut s = TaskModel::new_seeded(
            &self.config,
            p.task,
            p.labels.clone(),
            device,
            spec.training.seed,
        )?;
        s.normalize = teacher.normalize;
        if spec.student.init == StudentInit::Teacher {
            init_from_teacher(&mut s, teacher, &self.layer_map)?;
        }
        Ok(s)
    }
}

/// Distils the student (checkpoints under `out/student-ckpt`, resumable)
/// and exports it to `out/student`. `teacher_output`: the stored teacher
/// signal for [`Prepared::training`] (offline), or `None` to run the
/// teacher alongside (online).
pub fn distill_student(
    spec: &JobSpec,
    p: &Prepared,
    teacher: &TaskModel,
    teacher_output: Option<Tensor>,
    out: &Path,
    device: Device,
    hooks: &mut Hooks,
) -> Result<TaskModel> {
    distill_student_in(spec, p, teacher, teacher_output, out, device, hooks, None)
}

/// [`distill_student`] as one rank of an elastic data-parallel group
/// (`group`; see [`crate::elastic`]), or alone (`None`: resumes from the
/// latest local checkpoint). In a group, only committed checkpoints are
/// loaded, and the final rank 0 restores the best weights and exports the
/// student while the others wait at a barrier; the returned model is only
/// meaningful on rank 0.
#[allow(clippy::too_many_arguments)]
pub fn distill_student_in(
    spec: &JobSpec,
    p: &Prepared,
    teacher: &TaskModel,
    teacher_output: Option<Tensor>,
    out: &Path,
    device: Device,
    hooks: &mut Hooks,
    group: Option<&mut dyn crate::elastic::Membership>,
) -> Result<TaskModel> {
    let plan = StudentPlan::new(spec, teacher)?;
    let mut student = plan.fresh(spec, p, teacher, device)?;
    eprintln!(
        "student: L{}-H{} ({} params, {:.1}% of the teacher's {}), layer map {:?}",
        plan.config.num_hidden_layers,
        plan.config.hidden_size,
        student.num_params(),
        100.0 * student.num_params() as f64 / teacher.num_params() as f64,
        teacher.num_params(),
        plan.layer_map
    );
    let (examples, labels) = p.training();
    if examples.is_empty() {
        return Err(Error::Invalid(
            "data.train / data.unlabelled: no training examples".into(),
        ));
    }
    let offline = teacher_output.is_some();
    let width = teacher.config().hidden_size;
    // The rows before the augmented copies (the filter below drops copies only).
    let originals = examples.len() - p.augmented.len().min(examples.len());
    let data = augment_filter(
        spec,
        p,
        teacher,
        TrainData {
            examples,
            labels,
            teacher_output,
        },
        out,
    )?;
    let side = spec
        .data
        .augment
        .as_ref()
        .and_then(|a| a.per_batch)
        .map(|k| crate::distill::train::SideRows {
            from: originals,
            per_micro: k as usize,
        });
    let rows = side.map_or(data.examples.len(), |s| s.from);
    let cfg = train_config(spec, rows, plan.layer_map.clone());
    let total = cfg.total_steps;
    eprintln!(
        "distill: {total} steps, teacher signal {}{}",
        if offline { "offline" } else { "online" },
        match side {
            Some(s) if data.examples.len() > s.from => format!(
                ", {} augmented rows added to every batch of {} (from {} kept copies)",
                s.per_micro,
                spec.training.batch_size,
                data.examples.len() - s.from
            ),
            _ => String::new(),
        }
    );
    let (leader, last_group);
    {
        let online = (!offline).then_some(teacher);
        let mut tr = Trainer::new(
            &mut student,
            online,
            offline.then_some(width),
            &p.tok,
            cfg,
            out.join("student-ckpt"),
        )?;
        tr.stop_on(hooks.stop.clone());
        tr.set_fingerprint(Some(fingerprint(spec)));
        tr.set_side(side);
        if group.is_none() {
            tr.resume()?;
        }
        let eval_emb = match (p.task, p.eval.as_ref()) {
            (Task::Embedding, Some(e)) => Some(infer(
                teacher,
                &p.tok,
                &e.examples,
                InferOptions::default(),
                |_, _| {},
            )?),
            _ => None,
        };
        let mut ev = eval_fn_with(p.eval.as_ref(), &p.tok, eval_emb);
        let ev = ev
            .as_mut()
            .map(|f| f as &mut dyn FnMut(&TaskModel) -> Result<f64>);
        leader = match group {
            None => {
                tr.train(&data, ev, hooks.on_step("distill", total))?;
                true
            }
            Some(m) => {
                let exports = m.exports();
                match crate::elastic::train(&mut tr, &data, ev, hooks.on_step("distill", total), m)?
                {
                    crate::elastic::Finished::InGroup => tr.rank_world().0 == 0,
                    crate::elastic::Finished::AtCheckpoint => exports,
                }
            }
        };
        if leader {
            tr.restore_best()?;
        }
        last_group = tr.leave_group();
    }
    if leader {
        export(&student, &out.join("student"), &p.teacher_dir)?;
    }
    if let Some(g) = last_group {
        // The others return once rank 0 has exported.
        g.barrier()?;
    }
    Ok(student)
}

/// The labels-only baseline: the same student, init and budget, task loss
/// only (under `out/baseline-ckpt`); its test metric.
pub fn baseline(
    spec: &JobSpec,
    p: &Prepared,
    teacher: &TaskModel,
    out: &Path,
    device: Device,
    hooks: &mut Hooks,
) -> Result<ModelReport> {
    let plan = StudentPlan::new(spec, teacher)?;
    let mut b = plan.fresh(spec, p, teacher, device)?;
    let (examples, labels) = p.training();
    // The distilled student's budget (steps over the whole training
    // order), spent on the labelled rows alone: unlabelled and augmented
    // rows carry no task loss and would only leave batch slots empty.
    let rows = order_rows(spec, examples.len(), p.augmented.len());
    let mut cfg = train_config(spec, rows, plan.layer_map.clone());
    cfg.weights = task_only();
    let total = cfg.total_steps;
    let (examples, labels): (Vec<_>, Vec<_>) = examples
        .into_iter()
        .zip(labels)
        .filter(|(_, l)| *l != IGNORE_LABEL)
        .unzip();
    eprintln!(
        "baseline: {total} steps over the {} labelled examples, task loss only",
        examples.len()
    );
    let bdata = TrainData {
        examples,
        labels,
        teacher_output: None,
    };
    train_task_only(
        &mut b,
        &bdata,
        cfg,
        &out.join("baseline-ckpt"),
        "baseline",
        spec,
        p,
        hooks,
    )?;
    let (m, eps) = measure(&b, &p.tok, &p.test, None)?;
    let r = ModelReport {
        params: b.num_params(),
        layers: plan.config.num_hidden_layers,
        hidden: plan.config.hidden_size,
        metric: m,
        bytes_on_disk: None,
        examples_per_second: eps,
        ..ModelReport::default()
    };
    write_atomic(
        &out.join(BASELINE_FILE),
        serde_json::to_string_pretty(&r).unwrap().as_bytes(),
    )?;
    Ok(r)
}

/// Where [`baseline`] leaves its measurement for the evaluation stage.
const BASELINE_FILE: &str = "baseline.json";
/// Where each stage task records its wall time for the report.
const STAGES_FILE: &str = "stages.json";

/// The labels-only baseline [`baseline`] measured in `out`, if any.
pub fn stored_baseline(out: &Path) -> Result<Option<ModelReport>> {
    let path = out.join(BASELINE_FILE);
    match std::fs::read(&path) {
        Ok(b) => serde_json::from_slice(&b)
            .map(Some)
            .map_err(|e| Error::Config {
                path,
                message: format!("not a baseline measurement: {e}"),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(&path, e)),
    }
}

/// Records that stage `name` took `seconds` (this run's time; a stage run
/// again replaces its entry), for the report's stage table.
pub fn record_stage(out: &Path, name: &str, seconds: f64) -> Result<()> {
    let mut stages = recorded_stages(out);
    match stages.iter_mut().find(|(n, _)| n == name) {
        Some(s) => s.1 = seconds,
        None => stages.push((name.to_string(), seconds)),
    }
    write_atomic(
        &out.join(STAGES_FILE),
        serde_json::to_string_pretty(&stages).unwrap().as_bytes(),
    )
}

/// Records that the teacher-signal shard starting at `start` took
/// `seconds` to compute here. One file per shard: shards run on many
/// workers at once, and none rewrites another's record.
pub fn record_shard(out: &Path, start: usize, seconds: f64) -> Result<()> {
    write_atomic(
        &out.join(SHARD_TIMES).join(format!("{start:012}")),
        format!("{seconds}").as_bytes(),
    )
}

/// Where [`record_shard`] keeps its records.
const SHARD_TIMES: &str = "stages/teacher-signal";

/// The order stages run in, for the report.
const STAGE_ORDER: [&str; 6] = [
    "prepare",
    "teacher",
    "teacher signal",
    "distillation",
    "labels-only baseline",
    "evaluation and quantization",
];

/// The stage times recorded in `out` ([`record_stage`]; the teacher
/// signal as the sum of its shards' compute times, [`record_shard`]), in
/// the order the stages run.
pub fn recorded_stages(out: &Path) -> Vec<(String, f64)> {
    let mut stages: Vec<(String, f64)> = std::fs::read(out.join(STAGES_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    if let Ok(dir) = std::fs::read_dir(out.join(SHARD_TIMES)) {
        let total: f64 = dir
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .filter_map(|s| s.trim().parse::<f64>().ok())
            .sum();
        stages.retain(|(n, _)| n != "teacher signal");
        stages.push(("teacher signal".into(), total));
    }
    stages.sort_by_key(|(n, _)| {
        STAGE_ORDER
            .iter()
            .position(|o| o == n)
            .unwrap_or(usize::MAX)
    });
    stages
}

/// The batch sizes latency is measured at: 1 and the spec's.
fn latency_batches(spec: &JobSpec) -> Vec<u32> {
    let mut v = spec.evaluation.latency_batch_sizes.clone();
    v.push(1);
    v.sort_unstable();
    v.dedup();
    v
}

/// The job's test split, measured the way its report measures.
fn bench<'a>(spec: &JobSpec, p: &'a Prepared) -> Bench<'a> {
    Bench {
        tok: &p.tok,
        examples: &p.test.examples,
        labels: &p.test.labels,
        n_labels: p.labels.len(),
        task: p.task,
        batch_sizes: latency_batches(spec),
        iters: spec.evaluation.latency_iters,
        teacher_out: None,
    }
}

/// Evaluates teacher and student on the test split, quantizes the student
/// to the spec's formats (`crate::quant`) and evaluates each variant, runs
/// the quality gate, and writes `out/report.json`, `out/report.md` and the
/// plots. Quantized variants go to `out/quantized/<format>/`; rejected ones
/// are removed, and kept ones that are not chosen unless
/// `quantization.keep_all`. `stages` are the wall times of the stages
/// before this one.
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    spec: &JobSpec,
    p: &Prepared,
    teacher: &TaskModel,
    student: &TaskModel,
    baseline: Option<ModelReport>,
    out: &Path,
    started: Instant,
    stages: &[(String, f64)],
) -> Result<Report> {
    let t_eval = Instant::now();
    let batches = latency_batches(spec);
    let mut bench = bench(spec, p);
    let device = student.device();
    eprintln!(
        "evaluate: teacher and fp32 student on {} test examples",
        p.test.examples.len()
    );
    let tm = bench.measure(teacher, Some(&served_teacher_dir(spec, p, out)?))?;
    let student_dir = out.join("student");
    let sm = bench.measure(student, Some(&student_dir))?;
    let qdevice = match spec.quantization.hardware {
        distill_spec::Hardware::Cpu => Device::Cpu,
        distill_spec::Hardware::NvidiaGpu => device,
    };
    let labels = (!p.labels.is_empty()).then(|| p.labels.clone());
    let mut variants = vec![];
    for scheme in Scheme::from_spec(&spec.quantization) {
        let t0 = Instant::now();
        let dir = out.join("quantized").join(scheme.name());
        let mut m = TaskModel::load(&student_dir, p.task, labels.clone(), qdevice)?;
        if let Err(e) = m.quantize(scheme) {
            // An explicit format was checked by `distill plan`; an "auto"
            // candidate that does not fit this model is skipped, and said.
            if spec.quantization.formats != distill_spec::QuantFormats::Auto {
                return Err(e);
            }
            eprintln!("quantize: {} skipped: {e}", scheme.name());
            variants.push(Variant {
                format: scheme.name().to_string(),
                model: ModelReport::default(),
                fast_kernel: scheme.fast_kernel(qdevice),
                verdict: Verdict::Skipped,
                reason: Some(format!("not applicable: {e}")),
                dir: None,
            });
            continue;
        }
        export(&m, &dir, &student_dir)?;
        let model = bench.measure(&m, Some(&dir))?;
        eprintln!(
            "quantize: {} metric {:.4} (fp32 {:.4}), {:.1} MB, in {:.1} s",
            scheme.name(),
            model.metric,
            sm.metric,
            model.bytes_on_disk.unwrap_or(0) as f64 / 1e6,
            t0.elapsed().as_secs_f64()
        );
        variants.push(Variant {
            format: scheme.name().to_string(),
            model,
            fast_kernel: scheme.fast_kernel(qdevice),
            verdict: Verdict::Kept,
            reason: None,
            dir: Some(dir),
        });
    }
    let at = *batches.last().expect("batch 1 at least");
    let chosen = crate::report::gate(
        sm.metric,
        sm.p50_at(at),
        spec.quantization.max_accuracy_drop,
        at,
        &mut variants,
    );
    for v in variants.iter_mut() {
        let drop_it = match v.verdict {
            Verdict::Rejected | Verdict::Skipped => true,
            Verdict::Kept => !spec.quantization.keep_all,
            Verdict::Chosen => false,
        };
        if let (true, Some(d)) = (drop_it, &v.dir) {
            std::fs::remove_dir_all(d).map_err(|e| Error::io(d, e))?;
            v.dir = None;
        }
    }
    let chosen_dir = if chosen == "fp32" {
        student_dir.clone()
    } else {
        out.join("quantized").join(&chosen)
    };
    let mut stage_seconds = stages.to_vec();
    stage_seconds.push((
        "evaluation and quantization".into(),
        t_eval.elapsed().as_secs_f64(),
    ));
    let quality = crate::quality::check(
        if p.task == Task::Classification {
            &p.test.labels
        } else {
            &[]
        },
        p.labels.len(),
        &sm,
        baseline.as_ref(),
    );
    if quality.passed {
        tracing::info!(chance = quality.chance, "quality check passed");
    } else {
        for f in &quality.failures {
            tracing::error!("QUALITY CHECK FAILED: {f}");
        }
    }
    for w in &quality.warnings {
        tracing::warn!("quality: {w}");
    }
    let mut report = Report {
        version: crate::report::REPORT_VERSION,
        task: format!("{:?}", spec.task),
        metric_name: if p.task == Task::Classification {
            "accuracy".into()
        } else {
            "mean cosine to teacher".into()
        },
        retention: sm.metric / tm.metric,
        quality: Some(quality),
        teacher: tm,
        student: sm,
        baseline,
        variants,
        chosen: Some(chosen),
        chosen_dir: Some(chosen_dir),
        chosen_at_batch: Some(at),
        skipped_examples: p.skipped.iter().map(|s| s.to_string()).collect(),
        augmentation: std::fs::read(out.join("augment.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok()),
        student_dir,
        seconds: started.elapsed().as_secs_f64(),
        stage_seconds,
        measured_on: format!(
            "{device:?} (quantized variants: {qdevice:?}), {} threads",
            tch::get_num_threads()
        ),
        config: serde_json::to_value(spec).unwrap_or_default(),
        plots: vec![],
    };
    report.plots = crate::report::plots(&report, out, at)?;
    write_atomic(
        &out.join("report.json"),
        serde_json::to_string_pretty(&report).unwrap().as_bytes(),
    )?;
    write_atomic(&out.join("report.md"), render(&report).as_bytes())?;
    Ok(report)
}

/// The identity of shard `[start, end)` of the job's teacher signal.
pub fn shard_spec<'a>(
    p: &Prepared,
    id: &'a crate::signal::TeacherId,
    start: usize,
    end: usize,
) -> crate::signal::ShardSpec<'a> {
    crate::signal::ShardSpec {
        teacher: id,
        kind: p.signal_kind(),
        max_length: p.tok.max_length,
        start,
        end,
    }
}

/// The whole stored teacher signal of the job (every shard of
/// `shard_size` in the artifact store at `signal_root`, verified against
/// its content address), or an error naming the first shard that is
/// missing or wrong.
pub fn stored_signal(
    p: &Prepared,
    teacher_dir: &Path,
    signal_root: &str,
    shard_size: usize,
) -> Result<Tensor> {
    use crate::signal::{read_shard, TeacherId};
    let id = TeacherId::of(teacher_dir)?;
    let store = crate::artifacts::Artifacts::open(signal_root)?;
    let (examples, _) = p.training();
    let shard_size = shard_size.max(1);
    let mut parts = vec![];
    for start in (0..examples.len()).step_by(shard_size) {
        let end = (start + shard_size).min(examples.len());
        let spec = shard_spec(p, &id, start, end);
        match read_shard(&store, &spec, &examples)? {
            Some(t) => parts.push(t),
            None => {
                return Err(Error::Invalid(format!(
                    "teacher signal for examples [{start}, {end}) is missing under {signal_root}"
                )))
            }
        }
    }
    Ok(Tensor::cat(&parts, 0))
}

fn eval_fn<'a>(
    eval: Option<&'a Split>,
    tok: &'a TextTokenizer,
) -> Option<impl FnMut(&TaskModel) -> Result<f64> + 'a> {
    eval_fn_with(eval, tok, None)
}

fn eval_fn_with<'a>(
    eval: Option<&'a Split>,
    tok: &'a TextTokenizer,
    teacher_emb: Option<Tensor>,
) -> Option<impl FnMut(&TaskModel) -> Result<f64> + 'a> {
    let e = eval?;
    Some(move |m: &TaskModel| -> Result<f64> {
        match (m.task, &teacher_emb) {
            (Task::Embedding, Some(t)) => {
                let out = infer(m, tok, &e.examples, InferOptions::default(), |_, _| {})?;
                Ok(Tensor::cosine_similarity(&out, t, -1, 1e-8)
                    .mean(Kind::Float)
                    .double_value(&[]))
            }
            (Task::Embedding, None) => Ok(0.0),
            (Task::Classification, _) => accuracy(m, tok, &e.examples, &e.labels),
        }
    })
}

/// `distill eval`: the teacher at `teacher_dir` and each model directory
/// (fp32, fp16/bf16 or quantized) measured on the job's test split exactly
/// as the job's report measures them. Returns `(name, report)` rows, the
/// teacher first.
pub fn evaluate_dirs(
    spec: &JobSpec,
    teacher_dir: &Path,
    models: &[PathBuf],
    device: Device,
) -> Result<Vec<(String, ModelReport)>> {
    let p = prepare(spec)?;
    let labels = (!p.labels.is_empty()).then(|| p.labels.clone());
    let mut bench = bench(spec, &p);
    let teacher = TaskModel::load(teacher_dir, p.task, labels.clone(), device)?;
    let mut rows = vec![(
        format!("teacher {}", teacher_dir.display()),
        bench.measure(&teacher, Some(teacher_dir))?,
    )];
    drop(teacher);
    for dir in models {
        let m = TaskModel::load(dir, p.task, labels.clone(), device)?;
        let name = format!(
            "{} ({})",
            dir.display(),
            m.quant.map_or("fp32", |q| q.name())
        );
        rows.push((name, bench.measure(&m, Some(dir))?));
    }
    Ok(rows)
}
