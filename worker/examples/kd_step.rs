//! Benchmark: one knowledge-distillation training step, teacher online.
//! Teacher all-MiniLM-L6-v2 with a 2-class head, student L3-H384 initialised
//! from it; batch 32 of real rotten-tomatoes reviews padded to 64 tokens;
//! loss = CE + T²·KL (T = 2); backward, grad-norm clip 1.0, AdamW update.
//! Prints one JSON line: median seconds per step over `--steps` after warmup.
//! The PyTorch peer is scripts/bench/kd_step_torch.py; scripts/bench/kd_step.sh runs both.
//!
//!   cargo run --release -p distill-worker --features bench --example kd_step -- MODEL_DIR DATA.jsonl [STEPS] [THREADS] [DEVICE] [PRECISION]
//!
//! DEVICE is `cpu` (default) or `cuda[:N]`; PRECISION `fp32` (default) or
//! `bf16` (forward passes under autocast, as the trainer does). On CUDA the
//! phases are timed with a device synchronisation at each boundary.

use distill_worker::autocast::{self, Reduced};
use distill_worker::data::{read_examples, Fields};
use distill_worker::distill::adamw::{clip_grad_norm, gradients, AdamW};
use distill_worker::distill::loss::{kd_kl, task_ce};
use distill_worker::model::student::{derive_config, init_from_teacher, StudentShape};
use distill_worker::model::{Outputs, Task, TaskModel};
use distill_worker::tokenize::{Padding, TextTokenizer};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model_dir = std::path::PathBuf::from(&args[1]);
    let data = std::path::PathBuf::from(&args[2]);
    let steps: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(10);
    let threads: i32 = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(2);
    tch::set_num_threads(threads);
    let device = distill_worker::device::parse_device(args.get(5).map_or("cpu", |s| s.as_str()))?;
    let precision = match args.get(6).map_or("fp32", |s| s.as_str()) {
        "fp32" => None,
        "bf16" => Some(Reduced::Bf16),
        other => anyhow::bail!("precision {other:?}: expected fp32 or bf16"),
    };
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    tch::manual_seed(0);
    let labels = vec!["rotten".to_string(), "fresh".to_string()];
    let teacher = TaskModel::load(
        &model_dir,
        Task::Classification,
        Some(labels.clone()),
        device,
    )?;
    let cfg = derive_config(teacher.config(), &StudentShape::Preset("L3-H384".into()))?;
    let mut student = TaskModel::new(&cfg, Task::Classification, labels, device)?;
    init_from_teacher(&mut student, &teacher, &[1, 3, 5])?;
    let tok = TextTokenizer::load(&model_dir, teacher.config(), 64)?;
    let ex = read_examples(&data, &Fields::default())?;
    let texts: Vec<&str> = ex.iter().take(32).map(|e| e.text.as_str()).collect();
    let enc = tok.encode(&texts, None)?;
    let refs: Vec<_> = enc.iter().collect();
    let batch = tok.batch(&refs, Padding::Fixed, device);
    let gold = Tensor::from_slice(
        &ex.iter()
            .take(32)
            .map(|e| (e.label.as_deref() == Some("fresh")) as i64)
            .collect::<Vec<_>>(),
    )
    .to_device(device);
    let mut params: Vec<(String, Tensor)> = student.vs.variables().into_iter().collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = AdamW::new(&params, 0.01);
    let mut times = vec![];
    // Per-phase wall times: teacher forward, student forward + loss,
    // backward, clip + AdamW (CPU ops are synchronous; CUDA is synchronised).
    let mut phases: [Vec<f64>; 4] = Default::default();
    for i in 0..steps + 2 {
        let t0 = Instant::now();
        let t_logits = autocast::maybe(device, precision, || {
            tch::no_grad(|| teacher.forward_t(&batch, Outputs::default(), false).output)
        })?
        .to_kind(Kind::Float);
        sync();
        let t1 = Instant::now();
        let s_logits = autocast::maybe(device, precision, || {
            student.forward_t(&batch, Outputs::default(), true).output
        })?
        .to_kind(Kind::Float);
        let loss = task_ce(&s_logits, &gold) + kd_kl(&s_logits, &t_logits, 2.0);
        sync();
        let t2 = Instant::now();
        let mut grads = gradients(&loss, &params);
        sync();
        let t3 = Instant::now();
        clip_grad_norm(&mut grads, 1.0);
        opt.step(&params, &grads, 5e-5);
        let _ = loss.double_value(&[]);
        let t4 = Instant::now();
        if i >= 2 {
            times.push((t4 - t0).as_secs_f64());
            for (p, (a, b)) in phases
                .iter_mut()
                .zip([(t0, t1), (t1, t2), (t2, t3), (t3, t4)])
            {
                p.push((b - a).as_secs_f64());
            }
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let [a, b, c, d] = &mut phases;
    println!(
        "{}",
        serde_json::json!({"impl": "distill", "median_step_seconds": median(&mut times), "steps": steps, "threads": threads,
            "device": format!("{device:?}"), "precision": args.get(6).map_or("fp32", |s| s.as_str()),
            "phases": {"teacher_forward": median(a), "student_forward_loss": median(b), "backward": median(c), "clip_adamw": median(d)}})
    );
    Ok(())
}
