//! The language-model distillation losses (worker/src/distill/lm_loss.rs)
//! against an independent float64 PyTorch computation
//! (scripts/parity/lm_loss_reference.py), plus their limits: forward KL over
//! the whole vocabulary is the usual KL, every loss is zero for a student
//! equal to the teacher (on the support it is compared on) and positive
//! otherwise, and gradients flow.

mod common;

use common::*;
use distill_worker::distill::lm_loss::*;
use distill_worker::model::weights::{read_tensors, write_safetensors};
use tch::{Device, Kind, Tensor};

fn inputs(seed: i64, n: i64, v: i64, k: i64) -> (Tensor, Tensor, Tensor, Tensor, Tensor) {
    tch::manual_seed(seed);
    let student = Tensor::randn([n, v], (Kind::Float, Device::Cpu)) * 2.0;
    let teacher = Tensor::randn([n, v], (Kind::Float, Device::Cpu)) * 3.0;
    let full = teacher.log_softmax(-1, Kind::Float);
    let (logp, ids) = full.topk(k, -1, true, true);
    let targets = Tensor::randint(v, [n], (Kind::Int64, Device::Cpu));
    (student, ids, logp, targets, full)
}

#[test]
fn losses_match_pytorch() {
    let tmp = tempfile::tempdir().unwrap();
    for (seed, t, beta, k) in [(1, 1.0, 0.5, 8), (2, 2.0, 0.1, 16), (3, 0.7, 0.9, 3)] {
        let (s, ids, logp, targets, _) = inputs(seed, 9, 40, k);
        let input = tmp.path().join(format!("in{seed}.safetensors"));
        let output = tmp.path().join(format!("out{seed}.safetensors"));
        write_safetensors(
            &input,
            &[
                ("student".into(), s.shallow_clone()),
                ("ids".into(), ids.shallow_clone()),
                ("logp".into(), logp.shallow_clone()),
                ("targets".into(), targets.shallow_clone()),
                ("temperature".into(), Tensor::from(t as f32)),
                ("beta".into(), Tensor::from(beta as f32)),
            ],
        )
        .unwrap();
        let st = std::process::Command::new(python())
            .arg(workspace().join("scripts/parity/lm_loss_reference.py"))
            .arg(&input)
            .arg(&output)
            .status()
            .unwrap();
        assert!(st.success());
        let r = read_tensors(&[output]).unwrap();
        let ours = [
            ("forward_kl", forward_kl(&s, &ids, &logp, t)),
            ("reverse_kl", reverse_kl(&s, &ids, &logp, t)),
            ("generalized_jsd", generalized_jsd(&s, &ids, &logp, beta, t)),
            ("sequence_ce", sequence_ce(&s, &targets)),
        ];
        for (name, v) in ours {
            let (a, b) = (v.double_value(&[]), r[name].double_value(&[]));
            assert!(
                (a - b).abs() < 1e-5 * b.abs().max(1.0),
                "{name} (seed {seed}): {a} vs reference {b}"
            );
            assert!(a > 0.0, "{name}: {a}");
        }
    }
}

#[test]
fn limits_and_gradients() {
    let (s, _, _, _, full) = inputs(4, 6, 30, 30);
    // k = vocab, T = 1: forward KL is the whole KL(teacher || student).
    let (logp, ids) = full.topk(30, -1, true, true);
    let whole = (full.exp() * (&full - s.log_softmax(-1, Kind::Float)))
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float);
    let d = (forward_kl(&s, &ids, &logp, 1.0) - whole)
        .abs()
        .double_value(&[]);
    assert!(
        d < 1e-5,
        "forward KL over the whole vocabulary differs from KL by {d}"
    );
    // A student equal to the teacher: every divergence is zero, at any k
    // and temperature (both sides coarsened alike).
    let teacher_logits = full.shallow_clone();
    let (logp8, ids8) = full.topk(8, -1, true, true);
    for (name, v) in [
        (
            "forward_kl",
            forward_kl(&teacher_logits, &ids8, &logp8, 2.0),
        ),
        (
            "reverse_kl",
            reverse_kl(&teacher_logits, &ids8, &logp8, 2.0),
        ),
        (
            "generalized_jsd",
            generalized_jsd(&teacher_logits, &ids8, &logp8, 0.5, 2.0),
        ),
        (
            "forward_kl (k = vocab)",
            forward_kl(&teacher_logits, &ids, &logp, 1.0),
        ),
    ] {
        assert!(
            v.double_value(&[]).abs() < 1e-5,
            "{name} of the teacher itself: {}",
            v.double_value(&[])
        );
    }
    // Gradients reach the student's logits and are finite.
    let x = s.set_requires_grad(true);
    let loss = forward_kl(&x, &ids8, &logp8, 2.0)
        + reverse_kl(&x, &ids8, &logp8, 2.0)
        + generalized_jsd(&x, &ids8, &logp8, 0.5, 2.0);
    loss.backward();
    let g = x.grad();
    assert!(
        g.isfinite().all().int64_value(&[]) == 1
            && g.abs().sum(Kind::Float).double_value(&[]) > 0.0
    );
}

#[test]
fn response_rows_select_the_positions_that_predict_response_tokens() {
    // Two sequences: prompt [10, 11] + response [12, 13]; prompt [20] +
    // response [21] + padding.
    let ids = Tensor::from_slice(&[10i64, 11, 12, 13, 20, 21, 0, 0]).view([2, 4]);
    let resp = Tensor::from_slice(&[0i64, 0, 1, 1, 0, 1, 0, 0]).view([2, 4]);
    // logits[b, j, :] = one-hot-ish marker b*10 + j at column 0.
    let logits = Tensor::zeros([2, 4, 3], (Kind::Float, Device::Cpu));
    for b in 0..2 {
        for j in 0..4 {
            let _ = logits.get(b).get(j).get(0).fill_((b * 10 + j) as f64);
        }
    }
    let (rows, targets) = response_rows(&logits, &ids, &resp);
    let marks: Vec<f64> = Vec::try_from(rows.select(1, 0)).unwrap();
    assert_eq!(marks, vec![1.0, 2.0, 10.0]);
    assert_eq!(Vec::<i64>::try_from(targets).unwrap(), vec![12, 13, 21]);
}
