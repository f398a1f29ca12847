//! Decoder-only language models (Llama, Qwen2, Mistral) on libtorch,
//! mirroring transformers' `LlamaForCausalLM` / `Qwen2ForCausalLM` /
//! `MistralForCausalLM` numerically: RMSNorm computed in fp32, rotary
//! embeddings (with `linear` and `llama3` scaling), grouped-query attention
//! through libtorch's fused `scaled_dot_product_attention`, SwiGLU MLP, tied
//! or untied output embeddings.
//!
//! One forward function serves training, parity checks, prefill and
//! decoding: it takes the new tokens, their positions, which keys are real
//! (padding is masked) and optionally a [`KvCache`] that it appends to. A
//! query always attends to itself, so a padding row stays finite instead of
//! turning into NaN that would leak into real rows through the values.
//!
//! Variables are named as the checkpoint names them without the `model.`
//! prefix (`layers.3.self_attn.q_proj.weight`, `lm_head.weight`), so
//! [`weights::load_into`] reports every missing, unexpected or mis-shaped
//! tensor by name.

pub mod chat;
pub mod config;
pub mod generate;
pub mod student;

pub use config::{DecoderConfig, Family, GenerationDefaults, RopeScaling};

use super::weights;
use crate::quant::{QLinear, Scheme};
use crate::{Error, Result};
use std::path::Path;
use tch::nn::{self, Init};
use tch::{Device, Kind, Tensor};

struct Lin {
    w: Tensor,
    b: Option<Tensor>,
    /// The quantized layer, when the model was quantized (`w` is then empty).
    q: Option<QLinear>,
}

impl Lin {
    fn new(p: nn::Path, input: i64, output: i64, bias: bool) -> Self {
        let w = p.var(
            "weight",
            &[output, input],
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let b = bias.then(|| p.var("bias", &[output], Init::Const(0.0)));
        Lin { w, b, q: None }
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        match &self.q {
            Some(q) => q.forward(x),
            None => x.linear(&self.w, self.b.as_ref()),
        }
    }
    fn quantize(&mut self, scheme: Scheme) -> Result<()> {
        let out = self.w.size()[0];
        let bias = match &self.b {
            Some(b) => b.shallow_clone(),
            None => Tensor::zeros([out], (Kind::Float, self.w.device())),
        };
        self.q = Some(QLinear::new(&self.w, &bias, scheme, self.w.device())?);
        // The float weight is not needed any more: free it.
        let empty = Tensor::zeros([0], (self.w.kind(), self.w.device()));
        tch::no_grad(|| self.w.set_data(&empty));
        Ok(())
    }
}

struct Layer {
    q: Lin,
    k: Lin,
    v: Lin,
    o: Lin,
    gate: Lin,
    up: Lin,
    down: Lin,
    ln_attn: Tensor,
    ln_mlp: Tensor,
}

/// Per-layer key/value tensors `[batch, kv_heads, capacity, head_dim]`,
/// filled up to `len`; preallocated so a decode step copies one position
/// instead of concatenating the whole history.
pub struct KvCache {
    k: Vec<Tensor>,
    v: Vec<Tensor>,
    pub len: i64,
    pub capacity: i64,
}

impl KvCache {
    pub fn new(model: &DecoderModel, batch: i64, capacity: i64) -> Self {
        let c = &model.config;
        let opts = (model.kind(), model.device());
        let shape = [batch, c.num_key_value_heads, capacity, c.head_dim];
        let n = c.num_hidden_layers as usize;
        KvCache {
            k: (0..n).map(|_| Tensor::zeros(shape, opts)).collect(),
            v: (0..n).map(|_| Tensor::zeros(shape, opts)).collect(),
            len: 0,
            capacity,
        }
    }

    /// Keep only the rows `rows` (sequences still generating).
    pub fn select_rows(&mut self, rows: &Tensor) {
        for t in self.k.iter_mut().chain(self.v.iter_mut()) {
            *t = t.index_select(0, rows);
        }
    }
}

/// What [`DecoderModel::forward`] computes logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    All,
    /// Only the last new position of each row (prefill for generation:
    /// saves the vocabulary projection of every prompt token).
    Last,
    None,
}

pub struct DecoderOutput {
    /// `[batch, new_tokens or 1, vocab]`, unless `Logits::None`.
    pub logits: Option<Tensor>,
    /// The final hidden states (after the last norm), `[batch, new, hidden]`.
    pub last_hidden: Tensor,
    /// The input of every layer and the final normed output, when asked.
    pub hidden_states: Vec<Tensor>,
}

pub struct DecoderModel {
    pub vs: nn::VarStore,
    pub config: DecoderConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Option<Tensor>,
    inv_freq: Tensor,
}

impl DecoderModel {
    /// A randomly initialised model (fp32).
    pub fn new(config: &DecoderConfig, device: Device) -> Result<Self> {
        config.validate().map_err(Error::Invalid)?;
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let c = config;
        let (h, hd) = (c.hidden_size, c.head_dim);
        let q_out = c.num_attention_heads * hd;
        let kv_out = c.num_key_value_heads * hd;
        let embed = (&root / "embed_tokens").var(
            "weight",
            &[c.vocab_size, h],
            Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
        );
        let layers = (0..c.num_hidden_layers)
            .map(|i| {
                let p = &root / "layers" / i;
                let a = &p / "self_attn";
                let m = &p / "mlp";
                Layer {
                    q: Lin::new(&a / "q_proj", h, q_out, c.qkv_bias),
                    k: Lin::new(&a / "k_proj", h, kv_out, c.qkv_bias),
                    v: Lin::new(&a / "v_proj", h, kv_out, c.qkv_bias),
                    o: Lin::new(&a / "o_proj", q_out, h, c.o_bias),
                    gate: Lin::new(&m / "gate_proj", h, c.intermediate_size, c.mlp_bias),
                    up: Lin::new(&m / "up_proj", h, c.intermediate_size, c.mlp_bias),
                    down: Lin::new(&m / "down_proj", c.intermediate_size, h, c.mlp_bias),
                    ln_attn: (&p / "input_layernorm").var("weight", &[h], Init::Const(1.0)),
                    ln_mlp: (&p / "post_attention_layernorm").var("weight", &[h], Init::Const(1.0)),
                }
            })
            .collect();
        let norm = (&root / "norm").var("weight", &[h], Init::Const(1.0));
        let lm_head = (!c.tie_word_embeddings).then(|| {
            (&root / "lm_head").var(
                "weight",
                &[c.vocab_size, h],
                Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )
        });
        let inv_freq = inv_freq(c).to_device(device);
        Ok(DecoderModel {
            vs,
            config: config.clone(),
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    /// Load a Hugging Face directory (`config.json`, `model.safetensors` or
    /// a sharded index). Weights keep the config's `torch_dtype` unless
    /// `kind` asks for another.
    pub fn load(dir: &Path, device: Device, kind: Option<Kind>) -> Result<Self> {
        let config = DecoderConfig::from_dir(dir)?;
        let mut model = DecoderModel::new(&config, device)?;
        let files = weights::weight_files(dir)?;
        let mut tensors = weights::read_tensors(&files)?;
        tensors.retain(|name, _| !name.ends_with("rotary_emb.inv_freq"));
        if config.tie_word_embeddings {
            // Tied: the output projection is the embedding; a checkpoint
            // that stores a copy of it anyway is not an error
            // (transformers drops it too).
            tensors.remove("lm_head.weight");
        }
        weights::load_into(&mut model.vs, &tensors, &["lm_head."], &[], dir)?;
        drop(tensors);
        let kind = kind.unwrap_or_else(|| config.kind());
        if kind != Kind::Float {
            model.vs.set_kind(kind);
        }
        Ok(model)
    }

    pub fn device(&self) -> Device {
        self.embed.device()
    }

    pub fn kind(&self) -> Kind {
        self.embed.kind()
    }

    pub fn set_kind(&mut self, kind: Kind) {
        self.vs.set_kind(kind);
    }

    /// Quantize for inference: `fp16`/`bf16` cast every weight; the integer
    /// schemes replace every linear layer of every block (attention and
    /// MLP projections) by its quantized kernel (`crate::quant`) and free
    /// the float weight. The embedding (the output projection too, when
    /// tied) and the norms stay as they are. A quantized decoder is for
    /// inference and measurement; it is not exported.
    pub fn quantize(&mut self, scheme: Scheme) -> Result<()> {
        match scheme {
            Scheme::Fp16 => self.vs.set_kind(Kind::Half),
            Scheme::Bf16 => self.vs.set_kind(Kind::BFloat16),
            _ => {
                self.vs.freeze();
                for l in self.layers.iter_mut() {
                    for lin in [
                        &mut l.q,
                        &mut l.k,
                        &mut l.v,
                        &mut l.o,
                        &mut l.gate,
                        &mut l.up,
                        &mut l.down,
                    ] {
                        lin.quantize(scheme)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Weights in bytes as held in memory (quantized layers at their packed size).
    pub fn weight_bytes(&self) -> i64 {
        self.vs
            .variables()
            .values()
            .map(|t| (t.numel() * t.kind().elt_size_in_bytes()) as i64)
            .sum::<i64>()
            + self
                .layers
                .iter()
                .flat_map(|l| [&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down])
                .filter_map(|lin| lin.q.as_ref())
                .map(|q| match q {
                    QLinear::Int4 { .. } => q.weight_numel() / 2,
                    _ => q.weight_numel(),
                })
                .sum::<i64>()
    }

    /// Perplexity over `texts` (token ids each; the first token is only
    /// context): `exp` of the mean negative log-likelihood of every next
    /// token, batched `batch` texts at a time (right padding).
    pub fn perplexity(&self, texts: &[Vec<i64>], batch: usize) -> f64 {
        let (mut nll, mut count) = (0f64, 0f64);
        tch::no_grad(|| {
            for chunk in texts.chunks(batch.max(1)) {
                let n = chunk.iter().map(|t| t.len()).max().unwrap_or(0) as i64;
                if n < 2 {
                    continue;
                }
                let mut ids = vec![0i64; chunk.len() * n as usize];
                let mut mask = vec![0i64; chunk.len() * n as usize];
                for (r, t) in chunk.iter().enumerate() {
                    for (j, &x) in t.iter().enumerate() {
                        ids[r * n as usize + j] = x;
                        mask[r * n as usize + j] = 1;
                    }
                }
                let b = chunk.len() as i64;
                let ids = Tensor::from_slice(&ids)
                    .view([b, n])
                    .to_device(self.device());
                let mask = Tensor::from_slice(&mask)
                    .view([b, n])
                    .to_device(self.device());
                let logits = self.forward_masked(&ids, &mask).to_kind(Kind::Float);
                let lp = logits.narrow(1, 0, n - 1).log_softmax(-1, Kind::Float);
                let target = ids.narrow(1, 1, n - 1);
                let tok = lp.gather(2, &target.unsqueeze(-1), false).squeeze_dim(-1);
                let m = mask.narrow(1, 1, n - 1).to_kind(Kind::Float);
                nll -= (tok * &m).sum(Kind::Double).double_value(&[]);
                count += m.sum(Kind::Double).double_value(&[]);
            }
        });
        (nll / count.max(1.0)).exp()
    }

    pub fn num_params(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
    }

    /// Every variable under its checkpoint name (`model.` prefix restored),
    /// sorted: what export writes.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| {
                let name = if n.starts_with("lm_head.") {
                    n
                } else {
                    format!("model.{n}")
                };
                (name, t)
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// The positions of a right- or left-padded batch: each row counts its
    /// real tokens from 0 (`cumsum(mask) - 1`, 0 on leading padding), as
    /// transformers' `generate` does.
    pub fn positions_from_mask(mask: &Tensor) -> Tensor {
        (mask.to_kind(Kind::Int64).cumsum(1, Kind::Int64) - 1).clamp_min(0)
    }

    /// Full-sequence forward without a cache: `[batch, seq]` ids and 0/1
    /// mask; logits for every position.
    pub fn forward_masked(&self, input_ids: &Tensor, attention_mask: &Tensor) -> Tensor {
        let positions = Self::positions_from_mask(attention_mask);
        let valid = attention_mask.to_kind(Kind::Bool);
        self.forward(
            input_ids,
            &positions,
            Some(&valid),
            None,
            Logits::All,
            false,
        )
        .logits
        .unwrap()
    }

    /// The forward pass.
    /// - `input_ids`, `positions`: `[batch, new]`, the new tokens.
    /// - `key_valid`: `[batch, past + new]` bool, false on padding; `None`
    ///   when no row has padding.
    /// - `cache`: appended to (its `len` is `past`); `None` for a forward
    ///   over whole sequences.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        positions: &Tensor,
        key_valid: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        logits: Logits,
        want_hidden: bool,
    ) -> DecoderOutput {
        let c = &self.config;
        let (b, t) = (input_ids.size()[0], input_ids.size()[1]);
        let past = cache.as_ref().map_or(0, |c| c.len);
        let kind = self.kind();
        let mut h = Tensor::embedding(&self.embed, input_ids, -1, false, false);
        // Rotary tables for the new positions: [batch, 1, new, head_dim].
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * self.inv_freq.view([1, 1, -1]);
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let cos = emb.cos().to_kind(kind).unsqueeze(1);
        let sin = emb.sin().to_kind(kind).unsqueeze(1);
        let mask = attention_mask(key_valid, past, t, c.sliding_window, self.device());
        let causal_only = mask.is_none() && past == 0 && t > 1;
        let scale = 1.0 / (c.head_dim as f64).sqrt();
        let mut hidden_states = vec![];
        for (i, layer) in self.layers.iter().enumerate() {
            if want_hidden {
                hidden_states.push(h.shallow_clone());
            }
            let x = rms_norm(&h, &layer.ln_attn, c.rms_norm_eps);
            let q = layer
                .q
                .forward(&x)
                .view([b, t, c.num_attention_heads, c.head_dim])
                .transpose(1, 2);
            let k = layer
                .k
                .forward(&x)
                .view([b, t, c.num_key_value_heads, c.head_dim])
                .transpose(1, 2);
            let v = layer
                .v
                .forward(&x)
                .view([b, t, c.num_key_value_heads, c.head_dim])
                .transpose(1, 2);
            let q = &q * &cos + rotate_half(&q) * &sin;
            let k = &k * &cos + rotate_half(&k) * &sin;
            let (k, v) = match cache.as_deref_mut() {
                Some(cache) => {
                    let _ = cache.k[i].narrow(2, past, t).copy_(&k);
                    let _ = cache.v[i].narrow(2, past, t).copy_(&v);
                    (
                        cache.k[i].narrow(2, 0, past + t),
                        cache.v[i].narrow(2, 0, past + t),
                    )
                }
                None => (k, v),
            };
            let gqa = c.num_key_value_heads != c.num_attention_heads;
            let a = Tensor::scaled_dot_product_attention(
                &q,
                &k,
                &v,
                mask.as_ref(),
                0.0,
                causal_only,
                scale,
                gqa,
            );
            let a = a
                .transpose(1, 2)
                .reshape([b, t, c.num_attention_heads * c.head_dim]);
            h = h + layer.o.forward(&a);
            let x = rms_norm(&h, &layer.ln_mlp, c.rms_norm_eps);
            let m = layer.gate.forward(&x).silu() * layer.up.forward(&x);
            h = h + layer.down.forward(&m);
        }
        if let Some(cache) = cache {
            cache.len = past + t;
        }
        let last_hidden = rms_norm(&h, &self.norm, c.rms_norm_eps);
        if want_hidden {
            hidden_states.push(last_hidden.shallow_clone());
        }
        let head = self.lm_head.as_ref().unwrap_or(&self.embed);
        let logits = match logits {
            Logits::All => Some(last_hidden.linear::<Tensor>(head, None)),
            Logits::Last => Some(last_hidden.narrow(1, t - 1, 1).linear::<Tensor>(head, None)),
            Logits::None => None,
        };
        DecoderOutput {
            logits,
            last_hidden,
            hidden_states,
        }
    }
}

/// `<dir>/tokenizer.json`, errors naming the file.
pub fn load_tokenizer(dir: &Path) -> Result<tokenizers::Tokenizer> {
    let path = dir.join("tokenizer.json");
    tokenizers::Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
        path: path.clone(),
        message: e.to_string(),
    })
}

/// transformers' `LlamaRMSNorm`: in fp32, then back to the input's dtype
/// before the weight.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let xf = x.to_kind(Kind::Float);
    let var = xf.square().mean_dim(-1, true, Kind::Float);
    w * (xf * (var + eps).rsqrt()).to_kind(kind)
}

fn rotate_half(x: &Tensor) -> Tensor {
    let d = x.size()[3] / 2;
    Tensor::cat(&[-x.narrow(3, d, d), x.narrow(3, 0, d)], -1)
}

/// The boolean attention mask `[batch, 1, new, past + new]` (true: attend),
/// or `None` when plain causal attention (or none, for one new token with
/// no padding) is exact.
fn attention_mask(
    key_valid: Option<&Tensor>,
    past: i64,
    t: i64,
    window: Option<i64>,
    device: Device,
) -> Option<Tensor> {
    let total = past + t;
    let window = window.filter(|&w| w < total);
    if key_valid.is_none() && window.is_none() && (past == 0 || t == 1) {
        return None;
    }
    let opts = (Kind::Int64, device);
    let qpos = Tensor::arange_start(past, total, opts).unsqueeze(1);
    let kpos = Tensor::arange(total, opts).unsqueeze(0);
    let mut allowed = kpos.le_tensor(&qpos);
    if let Some(w) = window {
        allowed = allowed.logical_and(&(&qpos - &kpos).lt(w));
    }
    let mut allowed = allowed.unsqueeze(0);
    if let Some(valid) = key_valid {
        allowed = allowed.logical_and(&valid.to_kind(Kind::Bool).unsqueeze(1));
    }
    // Every query sees itself: a padding row stays finite.
    let diag = kpos.eq_tensor(&qpos).unsqueeze(0);
    Some(allowed.logical_or(&diag).unsqueeze(1))
}

/// Rotary inverse frequencies `[head_dim / 2]` (fp32), scaled as the config
/// says, computed as transformers computes them.
pub fn inv_freq(c: &DecoderConfig) -> Tensor {
    let dim = c.head_dim;
    let opts = (Kind::Float, Device::Cpu);
    let exps = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / dim as f64;
    let base = Tensor::full([dim / 2], c.rope_theta, opts);
    let inv = base.pow(&exps).reciprocal();
    match &c.rope_scaling {
        RopeScaling::None => inv,
        RopeScaling::Linear { factor } => inv / *factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old,
        } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
            let scaled = &inv / *factor;
            let inv_l = scaled.where_self(&wavelen.gt(low_wavelen), &inv);
            let smooth = (wavelen.reciprocal() * *old - *low_freq_factor)
                / (high_freq_factor - low_freq_factor);
            let one_minus: Tensor = smooth.ones_like() - &smooth;
            let smoothed: Tensor = one_minus * &inv_l / *factor + &smooth * &inv_l;
            let medium = wavelen
                .lt(high_wavelen)
                .logical_not()
                .logical_and(&wavelen.gt(low_wavelen).logical_not());
            smoothed.where_self(&medium, &inv_l)
        }
    }
}
