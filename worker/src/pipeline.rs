//! One distillation job on this machine, end to end: load and check the
//! inputs, fine-tune the teacher if asked, derive and initialise the student,
//! distil (online or offline teacher signal), optionally train a labels-only
//! baseline with the same budget, evaluate on the test split, export the
//! student as a Hugging Face directory and write `report.json`/`report.md`.
//!
//! Every stage checkpoints under the output directory; running the same job
//! again resumes where it stopped (a finished stage is reused).

use crate::autocast::Reduced;
use crate::data::{read_examples, Example, Fields};
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
use crate::tokenize::{Encoded, TextTokenizer};
use crate::{Error, Result};
use distill_spec::{
    JobSpec, LayerMap, LrSchedule, Precision, StudentInit, TeacherSignal, TrainingLength, Weight,
};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub out: PathBuf,
    pub device: Device,
    /// Also train the same student on labels alone, for comparison.
    pub baseline: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    pub params: i64,
    pub layers: i64,
    pub hidden: i64,
    /// Accuracy (classification) or mean cosine to the teacher (embedding) on the test split.
    pub metric: f64,
    /// Size of the exported model directory; `None` for a model that is not
    /// exported (the labels-only baseline).
    pub bytes_on_disk: Option<u64>,
    pub examples_per_second: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub task: String,
    pub metric_name: String,
    pub teacher: ModelReport,
    pub student: ModelReport,
    pub baseline: Option<ModelReport>,
    /// student metric / teacher metric.
    pub retention: f64,
    pub student_dir: PathBuf,
    pub seconds: f64,
}

struct Split {
    examples: Vec<Encoded>,
    labels: Vec<i64>,
}

fn read_split(
    path: &str,
    spec: &JobSpec,
    labels: &[String],
    tok: &TextTokenizer,
    require_labels: bool,
) -> Result<Split> {
    let fields = Fields {
        text: spec.data.text_field.clone(),
        text_pair: spec.data.text_pair_field.clone(),
        label: Some(spec.data.label_field.clone()),
    };
    let p = Path::new(path);
    let ex = read_examples(p, &fields)?;
    let ids = label_ids(&ex, labels, p, require_labels)?;
    let texts: Vec<&str> = ex.iter().map(|e| e.text.as_str()).collect();
    let pairs: Option<Vec<&str>> = fields.text_pair.as_ref().map(|_| {
        ex.iter()
            .map(|e| e.text_pair.as_deref().unwrap_or(""))
            .collect()
    });
    Ok(Split {
        examples: tok.encode(&texts, pairs.as_deref())?,
        labels: ids,
    })
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
            // Refused in `run_local` before any work (needs loss scaling).
            Precision::Fp16 => Some(Reduced::Fp16),
        },
    }
}

fn log_step(stage: &'static str, total: u64) -> impl FnMut(&StepLog) {
    let t0 = Instant::now();
    move |l: &StepLog| {
        if l.step % 20 == 0 || l.step + 1 == total {
            let terms: Vec<String> = ["task", "kd", "attn", "hidden", "emb"]
                .iter()
                .zip(l.terms)
                .filter_map(|(n, v)| v.map(|v| format!("{n}={v:.4}")))
                .collect();
            eprintln!(
                "{stage}: step {}/{} loss {:.4} [{}] lr {:.2e} T {:.2} ({:.1}s)",
                l.step + 1,
                total,
                l.loss,
                terms.join(" "),
                l.lr,
                l.temperature,
                t0.elapsed().as_secs_f64()
            );
        }
    }
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|r| {
            r.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
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

pub fn run_local(spec: &JobSpec, opts: &RunOptions) -> Result<Report> {
    check_supported(spec)?;
    let started = Instant::now();
    let out = &opts.out;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let task = if spec.task.is_classification() {
        Task::Classification
    } else {
        Task::Embedding
    };
    let teacher_dir = PathBuf::from(&spec.teacher.path);
    let base_cfg = crate::model::BertConfig::from_dir(&teacher_dir)?;
    let tok = TextTokenizer::load(&teacher_dir, &base_cfg, spec.data.max_length as usize)?;

    // Labels: the spec's list, else what the training data uses (sorted).
    let labels: Vec<String> = if task == Task::Embedding {
        vec![]
    } else if let Some(l) = &spec.data.labels {
        l.clone()
    } else {
        let path = spec.data.train.as_deref().ok_or_else(|| {
            Error::Invalid("data.train: a classification job needs labelled training data".into())
        })?;
        let fields = Fields {
            text: spec.data.text_field.clone(),
            text_pair: None,
            label: Some(spec.data.label_field.clone()),
        };
        let mut l: Vec<String> = read_examples(Path::new(path), &fields)?
            .into_iter()
            .filter_map(|e| e.label)
            .collect();
        l.sort();
        l.dedup();
        l
    };
    let need_labels = task == Task::Classification;
    let labelled = spec
        .data
        .train
        .as_deref()
        .map(|p| read_split(p, spec, &labels, &tok, need_labels))
        .transpose()?;
    let unlabelled = spec
        .data
        .unlabelled
        .as_deref()
        .map(|p| read_split(p, spec, &[], &tok, false))
        .transpose()?;
    let eval = spec
        .data
        .eval
        .as_deref()
        .map(|p| read_split(p, spec, &labels, &tok, need_labels))
        .transpose()?;
    let test = match spec.data.test.as_deref() {
        Some(p) => Some(read_split(p, spec, &labels, &tok, need_labels)?),
        None => None,
    };
    let test = test
        .or_else(|| {
            spec.data
                .eval
                .as_deref()
                .and_then(|p| read_split(p, spec, &labels, &tok, need_labels).ok())
        })
        .ok_or_else(|| {
            Error::Invalid("data.test or data.eval: needed to evaluate the student".into())
        })?;
    eprintln!(
        "data: {} labelled, {} unlabelled, {} eval, {} test examples; labels {:?}",
        labelled.as_ref().map_or(0, |s| s.examples.len()),
        unlabelled.as_ref().map_or(0, |s| s.examples.len()),
        eval.as_ref().map_or(0, |s| s.examples.len()),
        test.examples.len(),
        labels
    );

    // Teacher: as given, or fine-tuned here on the labelled set first.
    let teacher = if spec.teacher.fine_tune && task == Task::Classification {
        let done = out.join("teacher");
        if done.join(".complete").exists() {
            eprintln!(
                "teacher: reusing the fine-tuned teacher in {}",
                done.display()
            );
            TaskModel::load(&done, task, Some(labels.clone()), opts.device)?
        } else {
            let train = labelled
                .as_ref()
                .ok_or_else(|| Error::Invalid("teacher.fine_tune: needs data.train".into()))?;
            let mut teacher =
                TaskModel::load(&teacher_dir, task, Some(labels.clone()), opts.device)?;
            let mut cfg = train_config(spec, train.examples.len(), vec![]);
            cfg.weights = [
                TermWeight::Fixed(1.0),
                TermWeight::Fixed(0.0),
                TermWeight::Fixed(0.0),
                TermWeight::Fixed(0.0),
                TermWeight::Fixed(0.0),
            ];
            let data = TrainData {
                examples: train.examples.clone(),
                labels: train.labels.clone(),
                teacher_output: None,
            };
            let total = cfg.total_steps;
            eprintln!(
                "teacher: fine-tuning {} for {total} steps",
                teacher_dir.display()
            );
            let mut tr = Trainer::new(
                &mut teacher,
                None,
                None,
                &tok,
                cfg,
                out.join("teacher-ckpt"),
            )?;
            tr.resume()?;
            let mut ev = eval_fn(eval.as_ref(), &tok);
            tr.train(
                &data,
                ev.as_mut()
                    .map(|f| f as &mut dyn FnMut(&TaskModel) -> Result<f64>),
                log_step("teacher", total),
            )?;
            tr.restore_best()?;
            drop(tr);
            export(&teacher, &done, &teacher_dir)?;
            write_atomic(&done.join(".complete"), b"")?;
            teacher
        }
    } else {
        TaskModel::load(
            &teacher_dir,
            task,
            (!labels.is_empty()).then(|| labels.clone()),
            opts.device,
        )?
    };

    // Student shape, layer map and initialisation.
    let shape = StudentShape::from(&spec.student.size);
    let scfg = derive_config(teacher.config(), &shape)?;
    let (lt, ls) = (teacher.config().num_hidden_layers, scfg.num_hidden_layers);
    let layer_map: Vec<i64> = match (&spec.student.layer_map, &spec.distill.layer_map) {
        (Some(m), _) | (None, LayerMap::Explicit(m)) => m.iter().map(|&x| x as i64).collect(),
        (None, LayerMap::Uniform) => uniform_layer_map(lt, ls),
        (None, LayerMap::Last) => last_layer_map(lt, ls),
    };
    let new_student = || -> Result<TaskModel> {
        tch::manual_seed(spec.training.seed as i64);
        let mut s = TaskModel::new(&scfg, task, labels.clone(), opts.device)?;
        s.normalize = teacher.normalize;
        if spec.student.init == StudentInit::Teacher {
            init_from_teacher(&mut s, &teacher, &layer_map)?;
        }
        Ok(s)
    };
    let mut student = new_student()?;
    eprintln!(
        "student: L{ls}-H{} ({} params, {:.1}% of the teacher's {}), layer map {layer_map:?}",
        scfg.hidden_size,
        student.num_params(),
        100.0 * student.num_params() as f64 / teacher.num_params() as f64,
        teacher.num_params()
    );

    // Training data: labelled + unlabelled (teacher signal only).
    let mut examples = vec![];
    let mut ids = vec![];
    for s in [&labelled, &unlabelled].into_iter().flatten() {
        examples.extend(s.examples.iter().cloned());
        ids.extend(s.labels.iter().copied());
    }
    if examples.is_empty() {
        return Err(Error::Invalid(
            "data.train / data.unlabelled: no training examples".into(),
        ));
    }
    let offline = spec.distill.teacher_signal == TeacherSignal::Offline;
    let teacher_output = if offline {
        let served_dir = if out.join("teacher/.complete").exists() {
            out.join("teacher")
        } else {
            teacher_dir.clone()
        };
        Some(offline_signal(
            &teacher,
            &served_dir,
            &tok,
            &examples,
            &out.join("teacher-signal"),
        )?)
    } else {
        None
    };
    let width = teacher.config().hidden_size;
    let data = TrainData {
        examples,
        labels: ids,
        teacher_output,
    };
    let cfg = train_config(spec, data.examples.len(), layer_map.clone());
    let total = cfg.total_steps;
    eprintln!(
        "distill: {total} steps, teacher signal {}",
        if offline { "offline" } else { "online" }
    );
    let teacher_test_emb = if task == Task::Embedding {
        Some(infer(
            &teacher,
            &tok,
            &test.examples,
            InferOptions::default(),
            |_, _| {},
        )?)
    } else {
        None
    };
    {
        let online = (!offline).then_some(&teacher);
        let mut tr = Trainer::new(
            &mut student,
            online,
            offline.then_some(width),
            &tok,
            cfg.clone(),
            out.join("student-ckpt"),
        )?;
        tr.resume()?;
        let eval_emb = match (task, eval.as_ref()) {
            (Task::Embedding, Some(e)) => Some(infer(
                &teacher,
                &tok,
                &e.examples,
                InferOptions::default(),
                |_, _| {},
            )?),
            _ => None,
        };
        let mut ev = eval_fn_with(eval.as_ref(), &tok, eval_emb);
        tr.train(
            &data,
            ev.as_mut()
                .map(|f| f as &mut dyn FnMut(&TaskModel) -> Result<f64>),
            log_step("distill", total),
        )?;
        tr.restore_best()?;
    }
    let student_dir = out.join("student");
    export(&student, &student_dir, &teacher_dir)?;

    // Labels-only baseline: same student, same init, same budget, task loss only.
    let baseline = if opts.baseline && task == Task::Classification {
        let mut b = new_student()?;
        let mut bcfg = cfg.clone();
        bcfg.weights = [
            TermWeight::Fixed(1.0),
            TermWeight::Fixed(0.0),
            TermWeight::Fixed(0.0),
            TermWeight::Fixed(0.0),
            TermWeight::Fixed(0.0),
        ];
        let bdata = TrainData {
            examples: data.examples.clone(),
            labels: data.labels.clone(),
            teacher_output: None,
        };
        {
            let mut tr = Trainer::new(&mut b, None, None, &tok, bcfg, out.join("baseline-ckpt"))?;
            tr.resume()?;
            let mut ev = eval_fn(eval.as_ref(), &tok);
            tr.train(
                &bdata,
                ev.as_mut()
                    .map(|f| f as &mut dyn FnMut(&TaskModel) -> Result<f64>),
                log_step("baseline", total),
            )?;
            tr.restore_best()?;
        }
        let (m, eps) = measure(&b, &tok, &test, None)?;
        Some(ModelReport {
            params: b.num_params(),
            layers: ls,
            hidden: scfg.hidden_size,
            metric: m,
            bytes_on_disk: None,
            examples_per_second: eps,
        })
    } else {
        None
    };

    let (tm, teps) = measure(&teacher, &tok, &test, teacher_test_emb.as_ref())?;
    let (sm, seps) = measure(&student, &tok, &test, teacher_test_emb.as_ref())?;
    let teacher_bytes = if out.join("teacher/.complete").exists() {
        dir_bytes(&out.join("teacher"))
    } else {
        dir_bytes(&teacher_dir)
    };
    let report = Report {
        task: format!("{:?}", spec.task),
        metric_name: if task == Task::Classification {
            "accuracy".into()
        } else {
            "mean cosine to teacher".into()
        },
        teacher: ModelReport {
            params: teacher.num_params(),
            layers: lt,
            hidden: teacher.config().hidden_size,
            metric: tm,
            bytes_on_disk: Some(teacher_bytes),
            examples_per_second: teps,
        },
        student: ModelReport {
            params: student.num_params(),
            layers: ls,
            hidden: scfg.hidden_size,
            metric: sm,
            bytes_on_disk: Some(dir_bytes(&student_dir)),
            examples_per_second: seps,
        },
        baseline,
        retention: sm / tm,
        student_dir: student_dir.clone(),
        seconds: started.elapsed().as_secs_f64(),
    };
    write_atomic(
        &out.join("report.json"),
        serde_json::to_string_pretty(&report).unwrap().as_bytes(),
    )?;
    write_atomic(&out.join("report.md"), render(&report).as_bytes())?;
    Ok(report)
}

/// Shards of this many examples make up the offline teacher signal.
pub const SHARD_SIZE: usize = 1024;

/// The offline teacher signal for `examples`, from content-addressed shards
/// under `signal_dir` (see `crate::signal`): finished shards are reused,
/// missing ones computed and written.
fn offline_signal(
    teacher: &TaskModel,
    teacher_dir: &Path,
    tok: &TextTokenizer,
    examples: &[Encoded],
    signal_dir: &Path,
) -> Result<Tensor> {
    use crate::signal::{read_shard, write_shard, ShardSpec, TeacherId};
    let id = TeacherId::of(teacher_dir)?;
    let kind = if teacher.task == Task::Classification {
        "logits"
    } else {
        "embeddings"
    };
    let (mut parts, mut reused) = (vec![], 0);
    let n_shards = examples.len().div_ceil(SHARD_SIZE);
    for start in (0..examples.len()).step_by(SHARD_SIZE) {
        let end = (start + SHARD_SIZE).min(examples.len());
        let spec = ShardSpec {
            teacher: &id,
            kind,
            max_length: tok.max_length,
            start,
            end,
        };
        let t = match read_shard(signal_dir, &spec, examples)? {
            Some(t) => {
                reused += 1;
                t
            }
            None => {
                let t = infer(
                    teacher,
                    tok,
                    &examples[start..end],
                    InferOptions::default(),
                    |_, _| {},
                )?;
                write_shard(signal_dir, &spec, examples, &t)?;
                t
            }
        };
        parts.push(t);
    }
    eprintln!(
        "teacher signal: {n_shards} shards of up to {SHARD_SIZE} examples ({reused} reused) in {}",
        signal_dir.display()
    );
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

/// The result table as Markdown.
pub fn render(r: &Report) -> String {
    let mut s = format!("| model | layers | hidden | params | {} | examples/s | bytes on disk |\n|---|---|---|---|---|---|---|\n", r.metric_name);
    let mut row = |name: &str, m: &ModelReport| {
        s.push_str(&format!(
            "| {name} | {} | {} | {} | {:.4} | {:.0} | {} |\n",
            m.layers,
            m.hidden,
            m.params,
            m.metric,
            m.examples_per_second,
            m.bytes_on_disk
                .map_or("— (not exported)".to_string(), |b| b.to_string())
        ));
    };
    row("teacher", &r.teacher);
    row("student (distilled)", &r.student);
    if let Some(b) = &r.baseline {
        row("student (labels only)", b);
    }
    s.push_str(&format!(
        "\nretention (student / teacher): {:.2}%  \ntime: {:.0} s\n",
        100.0 * r.retention,
        r.seconds
    ));
    s
}
