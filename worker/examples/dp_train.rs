//! Benchmark: data-parallel KD training throughput with distill's
//! `Trainer` (the code the cluster runs: gradients summed by Gloo while
//! backward runs, word-embedding rows reduced only where the batch has
//! tokens; with `after`, every sum after backward, as on NCCL).
//! Teacher all-MiniLM-L6-v2 with a 2-class head (online), student L3-H384
//! initialised from teacher layers 1, 3, 5; global batch 32 of real
//! rotten-tomatoes reviews (max 64 tokens), split over the ranks; loss
//! CE + T²·KL (T = 2); clip 1.0, AdamW. One libtorch thread per rank.
//! Rank 0 prints one JSON line: samples per second over the steps after
//! two warm-up steps, and the first bytes of the training state's digest
//! (the same for `overlap` and `after`: they sum the same numbers). The PyTorch DDP peer is scripts/bench/dp_train_torch.py;
//! scripts/bench/dp_train.sh runs both at world sizes 1 and 2.
//!
//!   dp_train RANK WORLD PORT MODEL_DIR DATA.jsonl [STEPS] [overlap|after]

use distill_worker::collective::{Group, Rendezvous};
use distill_worker::data::{read_examples, Fields};
use distill_worker::distill::schedule::{Decay, TermWeight};
use distill_worker::distill::train::{TrainConfig, TrainData, Trainer};
use distill_worker::model::student::{derive_config, init_from_teacher, StudentShape};
use distill_worker::model::{Task, TaskModel};
use distill_worker::tokenize::TextTokenizer;
use std::time::{Duration, Instant};
use tch::Device;

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let (rank, world, port): (u32, u32, u16) = (a[1].parse()?, a[2].parse()?, a[3].parse()?);
    let model_dir = std::path::PathBuf::from(&a[4]);
    let data = std::path::PathBuf::from(&a[5]);
    let steps: u64 = a.get(6).map(|s| s.parse()).transpose()?.unwrap_or(20);
    let overlap = match a.get(7).map(String::as_str) {
        None | Some("overlap") => true,
        Some("after") => false,
        Some(other) => anyhow::bail!("expected overlap or after, not {other:?}"),
    };
    tch::set_num_threads(1);
    let labels = vec!["rotten".to_string(), "fresh".to_string()];
    let teacher = TaskModel::load(
        &model_dir,
        Task::Classification,
        Some(labels.clone()),
        Device::Cpu,
    )?;
    let cfg = derive_config(teacher.config(), &StudentShape::Preset("L3-H384".into()))?;
    let mut student = TaskModel::new(&cfg, Task::Classification, labels, Device::Cpu)?;
    init_from_teacher(&mut student, &teacher, &[1, 3, 5])?;
    let tok = TextTokenizer::load(&model_dir, teacher.config(), 64)?;
    let ex = read_examples(&data, &Fields::default())?;
    let texts: Vec<&str> = ex.iter().map(|e| e.text.as_str()).collect();
    let train = TrainData {
        examples: tok.encode(&texts, None)?,
        labels: ex
            .iter()
            .map(|e| (e.label.as_deref() == Some("fresh")) as i64)
            .collect(),
        teacher_output: None,
    };
    let fixed = |w| TermWeight::Fixed(w);
    let config = TrainConfig {
        total_steps: steps + 2,
        batch_size: 32,
        grad_accum: 1,
        learning_rate: 5e-5,
        warmup_steps: 0,
        decay: Decay::Linear,
        weight_decay: 0.01,
        grad_clip: 1.0,
        seed: 1,
        eval_every: 0,
        checkpoint_every: u64::MAX,
        weights: [fixed(1.0), fixed(1.0), fixed(0.0), fixed(0.0), fixed(0.0)],
        temperature: (2.0, 2.0),
        layer_map: vec![1, 3, 5],
        max_bad_steps: 3,
        precision: None,
    };
    let ckpt = tempfile::tempdir()?;
    let mut tr = Trainer::new(
        &mut student,
        Some(&teacher),
        None,
        &tok,
        config,
        ckpt.path().to_path_buf(),
    )?;
    if !overlap {
        tr.sum_after_backward();
    }
    if world > 1 {
        tr.data_parallel(Group::join(&Rendezvous {
            host: "127.0.0.1".into(),
            port,
            host_store: true,
            prefix: "dp-bench/gen-1/".into(),
            bind_host: "127.0.0.1".into(),
            rank,
            world,
            timeout: Duration::from_secs(300),
            backend: distill_worker::collective::Backend::Gloo,
        })?)?;
    }
    // Timed between the same point of step 1 and of the last step:
    // `steps` whole steps (the final checkpoint write is left out).
    let (mut started, mut ended) = (None, None);
    tr.train(&train, None, |l| {
        if l.step == 1 {
            started = Some(Instant::now());
        }
        if l.step == steps + 1 {
            ended = Some(Instant::now());
        }
    })?;
    let secs = match (started, ended) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => anyhow::bail!("too few steps to time"),
    };
    if rank == 0 {
        // The training state's digest: equal for equal weights and moments.
        let digest: String = tr.state_digest()?[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        println!(
            "{}",
            serde_json::json!({"impl": if overlap { "distill" } else { "distill-after" }, "world": world, "steps": steps,
                "samples_per_second": (steps * 32) as f64 / secs, "seconds": secs,
                "state": digest})
        );
    }
    Ok(())
}
