//! Generation benchmark, distill side (scripts/bench/generate.sh runs it
//! beside scripts/bench/generate_torch.py on the same prompts): prefill time
//! for a batch of 16 prompts, and decode tokens/s at batch 1 and 16 with a
//! fixed number of new tokens (no EOS stop), greedy, fp32 (DISTILL_DTYPE=bf16:
//! bf16 weights). One JSON line.
//!   generate_bench MODEL_DIR PROMPTS_JSON NEW_TOKENS THREADS
//! DISTILL_DEVICE=cuda:0 runs on a GPU. With DISTILL_IDS=FILE it also writes
//! the greedy ids of the batch-16 run there (for a parity check).

use distill_worker::model::decoder::generate::{generate, GenerateOptions};
use distill_worker::model::decoder::{DecoderModel, KvCache, Logits};
use std::time::Instant;
use tch::Tensor;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&args[1]);
    let prompts: Vec<Vec<i64>> = serde_json::from_str(&std::fs::read_to_string(&args[2])?)?;
    let new: usize = args[3].parse()?;
    let threads: i32 = args[4].parse()?;
    tch::set_num_threads(threads);
    let device = distill_worker::device::parse_device(
        &std::env::var("DISTILL_DEVICE").unwrap_or_else(|_| "cpu".into()),
    )?;
    let kind = match std::env::var("DISTILL_DTYPE").as_deref() {
        Ok("bf16") => tch::Kind::BFloat16,
        _ => tch::Kind::Float,
    };
    let model = DecoderModel::load(&dir, device, Some(kind))?;
    // Prefill: each of the first prompts alone (batch 1), median ms.
    let mut prefill = vec![];
    for p in prompts.iter().take(8) {
        let ids = Tensor::from_slice(p).view([1, -1]).to_device(device);
        let pos = Tensor::arange(p.len() as i64, (tch::Kind::Int64, device)).view([1, -1]);
        let t0 = Instant::now();
        tch::no_grad(|| {
            let mut cache = KvCache::new(&model, 1, p.len() as i64 + 1);
            let out = model.forward(&ids, &pos, None, Some(&mut cache), Logits::Last, false);
            // Wait for the device: the time is the computation's.
            out.logits.unwrap().sum(tch::Kind::Float).double_value(&[])
        });
        prefill.push(t0.elapsed().as_secs_f64());
    }
    prefill.sort_by(|a, b| a.total_cmp(b));
    let mut out = serde_json::json!({"impl": "distill", "prefill_ms_batch1": prefill[prefill.len() / 2] * 1000.0,
        "prompt_tokens_mean": prompts.iter().map(|p| p.len()).sum::<usize>() as f64 / prompts.len() as f64});
    for batch in [1usize, 16] {
        let ps: Vec<Vec<i64>> = prompts
            .iter()
            .take(if batch == 1 { 4 } else { 16 })
            .cloned()
            .collect();
        let opts = GenerateOptions {
            max_new_tokens: new,
            eos_token_ids: vec![],
            batch_size: batch,
            ..Default::default()
        };
        let t0 = Instant::now();
        let g = generate(&model, None, &ps, &opts, &mut |_, _| {})?;
        let secs = t0.elapsed().as_secs_f64();
        let toks: usize = g.iter().map(|x| x.ids.len()).sum();
        out[format!("tokens_per_s_batch{batch}")] = (toks as f64 / secs).into();
        if batch == 16 {
            if let Ok(path) = std::env::var("DISTILL_IDS") {
                let ids: Vec<&Vec<i64>> = g.iter().map(|x| &x.ids).collect();
                std::fs::write(path, serde_json::to_string(&ids)?)?;
            }
        }
    }
    // Natural stopping at EOS, 16 prompts at once, up to 4x the new tokens:
    // the useful tokens (up to and including each row's EOS) per second.
    let opts = GenerateOptions {
        max_new_tokens: new * 4,
        eos_token_ids: model.config.eos_token_ids.clone(),
        batch_size: 16,
        ..Default::default()
    };
    let t0 = Instant::now();
    let g = generate(&model, None, &prompts, &opts, &mut |_, _| {})?;
    let secs = t0.elapsed().as_secs_f64();
    let toks: usize = g.iter().map(|x| x.ids.len()).sum();
    out["eos_tokens_per_s_batch16"] = (toks as f64 / secs).into();
    out["eos_tokens"] = toks.into();
    // Bytes of weights read per decoded token: every matrix once (the tied
    // embedding as the output projection), norms negligible.
    out["weight_bytes"] = (model.num_params() * kind.elt_size_in_bytes() as i64).into();
    out["dtype"] = format!("{kind:?}").into();
    println!("{out}");
    Ok(())
}
