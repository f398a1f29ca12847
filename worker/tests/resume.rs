//! Exact resume: N steps + checkpoint + fresh process state + resume + M
//! steps gives bitwise the same weights as N+M uninterrupted steps (CPU),
//! with every loss term on (task, KD, attention, hidden through a learned
//! projection) and gradient accumulation.

mod common;

use common::*;
use distill_worker::autocast::{autocast, is_enabled, Reduced};
use distill_worker::distill::loss::IGNORE_LABEL;
use distill_worker::distill::schedule::{Decay, TermWeight};
use distill_worker::distill::train::{SideRows, StepLog, TrainConfig, TrainData, Trainer};
use distill_worker::model::student::{derive_config, init_from_teacher, StudentShape};
use distill_worker::model::{Task, TaskModel};
use distill_worker::tokenize::TextTokenizer;
use std::path::Path;
use tch::{Device, Kind, Tensor};

/// libtorch's RNG is process-global and the trainer reseeds it every step:
/// the tests of this file must not train at the same time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn config() -> TrainConfig {
    TrainConfig {
        total_steps: 10,
        batch_size: 4,
        grad_accum: 2,
        learning_rate: 1e-3,
        warmup_steps: 2,
        decay: Decay::Linear,
        weight_decay: 0.01,
        grad_clip: 1.0,
        seed: 11,
        eval_every: 0,
        checkpoint_every: 4,
        // Hidden as a number: "auto" feature terms are off for a student
        // narrower than its teacher (16 < 32), and this test wants every term.
        weights: [
            TermWeight::Fixed(1.0),
            TermWeight::Auto,
            TermWeight::Fixed(0.5),
            TermWeight::Fixed(0.3),
            TermWeight::Fixed(0.0),
        ],
        temperature: (4.0, 1.0),
        layer_map: vec![1],
        max_bad_steps: 3,
        precision: None,
    }
}

fn data(tok: &TextTokenizer) -> TrainData {
    let texts: Vec<String> = (0..30)
        .map(|i| {
            (0..(3 + i % 7))
                .map(|j| format!("w{}", 5 + (i * 7 + j * 3) % 50))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let labels = (0..30)
        .map(|i| {
            if i % 5 == 0 {
                IGNORE_LABEL
            } else {
                (i % 2) as i64
            }
        })
        .collect();
    TrainData {
        examples: tok.encode(&refs, None).unwrap(),
        labels,
        teacher_output: None,
    }
}

fn student(teacher: &TaskModel) -> TaskModel {
    let cfg = derive_config(
        teacher.config(),
        &StudentShape::Explicit {
            layers: 1,
            hidden: 16,
            heads: 2,
            intermediate: 32,
        },
    )
    .unwrap();
    let mut s = TaskModel::new(
        &cfg,
        Task::Classification,
        teacher.labels.clone(),
        Device::Cpu,
    )
    .unwrap();
    init_from_teacher(&mut s, teacher, &[1]).unwrap();
    s
}

fn weights(m: &TaskModel) -> Vec<(String, tch::Tensor)> {
    m.named_tensors()
}

fn run(
    model_dir: &Path,
    ckpt: &Path,
    stop: Option<u64>,
    resume: bool,
) -> Vec<(String, tch::Tensor)> {
    run_with(config(), model_dir, ckpt, stop, resume).0
}

/// [`run`] with a given config; also returns the step logs.
fn run_with(
    config: TrainConfig,
    model_dir: &Path,
    ckpt: &Path,
    stop: Option<u64>,
    resume: bool,
) -> (Vec<(String, tch::Tensor)>, Vec<StepLog>) {
    run_side(config, None, 30, model_dir, ckpt, stop, resume)
}

/// [`run_with`] with side rows (`[data.augment] per_batch`), on the first
/// `rows` of the 30 examples.
fn run_side(
    config: TrainConfig,
    side: Option<SideRows>,
    rows: usize,
    model_dir: &Path,
    ckpt: &Path,
    stop: Option<u64>,
    resume: bool,
) -> (Vec<(String, tch::Tensor)>, Vec<StepLog>) {
    let teacher = TaskModel::load(model_dir, Task::Classification, None, Device::Cpu).unwrap();
    let tok = TextTokenizer::load(model_dir, teacher.config(), 16).unwrap();
    let mut d = data(&tok);
    d.examples.truncate(rows);
    d.labels.truncate(rows);
    // A fresh student with a different random state: resume must overwrite all of it.
    tch::manual_seed(if resume { 999 } else { 1 });
    let mut s = student(&teacher);
    let mut tr = Trainer::new(
        &mut s,
        Some(&teacher),
        None,
        &tok,
        config,
        ckpt.to_path_buf(),
    )
    .unwrap();
    tr.set_side(side);
    if resume {
        assert!(tr.resume().unwrap(), "a checkpoint was published");
        assert_eq!(tr.step, 4);
    }
    let mut logs = vec![];
    tr.train_until(stop.unwrap_or(10), &d, None, |l| logs.push(l.clone()))
        .unwrap();
    assert!(logs.iter().all(|l| l.loss.is_finite() && !l.skipped));
    // Every configured term is really computed.
    assert!(logs.iter().all(|l| l.terms[0].is_some()
        && l.terms[1].is_some()
        && l.terms[2].is_some()
        && l.terms[3].is_some()));
    drop(tr);
    (weights(&s), logs)
}

/// The random teacher both tests train against, made by transformers.
fn make_teacher(root: &Path) -> std::path::PathBuf {
    random_model(&root.join("teacher"), Random { seed: 5, ..SMALL })
}

#[test]
fn resume_is_bitwise_exact() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = make_teacher(tmp.path());
    let straight = run(&model_dir, &tmp.path().join("a"), None, false);
    let _ = run(&model_dir, &tmp.path().join("b"), Some(4), false);
    let resumed = run(&model_dir, &tmp.path().join("b"), None, true);
    assert_eq!(straight.len(), resumed.len());
    let initial = {
        let teacher = TaskModel::load(&model_dir, Task::Classification, None, Device::Cpu).unwrap();
        weights(&student(&teacher))
    };
    let mut moved = false;
    for ((n, a), (m, b)) in straight.iter().zip(&resumed) {
        assert_eq!(n, m);
        assert!(
            a.equal(b),
            "{n} differs after resume (max abs {})",
            max_abs_diff(a, b)
        );
    }
    for ((_, a), (_, b)) in straight.iter().zip(&initial) {
        moved |= !a.equal(b);
    }
    assert!(moved, "training changed the weights");
}

/// `[data.augment] per_batch`: rows 20.. of the 30 (the copies) leave the
/// epoch order and 3 of them ride along in every micro-batch. Training is
/// still a function of the step (N steps + resume + M steps = N+M, bitwise),
/// and the side rows are really trained on: the weights differ from a run
/// on rows 0..20 alone (whose epoch order is the same).
#[test]
fn side_rows_resume_bitwise_and_are_trained_on() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = make_teacher(tmp.path());
    let side = Some(SideRows {
        from: 20,
        per_micro: 3,
    });
    let go = |side, rows, dir: &str, stop, resume| {
        run_side(
            config(),
            side,
            rows,
            &model_dir,
            &tmp.path().join(dir),
            stop,
            resume,
        )
        .0
    };
    let straight = go(side, 30, "a", None, false);
    let _ = go(side, 30, "b", Some(4), false);
    let resumed = go(side, 30, "b", None, true);
    for ((n, a), (_, b)) in straight.iter().zip(&resumed) {
        assert!(
            a.equal(b),
            "{n} differs after resume with side rows (max abs {})",
            max_abs_diff(a, b)
        );
    }
    // The same main stream without the side rows.
    let plain = go(None, 20, "c", None, false);
    let differs = straight
        .iter()
        .zip(&plain)
        .filter(|((_, a), (_, b))| !a.equal(b))
        .count();
    assert!(differs > 0, "the side rows changed no weight");
}

/// A corrupt (NaN) offline teacher signal: every step is skipped; after
/// `max_bad_steps` in a row the weights roll back to the last checkpoint and
/// training moves on past the bad batches instead of looping; with no
/// checkpoint at all it stops with an error that says so.
#[test]
fn non_finite_steps_are_skipped_and_rolled_back() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = make_teacher(tmp.path());
    let teacher = TaskModel::load(&model_dir, Task::Classification, None, Device::Cpu).unwrap();
    let tok = TextTokenizer::load(&model_dir, teacher.config(), 16).unwrap();
    let good = data(&tok);
    let n = good.examples.len() as i64;
    let signal = tch::no_grad(|| {
        let refs: Vec<_> = good.examples.iter().collect();
        teacher
            .forward_t(
                &tok.batch(
                    &refs,
                    distill_worker::tokenize::Padding::Dynamic,
                    Device::Cpu,
                ),
                Default::default(),
                false,
            )
            .output
    });
    let bad = TrainData {
        examples: good.examples.clone(),
        labels: good.labels.clone(),
        teacher_output: Some(Tensor::full([n, 2], f64::NAN, (Kind::Float, Device::Cpu))),
    };
    let good = TrainData {
        teacher_output: Some(signal),
        ..good
    };
    let cfg = config_offline();

    // No checkpoint yet: a clear error, not a hang or silent corruption.
    let mut s = student(&teacher);
    let mut tr = Trainer::new(
        &mut s,
        None,
        Some(32),
        &tok,
        cfg.clone(),
        tmp.path().join("none"),
    )
    .unwrap();
    let e = tr
        .train_until(6, &bad, None, |_| {})
        .unwrap_err()
        .to_string();
    assert!(e.contains("no checkpoint to roll back to"), "{e}");
    drop(tr);

    // Two good steps (checkpoint at step 2), then the bad signal.
    let mut s = student(&teacher);
    let mut tr = Trainer::new(&mut s, None, Some(32), &tok, cfg, tmp.path().join("ck")).unwrap();
    tr.train_until(2, &good, None, |_| {}).unwrap();
    drop(tr);
    let at_checkpoint = weights(&s);
    let mut tr = Trainer::new(
        &mut s,
        None,
        Some(32),
        &tok,
        config_offline(),
        tmp.path().join("ck"),
    )
    .unwrap();
    assert!(tr.resume().unwrap());
    let mut logs = vec![];
    tr.train_until(7, &bad, None, |l| logs.push(l.clone()))
        .unwrap();
    assert_eq!(tr.step, 7, "the cursor moved past the bad batches");
    drop(tr);
    assert_eq!(logs.len(), 5, "steps 2..7 each ran once: no rollback loop");
    assert!(logs.iter().all(|l| l.skipped));
    for ((n, a), (_, b)) in weights(&s).iter().zip(&at_checkpoint) {
        assert!(a.equal(b), "{n} changed although every step was skipped");
    }
}

fn config_offline() -> TrainConfig {
    let mut cfg = config();
    cfg.weights = [
        TermWeight::Fixed(1.0),
        TermWeight::Fixed(1.0),
        TermWeight::Fixed(0.0),
        TermWeight::Fixed(0.0),
        TermWeight::Fixed(0.0),
    ];
    cfg.checkpoint_every = 0;
    cfg
}

/// bf16 autocast on the CPU: inside the region matmuls run in bf16 and the
/// state is restored afterwards; training under it keeps fp32 master
/// weights, its losses track the fp32 run closely without being identical
/// (the reduced-precision path really ran), and nothing goes non-finite.
#[test]
fn bf16_autocast_trains_with_fp32_master_weights() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let a = Tensor::randn([8, 8], (Kind::Float, Device::Cpu));
    assert!(!is_enabled(Device::Cpu));
    let inside = autocast(Device::Cpu, Reduced::Bf16, || {
        (is_enabled(Device::Cpu), a.matmul(&a).kind())
    })
    .unwrap();
    assert_eq!(inside, (true, Kind::BFloat16));
    assert!(!is_enabled(Device::Cpu), "restored on exit");
    assert_eq!(a.matmul(&a).kind(), Kind::Float);

    let tmp = tempfile::tempdir().unwrap();
    let model_dir = make_teacher(tmp.path());
    let (w32, l32) = run_with(
        config(),
        &model_dir,
        &tmp.path().join("fp32"),
        Some(4),
        false,
    );
    let bf16 = TrainConfig {
        precision: Some(Reduced::Bf16),
        ..config()
    };
    let (w16, l16) = run_with(bf16, &model_dir, &tmp.path().join("bf16"), Some(4), false);
    for (n, t) in &w16 {
        assert_eq!(t.kind(), Kind::Float, "{n}: master weights stay fp32");
    }
    let (a, b) = (l32[0].loss, l16[0].loss);
    assert!(
        a != b,
        "bf16 loss {b} is bitwise the fp32 loss: autocast did not run"
    );
    assert!(((a - b) / a).abs() < 0.05, "fp32 loss {a} vs bf16 {b}");
    assert!(w32.iter().zip(&w16).any(|((_, x), (_, y))| !x.equal(y)));
}
