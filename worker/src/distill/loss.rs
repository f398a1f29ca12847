//! The distillation loss terms. Each takes plain tensors and returns a scalar
//! tensor (differentiable in the student's tensors); weighting and schedules
//! live in `schedule.rs`.
//!
//! ```text
//! task CE      CE(y, s)            mean over labelled rows (label −100 = none); 0 if no row is labelled
//! KD           T² · KL(softmax(t/T) ‖ softmax(s/T))   summed over classes, mean over rows
//! attention    mean over mapped pairs of  Σ m (A_s − A_t)² / Σ m
//!              (m: real query × real key positions, broadcast over heads; when head
//!               counts differ, both sides are first averaged over heads)
//! hidden       mean over mapped pairs of  Σ m ‖W·h_s + b − h_t‖² / (Σ m · H_t)
//!              (m: real tokens; W, b a learned projection when widths differ, else identity)
//! embedding    MSE(e_s, e_t) (mean over elements) and 1 − cos(e_s, e_t) (mean over rows)
//! ```

use tch::{Kind, Reduction, Tensor};

/// Gold labels marked with this id carry no label (unlabelled rows).
pub const IGNORE_LABEL: i64 = -100;

pub fn task_ce(logits: &Tensor, labels: &Tensor) -> Tensor {
    let labelled = labels.ne(IGNORE_LABEL).sum(Kind::Int64).int64_value(&[]);
    if labelled == 0 {
        return logits.sum(Kind::Float) * 0.0;
    }
    logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(
        labels,
        None,
        Reduction::Mean,
        IGNORE_LABEL,
        0.0,
    )
}

pub fn kd_kl(student_logits: &Tensor, teacher_logits: &Tensor, temperature: f64) -> Tensor {
    let s = (student_logits.to_kind(Kind::Float) / temperature).log_softmax(-1, Kind::Float);
    let t = (teacher_logits.to_kind(Kind::Float) / temperature).log_softmax(-1, Kind::Float);
    let kl = (t.exp() * (&t - &s))
        .sum_dim_intlist(-1, false, Kind::Float)
        .mean(Kind::Float);
    kl * (temperature * temperature)
}

/// `mask`: `[batch, seq]` 1 for real tokens.
pub fn attention_mse(student: &[Tensor], teacher: &[Tensor], mask: &Tensor) -> Tensor {
    assert_eq!(
        student.len(),
        teacher.len(),
        "one teacher attention map per student map"
    );
    let m = mask.to_kind(Kind::Float);
    let pair = m.unsqueeze(-1) * m.unsqueeze(1); // [b, s, s]
    let pair = pair.unsqueeze(1); // [b, 1, s, s]
    let mut total = Tensor::zeros([], (Kind::Float, mask.device()));
    for (s, t) in student.iter().zip(teacher) {
        let (s, t) = if s.size()[1] != t.size()[1] {
            (
                s.mean_dim(1, true, Kind::Float),
                t.mean_dim(1, true, Kind::Float),
            )
        } else {
            (s.to_kind(Kind::Float), t.to_kind(Kind::Float))
        };
        let heads = s.size()[1] as f64;
        let se = (s - t).square() * &pair;
        total = total + se.sum(Kind::Float) / (pair.sum(Kind::Float) * heads);
    }
    total / student.len().max(1) as f64
}

/// `student` already projected to the teacher's width.
pub fn hidden_mse(student: &[Tensor], teacher: &[Tensor], mask: &Tensor) -> Tensor {
    assert_eq!(
        student.len(),
        teacher.len(),
        "one teacher hidden state per student state"
    );
    let m = mask.to_kind(Kind::Float).unsqueeze(-1);
    let mut total = Tensor::zeros([], (Kind::Float, mask.device()));
    for (s, t) in student.iter().zip(teacher) {
        let width = t.size()[2] as f64;
        let se = (s.to_kind(Kind::Float) - t.to_kind(Kind::Float)).square() * &m;
        total = total + se.sum(Kind::Float) / (m.sum(Kind::Float) * width);
    }
    total / student.len().max(1) as f64
}

pub fn embedding_mse(student: &Tensor, teacher: &Tensor) -> Tensor {
    student
        .to_kind(Kind::Float)
        .mse_loss(&teacher.to_kind(Kind::Float), Reduction::Mean)
}

pub fn embedding_cosine(student: &Tensor, teacher: &Tensor) -> Tensor {
    let cos = Tensor::cosine_similarity(
        &student.to_kind(Kind::Float),
        &teacher.to_kind(Kind::Float),
        -1,
        1e-8,
    );
    (cos.neg() + 1.0).mean(Kind::Float)
}
