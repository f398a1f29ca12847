//! Decoder quantization benchmark (scripts/bench/decoder_quant.sh): for
//! fp32 and each quantization scheme, the perplexity on held-out texts, the
//! weights' bytes in memory, prefill ms at batch 1 and decode tokens/s at
//! batch 1, with ratios to fp32 measured in the same run. One JSON line per
//! variant.
//!   decoder_quant MODEL_DIR TEXTS_JSONL N_TEXTS THREADS

use distill_worker::model::decoder::generate::{generate, GenerateOptions};
use distill_worker::model::decoder::{DecoderModel, KvCache, Logits};
use distill_worker::quant::Scheme;
use std::io::BufRead;
use std::time::Instant;
use tch::{Device, Tensor};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().collect();
    let dir = std::path::PathBuf::from(&a[1]);
    let n: usize = a[3].parse()?;
    tch::set_num_threads(a[4].parse()?);
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut texts = vec![];
    for line in std::io::BufReader::new(std::fs::File::open(&a[2])?)
        .lines()
        .take(n)
    {
        let v: serde_json::Value = serde_json::from_str(&line?)?;
        let ids = tok
            .encode(v["text"].as_str().unwrap(), true)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        texts.push(
            ids.get_ids()
                .iter()
                .map(|&x| x as i64)
                .collect::<Vec<i64>>(),
        );
    }
    let prompts: Vec<Vec<i64>> = texts.iter().take(2).cloned().collect();
    let variants: Vec<Option<Scheme>> = vec![
        None,
        Some(Scheme::Bf16),
        Some(Scheme::Int8Dynamic),
        Some(Scheme::Int8WeightOnly),
        Some(Scheme::Int4 { group_size: 32 }),
    ];
    for v in variants {
        let mut model = DecoderModel::load(&dir, Device::Cpu, Some(tch::Kind::Float))?;
        if let Some(s) = v {
            model.quantize(s)?;
        }
        let t0 = Instant::now();
        let ppl = model.perplexity(&texts, 8);
        let ppl_secs = t0.elapsed().as_secs_f64();
        let mut pre = vec![];
        for p in texts.iter().take(5) {
            let ids = Tensor::from_slice(p).view([1, -1]);
            let pos = Tensor::arange(p.len() as i64, (tch::Kind::Int64, Device::Cpu)).view([1, -1]);
            let t0 = Instant::now();
            tch::no_grad(|| {
                let mut cache = KvCache::new(&model, 1, p.len() as i64 + 1);
                model.forward(&ids, &pos, None, Some(&mut cache), Logits::Last, false)
            });
            pre.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
        pre.sort_by(|x, y| x.total_cmp(y));
        let opts = GenerateOptions {
            max_new_tokens: 24,
            batch_size: 1,
            ..Default::default()
        };
        let t0 = Instant::now();
        let g = generate(&model, None, &prompts, &opts, &mut |_, _| {})?;
        let toks: usize = g.iter().map(|x| x.ids.len()).sum();
        println!(
            "{}",
            serde_json::json!({
                "variant": v.map(|s| s.name()).unwrap_or("fp32"),
                "perplexity": ppl, "texts": texts.len(),
                "tokens": texts.iter().map(|t| t.len() - 1).sum::<usize>(),
                "perplexity_seconds": ppl_secs,
                "weight_mb": model.weight_bytes() as f64 / 1048576.0,
                "prefill_ms_batch1": pre[pre.len() / 2],
                "decode_tokens_per_s_batch1": toks as f64 / t0.elapsed().as_secs_f64(),
            })
        );
    }
    Ok(())
}
