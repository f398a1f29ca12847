//! Batched generation with a key/value cache.
//!
//! Prompts are sorted by length and cut into batches, so a batch pads its
//! prompts (on the left) only up to its own longest one; rows that finish
//! (an EOS id, a stop string, `max_new_tokens`) leave the batch at once —
//! their cache rows are dropped, so later steps compute only live rows.
//!
//! Greedy decoding takes the argmax. Sampling applies temperature, then
//! top-k, then top-p (transformers' order) and draws from a generator seeded
//! by (seed, prompt index): the same seed gives the same tokens whatever the
//! batch size or the order of the other prompts.

use super::{DecoderModel, KvCache, Logits};
use crate::Result;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    pub temperature: f64,
    /// 1.0: no nucleus cut.
    pub top_p: f64,
    /// 0: no top-k cut.
    pub top_k: usize,
    pub seed: u64,
}

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// `None`: greedy.
    pub sampling: Option<Sampling>,
    pub eos_token_ids: Vec<i64>,
    /// Generation stops once the decoded text contains one of these; the
    /// text is cut before it.
    pub stop: Vec<String>,
    pub batch_size: usize,
    /// Also return, for each generated token, its log-probability and the
    /// `k` most likely tokens' (temperature 1, before any cut).
    pub logprobs_top_k: Option<usize>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            max_new_tokens: 64,
            sampling: None,
            eos_token_ids: vec![],
            stop: vec![],
            batch_size: 16,
            logprobs_top_k: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Finish {
    Eos,
    Stop,
    Length,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TokenLogprobs {
    /// log p(generated token).
    pub logprob: f32,
    /// The `k` most likely tokens: (id, log p), most likely first.
    pub top: Vec<(i64, f32)>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Generated {
    /// The new token ids (an EOS that ended generation included).
    pub ids: Vec<i64>,
    /// The new text, special tokens skipped, cut before a stop string.
    pub text: String,
    pub finish: Finish,
    pub logprobs: Option<Vec<TokenLogprobs>>,
}

/// Generate for every prompt (token ids, special tokens included as the
/// caller wants them). Without a tokenizer the texts are empty and stop
/// strings cannot match. `on_progress(prompts_done, tokens_generated)` is
/// called after each batch. Results are in the prompts' order.
pub fn generate(
    model: &DecoderModel,
    tokenizer: Option<&tokenizers::Tokenizer>,
    prompts: &[Vec<i64>],
    opts: &GenerateOptions,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Generated>> {
    let index: Vec<usize> = (0..prompts.len()).collect();
    generate_indexed(model, tokenizer, prompts, &index, opts, on_progress)
}

/// [`generate`] for a part of a larger set: `index[i]` is prompt `i`'s
/// place in the whole set, which seeds its sampler, so generating the set
/// in parts (a resumed run) gives the same tokens as in one go.
pub fn generate_indexed(
    model: &DecoderModel,
    tokenizer: Option<&tokenizers::Tokenizer>,
    prompts: &[Vec<i64>],
    index: &[usize],
    opts: &GenerateOptions,
    on_progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<Generated>> {
    assert_eq!(prompts.len(), index.len(), "one index per prompt");
    if let Some(s) = &opts.sampling {
        if !(s.temperature > 0.0) {
            return Err(crate::Error::Invalid(format!(
                "temperature must be positive for sampling, found {} (omit sampling for greedy)",
                s.temperature
            )));
        }
        if !(s.top_p > 0.0 && s.top_p <= 1.0) {
            return Err(crate::Error::Invalid(format!(
                "top_p must be in (0, 1], found {}",
                s.top_p
            )));
        }
    }
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(crate::Error::Invalid(format!(
            "prompt {i} is empty (no tokens)"
        )));
    }
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| (prompts[i].len(), i));
    let mut out: Vec<Option<Generated>> = vec![None; prompts.len()];
    let (mut done, mut tokens) = (0usize, 0usize);
    for chunk in order.chunks(opts.batch_size.max(1)) {
        let batch: Vec<&[i64]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
        let seeds: Vec<usize> = chunk.iter().map(|&i| index[i]).collect();
        let results = tch::no_grad(|| generate_batch(model, tokenizer, &batch, &seeds, opts))?;
        for (&i, g) in chunk.iter().zip(results) {
            tokens += g.ids.len();
            out[i] = Some(g);
        }
        done += chunk.len();
        on_progress(done, tokens);
    }
    Ok(out.into_iter().map(|g| g.unwrap()).collect())
}

struct Row {
    /// Index into the batch.
    slot: usize,
    ids: Vec<i64>,
    logprobs: Vec<TokenLogprobs>,
    rng: Option<rand::rngs::StdRng>,
    next_pos: i64,
}

fn generate_batch(
    model: &DecoderModel,
    tokenizer: Option<&tokenizers::Tokenizer>,
    prompts: &[&[i64]],
    indices: &[usize],
    opts: &GenerateOptions,
) -> Result<Vec<Generated>> {
    let device = model.device();
    let b = prompts.len() as i64;
    let max_len = prompts.iter().map(|p| p.len()).max().unwrap() as i64;
    let capacity = max_len + opts.max_new_tokens as i64;
    let padded = prompts.iter().any(|p| p.len() as i64 != max_len);
    let pad = model.config.pad_token_id.unwrap_or(0);
    let mut ids = vec![pad; (b * max_len) as usize];
    let mut valid = vec![false; (b * capacity) as usize];
    for (r, p) in prompts.iter().enumerate() {
        let off = (max_len as usize) - p.len();
        ids[r * max_len as usize + off..(r + 1) * max_len as usize].copy_from_slice(p);
        for j in off..capacity as usize {
            valid[r * capacity as usize + j] = true;
        }
    }
    let input = Tensor::from_slice(&ids)
        .view([b, max_len])
        .to_device(device);
    let mut valid_t = Tensor::from_slice(&valid)
        .view([b, capacity])
        .to_device(device);
    let positions = DecoderModel::positions_from_mask(&valid_t.narrow(1, 0, max_len));
    let mut cache = KvCache::new(model, b, capacity);
    let kv = padded.then(|| valid_t.narrow(1, 0, max_len));
    let mut logits = model
        .forward(
            &input,
            &positions,
            kv.as_ref(),
            Some(&mut cache),
            Logits::Last,
            false,
        )
        .logits
        .unwrap()
        .squeeze_dim(1);
    let eos: HashSet<i64> = opts.eos_token_ids.iter().copied().collect();
    let mut rows: Vec<Row> = (0..prompts.len())
        .map(|r| Row {
            slot: r,
            ids: vec![],
            logprobs: vec![],
            rng: opts
                .sampling
                .as_ref()
                .map(|s| rand::rngs::StdRng::seed_from_u64(mix(s.seed, indices[r] as u64))),
            next_pos: prompts[r].len() as i64,
        })
        .collect();
    let mut results: Vec<Option<Generated>> = vec![None; prompts.len()];
    loop {
        // Choose each live row's next token.
        let next = choose(&logits, &mut rows, opts)?;
        let mut keep = vec![];
        for (slot, row) in rows.iter_mut().enumerate() {
            let tok = next[slot];
            row.ids.push(tok);
            let mut finish = None;
            if eos.contains(&tok) {
                finish = Some(Finish::Eos);
            }
            let mut text = None;
            if finish.is_none() && !opts.stop.is_empty() {
                let t = decode(tokenizer, &row.ids)?;
                if let Some(cut) = opts.stop.iter().filter_map(|s| t.find(s.as_str())).min() {
                    text = Some(t[..cut].to_string());
                    finish = Some(Finish::Stop);
                }
            }
            if finish.is_none() && row.ids.len() >= opts.max_new_tokens {
                finish = Some(Finish::Length);
            }
            match finish {
                Some(f) => {
                    let text = match text {
                        Some(t) => t,
                        None => decode(tokenizer, &row.ids)?,
                    };
                    results[row.slot] = Some(Generated {
                        ids: std::mem::take(&mut row.ids),
                        text,
                        finish: f,
                        logprobs: opts
                            .logprobs_top_k
                            .map(|_| std::mem::take(&mut row.logprobs)),
                    });
                }
                None => keep.push(slot),
            }
        }
        if keep.is_empty() {
            break;
        }
        if keep.len() < rows.len() {
            let idx = Tensor::from_slice(&keep.iter().map(|&k| k as i64).collect::<Vec<_>>())
                .to_device(device);
            cache.select_rows(&idx);
            valid_t = valid_t.index_select(0, &idx);
            let mut old: Vec<Option<Row>> =
                std::mem::take(&mut rows).into_iter().map(Some).collect();
            rows = keep.iter().map(|&k| old[k].take().unwrap()).collect();
        }
        let step_ids: Vec<i64> = rows.iter().map(|r| *r.ids.last().unwrap()).collect();
        let step_pos: Vec<i64> = rows.iter().map(|r| r.next_pos).collect();
        for r in rows.iter_mut() {
            r.next_pos += 1;
        }
        let n = rows.len() as i64;
        let input = Tensor::from_slice(&step_ids).view([n, 1]).to_device(device);
        let pos = Tensor::from_slice(&step_pos).view([n, 1]).to_device(device);
        let kv = padded.then(|| valid_t.narrow(1, 0, cache.len + 1));
        logits = model
            .forward(
                &input,
                &pos,
                kv.as_ref(),
                Some(&mut cache),
                Logits::Last,
                false,
            )
            .logits
            .unwrap()
            .squeeze_dim(1);
    }
    Ok(results.into_iter().map(|r| r.unwrap()).collect())
}

fn decode(tokenizer: Option<&tokenizers::Tokenizer>, ids: &[i64]) -> Result<String> {
    let Some(tokenizer) = tokenizer else {
        return Ok(String::new());
    };
    let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
    tokenizer
        .decode(&ids, true)
        .map_err(|e| crate::Error::Invalid(format!("decoding generated tokens: {e}")))
}

/// The next token of every live row (`logits`: `[rows, vocab]`).
fn choose(logits: &Tensor, rows: &mut [Row], opts: &GenerateOptions) -> Result<Vec<i64>> {
    let logits = logits.to_kind(Kind::Float);
    let chosen: Vec<i64> = match &opts.sampling {
        None => Vec::<i64>::try_from(logits.argmax(-1, false).to_device(tch::Device::Cpu))?,
        Some(s) => {
            let scaled = (&logits / s.temperature).to_device(tch::Device::Cpu);
            let v = scaled.size()[1] as usize;
            let flat = Vec::<f32>::try_from(scaled.reshape([-1]))?;
            rows.iter_mut()
                .enumerate()
                .map(|(r, row)| {
                    let rng = row.rng.as_mut().unwrap();
                    sample(&flat[r * v..(r + 1) * v], s, rng)
                })
                .collect()
        }
    };
    if let Some(k) = opts.logprobs_top_k {
        let lp = logits.log_softmax(-1, Kind::Float);
        let (vals, idx) = lp.topk(k as i64, -1, true, true);
        let picked = lp.gather(
            1,
            &Tensor::from_slice(&chosen)
                .to_device(lp.device())
                .unsqueeze(1),
            false,
        );
        let vals = Vec::<f32>::try_from(vals.to_device(tch::Device::Cpu).reshape([-1]))?;
        let idx = Vec::<i64>::try_from(idx.to_device(tch::Device::Cpu).reshape([-1]))?;
        let picked = Vec::<f32>::try_from(picked.to_device(tch::Device::Cpu).reshape([-1]))?;
        for (r, row) in rows.iter_mut().enumerate() {
            row.logprobs.push(TokenLogprobs {
                logprob: picked[r],
                top: (0..k).map(|j| (idx[r * k + j], vals[r * k + j])).collect(),
            });
        }
    }
    Ok(chosen)
}

/// Draw one token from temperature-scaled logits after the top-k and top-p
/// cuts.
fn sample(logits: &[f32], s: &Sampling, rng: &mut rand::rngs::StdRng) -> i64 {
    let mut cand: Vec<(usize, f32)> = logits.iter().copied().enumerate().collect();
    cand.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if s.top_k > 0 && s.top_k < cand.len() {
        cand.truncate(s.top_k);
    }
    let max = cand[0].1;
    let mut probs: Vec<f64> = cand
        .iter()
        .map(|&(_, l)| ((l - max) as f64).exp())
        .collect();
    let z: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= z);
    if s.top_p < 1.0 {
        // The smallest most-likely prefix whose mass reaches top_p.
        let mut acc = 0.0;
        let mut keep = probs.len();
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc >= s.top_p {
                keep = i + 1;
                break;
            }
        }
        probs.truncate(keep);
        let z: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= z);
    }
    let u: f64 = rng.random();
    let mut acc = 0.0;
    for (i, p) in probs.iter().enumerate() {
        acc += p;
        if u < acc {
            return cand[i].0 as i64;
        }
    }
    cand[probs.len() - 1].0 as i64
}

/// A prompt's own seed from the run's seed (splitmix64 of both).
fn mix(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
