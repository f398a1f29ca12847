//! Each distillation loss term (`distill::loss`) against an independent
//! PyTorch reference (`scripts/parity/loss_reference.py`, torch.nn.functional in
//! float64) on the same random tensors, within 1e-6; plus the edge cases the
//! training loop relies on: CE with no labelled row, KD of identical logits,
//! and padding that must not leak into the feature losses.

mod common;

use common::*;
use distill_worker::distill::loss::{
    attention_mse, embedding_cosine, embedding_mse, hidden_mse, kd_kl, task_ce, IGNORE_LABEL,
};
use distill_worker::model::weights::{read_tensors, write_safetensors};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-6;
const TEMPERATURES: [f32; 3] = [1.0, 2.0, 3.5];
const CPU: (Kind, Device) = (Kind::Float, Device::Cpu);

/// Every input of the reference comparison, generated from one seed.
struct Inputs {
    logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    /// `[2, 6]`, 1 = real token; both rows end in padding.
    mask: Tensor,
    s_att: Vec<Tensor>,
    t_att: Vec<Tensor>,
    /// Student with 2 heads mapped onto a teacher with 4.
    s_att_heads: Vec<Tensor>,
    t_att_heads: Vec<Tensor>,
    s_hid: Vec<Tensor>,
    t_hid: Vec<Tensor>,
    /// Student of width 8, projected to the teacher's 16 by `proj_w`, `proj_b`.
    s_hid_narrow: Vec<Tensor>,
    proj_w: Tensor,
    proj_b: Tensor,
    emb_s: Tensor,
    emb_t: Tensor,
}

fn attention_maps(heads: i64) -> Tensor {
    Tensor::randn([2, heads, 6, 6], CPU).softmax(-1, Kind::Float)
}

impl Inputs {
    fn new(seed: i64) -> Self {
        tch::manual_seed(seed);
        let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0]).view([2, 6]);
        Inputs {
            logits: Tensor::randn([8, 5], CPU) * 2.0,
            teacher_logits: Tensor::randn([8, 5], CPU) * 2.0,
            labels: Tensor::from_slice(&[0i64, 3, IGNORE_LABEL, 1, 4, IGNORE_LABEL, 2, 2]),
            mask,
            s_att: (0..2).map(|_| attention_maps(4)).collect(),
            t_att: (0..2).map(|_| attention_maps(4)).collect(),
            s_att_heads: (0..2).map(|_| attention_maps(2)).collect(),
            t_att_heads: (0..2).map(|_| attention_maps(4)).collect(),
            s_hid: (0..2).map(|_| Tensor::randn([2, 6, 16], CPU)).collect(),
            t_hid: (0..2).map(|_| Tensor::randn([2, 6, 16], CPU)).collect(),
            s_hid_narrow: (0..2).map(|_| Tensor::randn([2, 6, 8], CPU)).collect(),
            proj_w: Tensor::randn([16, 8], CPU) * 0.3,
            proj_b: Tensor::randn([16], CPU) * 0.1,
            emb_s: Tensor::randn([8, 16], CPU),
            emb_t: Tensor::randn([8, 16], CPU),
        }
    }

    fn save(&self, path: &Path) {
        let mut named: Vec<(String, Tensor)> = vec![
            ("logits".into(), self.logits.shallow_clone()),
            ("teacher_logits".into(), self.teacher_logits.shallow_clone()),
            ("labels".into(), self.labels.shallow_clone()),
            ("temperatures".into(), Tensor::from_slice(&TEMPERATURES)),
            ("mask".into(), self.mask.shallow_clone()),
            ("proj_w".into(), self.proj_w.shallow_clone()),
            ("proj_b".into(), self.proj_b.shallow_clone()),
            ("emb_s".into(), self.emb_s.shallow_clone()),
            ("emb_t".into(), self.emb_t.shallow_clone()),
        ];
        let lists = [
            ("s_att", &self.s_att),
            ("t_att", &self.t_att),
            ("s_att_heads", &self.s_att_heads),
            ("t_att_heads", &self.t_att_heads),
            ("s_hid", &self.s_hid),
            ("t_hid", &self.t_hid),
            ("s_hid_narrow", &self.s_hid_narrow),
        ];
        for (prefix, list) in lists {
            for (i, t) in list.iter().enumerate() {
                named.push((format!("{prefix}.{i}"), t.shallow_clone()));
            }
        }
        write_safetensors(path, &named).unwrap();
    }

    fn projected(&self) -> Vec<Tensor> {
        self.s_hid_narrow
            .iter()
            .map(|h| h.linear(&self.proj_w, Some(&self.proj_b)))
            .collect()
    }

    /// What distill computes for each term, by the reference's names.
    fn rust_terms(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        out.insert("task_ce".into(), task_ce(&self.logits, &self.labels));
        for (i, &t) in TEMPERATURES.iter().enumerate() {
            let kd = kd_kl(&self.logits, &self.teacher_logits, t as f64);
            out.insert(format!("kd.{i}"), kd);
        }
        out.insert(
            "attention".into(),
            attention_mse(&self.s_att, &self.t_att, &self.mask),
        );
        out.insert(
            "attention_heads".into(),
            attention_mse(&self.s_att_heads, &self.t_att_heads, &self.mask),
        );
        out.insert(
            "hidden".into(),
            hidden_mse(&self.s_hid, &self.t_hid, &self.mask),
        );
        out.insert(
            "hidden_proj".into(),
            hidden_mse(&self.projected(), &self.t_hid, &self.mask),
        );
        out.insert(
            "embedding_mse".into(),
            embedding_mse(&self.emb_s, &self.emb_t),
        );
        out.insert(
            "embedding_cosine".into(),
            embedding_cosine(&self.emb_s, &self.emb_t),
        );
        out
    }
}

fn run_reference(input: &Path, output: &Path) {
    let script = workspace().join("scripts/parity/loss_reference.py");
    let out = Command::new(python())
        .arg(script)
        .arg(input)
        .arg(output)
        .output()
        .expect("spawn python");
    assert!(
        out.status.success(),
        "loss_reference.py failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_term_matches_pytorch() {
    let dir = tempfile::tempdir().unwrap();
    for seed in [7, 2024] {
        let inputs = Inputs::new(seed);
        let (inp, outp) = (
            dir.path().join("in.safetensors"),
            dir.path().join("out.safetensors"),
        );
        inputs.save(&inp);
        run_reference(&inp, &outp);
        let reference = read_tensors(&[outp]).unwrap();
        let ours = inputs.rust_terms();
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            reference.keys().collect::<Vec<_>>(),
            "the reference computes exactly the terms distill does"
        );
        for (name, value) in &ours {
            let r = &reference[name];
            let d = max_abs_diff(value, r);
            assert!(
                d < TOL,
                "seed {seed}: {name} = {} but torch gives {} (|diff| = {d:e})",
                value.double_value(&[]),
                r.double_value(&[])
            );
            // A zero loss would match trivially; every term here is well away from it.
            assert!(
                r.double_value(&[]) > 1e-3,
                "seed {seed}: {name} is degenerate"
            );
        }
    }
}

#[test]
fn task_ce_without_labels_is_zero_and_differentiable() {
    tch::manual_seed(3);
    let logits = Tensor::randn([4, 5], CPU).set_requires_grad(true);
    let labels = Tensor::from_slice(&[IGNORE_LABEL; 4]);
    let loss = task_ce(&logits, &labels);
    assert_eq!(loss.size(), Vec::<i64>::new(), "a scalar");
    assert_eq!(loss.double_value(&[]), 0.0);
    assert!(loss.requires_grad(), "still part of the graph");
    loss.backward();
    let grad = logits.grad();
    assert!(grad.defined(), "backward reaches the logits");
    assert_eq!(grad.abs().max().double_value(&[]), 0.0);

    // With labels the gradient flows only through the labelled rows.
    let logits = Tensor::randn([4, 5], CPU).set_requires_grad(true);
    let labels = Tensor::from_slice(&[1i64, IGNORE_LABEL, 3, IGNORE_LABEL]);
    task_ce(&logits, &labels).backward();
    let row_norm = logits.grad().abs().sum_dim_intlist(-1, false, Kind::Float);
    let rows: Vec<f32> = Vec::try_from(&row_norm).unwrap();
    assert!(
        rows[0] > 0.0 && rows[2] > 0.0,
        "labelled rows get gradient: {rows:?}"
    );
    assert!(
        rows[1] == 0.0 && rows[3] == 0.0,
        "unlabelled rows get none: {rows:?}"
    );
}

#[test]
fn kd_is_zero_for_identical_logits_and_positive_otherwise() {
    tch::manual_seed(5);
    let logits = Tensor::randn([8, 5], CPU) * 3.0;
    for t in [1.0, 2.0, 4.0] {
        let same = kd_kl(&logits, &logits.copy(), t).double_value(&[]);
        assert!(same.abs() < 1e-12, "T={t}: KD(s, s) = {same}");
        let other = kd_kl(&logits, &(&logits + Tensor::randn([8, 5], CPU)), t);
        assert!(
            other.double_value(&[]) > 0.0,
            "T={t}: KD of different logits"
        );
    }
    // KD is differentiable in the student only.
    let student = logits.copy().set_requires_grad(true);
    let teacher = Tensor::randn([8, 5], CPU);
    kd_kl(&student, &teacher, 2.0).backward();
    assert!(student.grad().abs().max().double_value(&[]) > 0.0);
}

/// `x` with noise of size `scale` added where `keep` is 0.
fn perturb_outside(x: &Tensor, keep: &Tensor, scale: f64) -> Tensor {
    let noise = Tensor::randn(x.size(), CPU) * scale;
    x + noise * (keep.ones_like() - keep)
}

#[test]
fn feature_losses_ignore_padded_positions() {
    let inputs = Inputs::new(11);
    let m = inputs.mask.to_kind(Kind::Float);
    let pair = (m.unsqueeze(-1) * m.unsqueeze(1)).unsqueeze(1); // [b, 1, q, k]
    let token = m.unsqueeze(-1); // [b, s, 1]
    assert!(
        pair.sum(Kind::Float).double_value(&[]) < 72.0,
        "the mask really pads something"
    );

    let cases = [
        (&inputs.s_att, &inputs.t_att, true),
        (&inputs.s_att_heads, &inputs.t_att_heads, true),
        (&inputs.s_hid, &inputs.t_hid, false),
    ];
    for (i, (s, t, is_attention)) in cases.into_iter().enumerate() {
        let loss = |s: &[Tensor], t: &[Tensor]| {
            let l = if is_attention {
                attention_mse(s, t, &inputs.mask)
            } else {
                hidden_mse(s, t, &inputs.mask)
            };
            l.double_value(&[])
        };
        let keep = if is_attention { &pair } else { &token };
        let before = loss(s, t);
        let s2: Vec<Tensor> = s.iter().map(|x| perturb_outside(x, keep, 100.0)).collect();
        let t2: Vec<Tensor> = t.iter().map(|x| perturb_outside(x, keep, 100.0)).collect();
        assert!(
            max_abs_diff(&s2[0], &s[0]) > 1.0,
            "case {i}: the perturbation changes the inputs"
        );
        let after = loss(&s2, &t2);
        assert!(
            (before - after).abs() < 1e-9,
            "case {i}: padding changed the loss from {before} to {after}"
        );
        // ...while the same perturbation at real positions does change it.
        let s3: Vec<Tensor> = s
            .iter()
            .map(|x| x + Tensor::randn(x.size(), CPU) * keep)
            .collect();
        assert!(
            (before - loss(&s3, t)).abs() > 1e-4,
            "case {i}: real positions count"
        );
    }
}
