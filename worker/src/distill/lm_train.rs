//! Training a decoder student on its teacher's signal: sequences (prompt +
//! the teacher's response), the teacher's top-k log-probabilities for each
//! response token, and a loss from [`super::lm_loss`] on response tokens
//! only. AdamW (our own, `adamw.rs`), linear warmup then linear decay,
//! global gradient clipping; the example order is a function of the seed.
//!
//! What this is not yet: the cluster job (`task = "causal_lm"` sharded over
//! workers, checkpoints and resume) — `distill lm-distill` runs it on one
//! machine from `distill generate --logprobs K` output.

use super::adamw::{clip_grad_norm, gradients, AdamW};
use super::lm_loss;
use crate::model::decoder::DecoderModel;
use crate::{Error, Result};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::Tensor;

/// One training sequence.
#[derive(Debug, Clone)]
pub struct LmExample {
    /// Prompt then response token ids.
    pub ids: Vec<i64>,
    /// How many of `ids` are the prompt (at least 1).
    pub prompt_len: usize,
    /// The teacher's top-k per response token: ids and log-probabilities,
    /// `k` per token, row-major (`(ids.len() - prompt_len) * k` each).
    pub topk_ids: Vec<i64>,
    pub topk_logp: Vec<f32>,
}

impl LmExample {
    /// A prompt and the teacher's generation for it, with the top-k
    /// log-probabilities `generate` returned (`logprobs_top_k`); `None`
    /// when it returned none.
    pub fn from_generation(
        prompt: &[i64],
        g: &crate::model::decoder::generate::Generated,
    ) -> Option<Self> {
        let lp = g.logprobs.as_ref()?;
        let mut ids = prompt.to_vec();
        ids.extend_from_slice(&g.ids);
        Some(LmExample {
            ids,
            prompt_len: prompt.len(),
            topk_ids: lp.iter().flat_map(|t| t.top.iter().map(|x| x.0)).collect(),
            topk_logp: lp.iter().flat_map(|t| t.top.iter().map(|x| x.1)).collect(),
        })
    }

    pub fn response_len(&self) -> usize {
        self.ids.len() - self.prompt_len
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LmLoss {
    ForwardKl,
    ReverseKl,
    Jsd {
        beta: f64,
    },
    /// Cross-entropy on the teacher's tokens only (sequence-level KD).
    SequenceCe,
}

impl std::str::FromStr for LmLoss {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "forward_kl" => LmLoss::ForwardKl,
            "reverse_kl" => LmLoss::ReverseKl,
            "jsd" => LmLoss::Jsd { beta: 0.5 },
            "sequence_ce" | "ce" => LmLoss::SequenceCe,
            other => {
                return Err(Error::Invalid(format!(
                    "loss '{other}': expected forward_kl, reverse_kl, jsd or sequence_ce"
                )))
            }
        })
    }
}

#[derive(Debug, Clone)]
pub struct LmTrainConfig {
    pub steps: u64,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub temperature: f64,
    pub loss: LmLoss,
    /// Weight of the cross-entropy on the response tokens, added to the
    /// distillation loss (0: none; ignored for `SequenceCe`).
    pub ce_weight: f64,
    pub seed: u64,
    /// Forward passes under autocast (bf16 on CPUs with the instructions
    /// for it and on GPUs); weights, gradients and the losses stay fp32.
    pub precision: Option<crate::autocast::Reduced>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LmStep {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    pub tokens: usize,
}

/// A padded batch: ids, attention mask, response mask, and the teacher's
/// top-k for the response tokens in `response_rows` order.
pub struct LmBatch {
    pub ids: Tensor,
    pub mask: Tensor,
    pub response: Tensor,
    pub topk_ids: Option<Tensor>,
    pub topk_logp: Option<Tensor>,
}

pub fn make_batch(examples: &[&LmExample], device: tch::Device) -> Result<LmBatch> {
    let b = examples.len();
    let n = examples.iter().map(|e| e.ids.len()).max().unwrap_or(0);
    let (mut ids, mut mask, mut resp) = (vec![0i64; b * n], vec![0i64; b * n], vec![0i64; b * n]);
    let mut tids = vec![];
    let mut tlp = vec![];
    let mut k = None;
    for (r, e) in examples.iter().enumerate() {
        if e.prompt_len == 0 || e.prompt_len >= e.ids.len() {
            return Err(Error::Invalid(format!(
                "a training sequence needs a prompt and a response (prompt {} of {} tokens)",
                e.prompt_len,
                e.ids.len()
            )));
        }
        for (j, &x) in e.ids.iter().enumerate() {
            ids[r * n + j] = x;
            mask[r * n + j] = 1;
            resp[r * n + j] = (j >= e.prompt_len) as i64;
        }
        if !e.topk_ids.is_empty() {
            let kk = e.topk_ids.len() / e.response_len();
            if kk * e.response_len() != e.topk_ids.len() || k.is_some_and(|k| k != kk) {
                return Err(Error::Invalid(
                    "teacher top-k: not k entries for every response token".into(),
                ));
            }
            k = Some(kk);
            tids.extend_from_slice(&e.topk_ids);
            tlp.extend_from_slice(&e.topk_logp);
        }
    }
    let shape = [b as i64, n as i64];
    let t = |v: &[i64]| Tensor::from_slice(v).view(shape).to_device(device);
    let (topk_ids, topk_logp) = match k {
        Some(k) => (
            Some(
                Tensor::from_slice(&tids)
                    .view([-1, k as i64])
                    .to_device(device),
            ),
            Some(
                Tensor::from_slice(&tlp)
                    .view([-1, k as i64])
                    .to_device(device),
            ),
        ),
        None => (None, None),
    };
    Ok(LmBatch {
        ids: t(&ids),
        mask: t(&mask),
        response: t(&resp),
        topk_ids,
        topk_logp,
    })
}

/// The loss of `model` on `batch`.
pub fn batch_loss(
    model: &DecoderModel,
    batch: &LmBatch,
    cfg: &LmTrainConfig,
) -> Result<(Tensor, usize)> {
    let logits = crate::autocast::maybe(model.device(), cfg.precision, || {
        model.forward_masked(&batch.ids, &batch.mask)
    })?;
    let (rows, targets) = lm_loss::response_rows(&logits, &batch.ids, &batch.response);
    let n = targets.size()[0] as usize;
    let ce = || lm_loss::sequence_ce(&rows, &targets);
    let need = || match (&batch.topk_ids, &batch.topk_logp) {
        (Some(i), Some(l)) => Ok((i, l)),
        _ => Err(Error::Invalid(
            "this loss needs the teacher's top-k log-probabilities (distill generate --logprobs K)"
                .into(),
        )),
    };
    let t = cfg.temperature;
    let kd = match cfg.loss {
        LmLoss::SequenceCe => return Ok((ce(), n)),
        LmLoss::ForwardKl => {
            let (i, l) = need()?;
            lm_loss::forward_kl(&rows, i, l, t)
        }
        LmLoss::ReverseKl => {
            let (i, l) = need()?;
            lm_loss::reverse_kl(&rows, i, l, t)
        }
        LmLoss::Jsd { beta } => {
            let (i, l) = need()?;
            lm_loss::generalized_jsd(&rows, i, l, beta, t)
        }
    };
    let loss = if cfg.ce_weight > 0.0 {
        kd + ce() * cfg.ce_weight
    } else {
        kd
    };
    Ok((loss, n))
}

/// Mean loss over `examples` without training (for held-out evaluation).
pub fn eval_loss(model: &DecoderModel, examples: &[LmExample], cfg: &LmTrainConfig) -> Result<f64> {
    let (mut sum, mut count) = (0.0, 0usize);
    tch::no_grad(|| -> Result<()> {
        for chunk in examples.chunks(cfg.batch_size.max(1)) {
            let refs: Vec<&LmExample> = chunk.iter().collect();
            let b = make_batch(&refs, model.device())?;
            let (l, n) = batch_loss(model, &b, cfg)?;
            sum += l.double_value(&[]) * n as f64;
            count += n;
        }
        Ok(())
    })?;
    Ok(sum / count.max(1) as f64)
}

/// Train `model` for `cfg.steps` steps; `on_step` sees every step.
pub fn train(
    model: &mut DecoderModel,
    examples: &[LmExample],
    cfg: &LmTrainConfig,
    on_step: &mut dyn FnMut(&LmStep),
) -> Result<()> {
    if examples.is_empty() {
        return Err(Error::Invalid("no training sequences".into()));
    }
    let mut params: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    let mut opt = AdamW::new(&params, cfg.weight_decay);
    let mut rng = rand::rngs::StdRng::seed_from_u64(cfg.seed);
    let mut order: Vec<usize> = vec![];
    let warmup = (cfg.steps as f64 * cfg.warmup_ratio).round() as u64;
    for step in 0..cfg.steps {
        let mut picked = vec![];
        while picked.len() < cfg.batch_size.min(examples.len()) {
            if order.is_empty() {
                order = (0..examples.len()).collect();
                order.shuffle(&mut rng);
            }
            picked.push(&examples[order.pop().unwrap()]);
        }
        let batch = make_batch(&picked, model.device())?;
        let (loss, tokens) = batch_loss(model, &batch, cfg)?;
        let mut grads = gradients(&loss, &params);
        let norm = clip_grad_norm(&mut grads, cfg.grad_clip);
        let lr = if step < warmup {
            cfg.learning_rate * (step + 1) as f64 / warmup as f64
        } else {
            cfg.learning_rate * (cfg.steps - step) as f64 / (cfg.steps - warmup).max(1) as f64
        };
        let loss_v = loss.double_value(&[]);
        if !loss_v.is_finite() {
            return Err(Error::Invalid(format!("step {step}: the loss is {loss_v}")));
        }
        opt.step(&params, &grads, lr);
        on_step(&LmStep {
            step,
            loss: loss_v,
            lr,
            grad_norm: norm,
            tokens,
        });
    }
    Ok(())
}

/// The teacher signal in a compact file: one safetensors file with
/// `tokens` (int32, every sequence's prompt then response, concatenated),
/// `offsets` (int64 `[n + 1]`, where each sequence starts), `prompt_lens`
/// (int64 `[n]`), and for the response tokens, in order, `topk_ids` (int32
/// `[r, k]`) and `topk_logp` (fp16 `[r, k]`). A response token costs
/// `k · 6 + 4` bytes (k = 32: 196 bytes; the JSON of `distill generate
/// --logprobs` took 891 bytes per response token on the demo signal). fp16 keeps log-probabilities to about
/// 3 significant digits (relative error ≤ 2⁻¹¹), well under what a KL
/// between top-k buckets resolves.
pub fn write_signal(path: &std::path::Path, examples: &[LmExample]) -> Result<()> {
    let mut tokens = vec![];
    let mut offsets = vec![0i64];
    let mut prompt_lens = vec![];
    let (mut tids, mut tlp) = (vec![], vec![]);
    let mut k = None;
    for e in examples {
        tokens.extend(e.ids.iter().map(|&x| x as i32));
        offsets.push(tokens.len() as i64);
        prompt_lens.push(e.prompt_len as i64);
        let kk = e.topk_ids.len() / e.response_len().max(1);
        if e.topk_ids.is_empty()
            || kk * e.response_len() != e.topk_ids.len()
            || k.is_some_and(|k| k != kk)
        {
            return Err(Error::Invalid(format!(
                "{}: every sequence needs k top-k entries per response token, the same k throughout",
                path.display()
            )));
        }
        k = Some(kk);
        tids.extend(e.topk_ids.iter().map(|&x| x as i32));
        tlp.extend_from_slice(&e.topk_logp);
    }
    let k = k.unwrap_or(0) as i64;
    let t = vec![
        ("tokens".to_string(), Tensor::from_slice(&tokens)),
        ("offsets".to_string(), Tensor::from_slice(&offsets)),
        ("prompt_lens".to_string(), Tensor::from_slice(&prompt_lens)),
        (
            "topk_ids".to_string(),
            Tensor::from_slice(&tids).view([-1, k]),
        ),
        (
            "topk_logp".to_string(),
            Tensor::from_slice(&tlp)
                .view([-1, k])
                .to_kind(tch::Kind::Half),
        ),
    ];
    crate::model::weights::write_safetensors(path, &t)
}

/// Read a file [`write_signal`] wrote; every inconsistency is an error
/// naming the file.
pub fn read_signal(path: &std::path::Path) -> Result<Vec<LmExample>> {
    let bad = |m: &str| Error::Data {
        path: path.to_path_buf(),
        message: m.to_string(),
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let t = crate::model::weights::tensors_from_bytes(path, &bytes)?;
    let get = |n: &str| {
        t.get(n).ok_or_else(|| {
            bad(&format!(
                "tensor {n}: missing (not a distill teacher-signal file?)"
            ))
        })
    };
    let tokens = Vec::<i64>::try_from(get("tokens")?.to_kind(tch::Kind::Int64))?;
    let offsets = Vec::<i64>::try_from(get("offsets")?)?;
    let prompt_lens = Vec::<i64>::try_from(get("prompt_lens")?)?;
    let tids_t = get("topk_ids")?;
    if tids_t.dim() != 2 {
        return Err(bad("tensor topk_ids: expected [tokens, k]"));
    }
    let k = tids_t.size()[1] as usize;
    let tids = Vec::<i64>::try_from(tids_t.to_kind(tch::Kind::Int64).reshape([-1]))?;
    let tlp = Vec::<f32>::try_from(get("topk_logp")?.to_kind(tch::Kind::Float).reshape([-1]))?;
    if offsets.len() != prompt_lens.len() + 1
        || offsets.last().copied() != Some(tokens.len() as i64)
        || tlp.len() != tids.len()
    {
        return Err(bad(
            "offsets, prompt_lens, tokens and the top-k do not agree in length",
        ));
    }
    let mut out = vec![];
    let mut r = 0usize;
    for (i, w) in offsets.windows(2).enumerate() {
        let (a, b) = (w[0] as usize, w[1] as usize);
        let p = prompt_lens[i] as usize;
        if a > b || p == 0 || p >= b - a {
            return Err(bad(&format!(
                "sequence {i}: prompt {p} of {} tokens",
                b.saturating_sub(a)
            )));
        }
        let n = (b - a - p) * k;
        if r + n > tids.len() {
            return Err(bad("fewer top-k rows than response tokens"));
        }
        out.push(LmExample {
            ids: tokens[a..b].to_vec(),
            prompt_len: p,
            topk_ids: tids[r..r + n].to_vec(),
            topk_logp: tlp[r..r + n].to_vec(),
        });
        r += n;
    }
    if r != tids.len() {
        return Err(bad("more top-k rows than response tokens"));
    }
    Ok(out)
}
