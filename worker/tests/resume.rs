//! Exact resume: N steps + checkpoint + fresh process state + resume + M
//! steps gives bitwise the same weights as N+M uninterrupted steps (CPU),
//! with every loss term on (task, KD, attention, hidden through a learned
//! projection) and gradient accumulation.

mod common;

use common::*;
use distill_worker::distill::loss::IGNORE_LABEL;
use distill_worker::distill::schedule::{Decay, TermWeight};
use distill_worker::distill::train::{TrainConfig, TrainData, Trainer};
use distill_worker::model::student::{derive_config, init_from_teacher, StudentShape};
use distill_worker::model::{Task, TaskModel};
use distill_worker::tokenize::TextTokenizer;
use std::path::Path;
use tch::Device;

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
        weights: [
            TermWeight::Fixed(1.0),
            TermWeight::Auto,
            TermWeight::Fixed(0.5),
            TermWeight::Auto,
            TermWeight::Fixed(0.0),
        ],
        temperature: (4.0, 1.0),
        layer_map: vec![1],
        max_bad_steps: 3,
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
    let teacher = TaskModel::load(model_dir, Task::Classification, None, Device::Cpu).unwrap();
    let tok = TextTokenizer::load(model_dir, teacher.config(), 16).unwrap();
    let d = data(&tok);
    // A fresh student with a different random state: resume must overwrite all of it.
    tch::manual_seed(if resume { 999 } else { 1 });
    let mut s = student(&teacher);
    let mut tr = Trainer::new(
        &mut s,
        Some(&teacher),
        None,
        &tok,
        config(),
        ckpt.to_path_buf(),
    )
    .unwrap();
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
    weights(&s)
}

#[test]
fn resume_is_bitwise_exact() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = tmp.path().join("teacher");
    reference(&[
        "make-random",
        model_dir.to_str().unwrap(),
        "--seed",
        "5",
        "--layers",
        "2",
        "--hidden",
        "32",
        "--heads",
        "4",
        "--intermediate",
        "64",
        "--vocab",
        "60",
        "--labels",
        "2",
    ]);
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
