//! A BERT-family encoder on tch, laid out exactly as Hugging Face's
//! `BertModel` (variable names match the checkpoint names without the
//! `bert.` prefix), so weights load by name and export back by name.
//!
//! `forward_t` can return every layer's hidden states and attention
//! probabilities (for intermediate-layer distillation). Without attentions it
//! uses libtorch's fused `scaled_dot_product_attention`; asking for attentions
//! switches to the explicit softmax path, which is what transformers' `eager`
//! attention computes. Hidden states are collected only when asked for.

use super::config::{Activation, BertConfig};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// What `forward_t` should return besides the last hidden state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outputs {
    pub hidden_states: bool,
    pub attentions: bool,
}

pub struct EncoderOutput {
    /// `[batch, seq, hidden]`
    pub last_hidden: Tensor,
    /// Embedding output followed by each layer's output (`layers + 1`
    /// tensors), when asked for; empty otherwise.
    pub hidden_states: Vec<Tensor>,
    /// Per layer `[batch, heads, seq, seq]`, when asked for; empty otherwise.
    pub attentions: Vec<Tensor>,
}

struct Embeddings {
    word: nn::Embedding,
    /// The word embeddings as int8 rows (`crate::quant::QEmbedding`) once
    /// the model is quantized; `word` is then empty.
    word_q: Option<crate::quant::QEmbedding>,
    position: nn::Embedding,
    token_type: nn::Embedding,
    norm: nn::LayerNorm,
    dropout: f64,
}

impl Embeddings {
    fn new(p: nn::Path, c: &BertConfig) -> Self {
        let ln = nn::LayerNormConfig {
            eps: c.layer_norm_eps,
            ..Default::default()
        };
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: c.initializer_range,
        };
        let ec = nn::EmbeddingConfig {
            ws_init: init,
            ..Default::default()
        };
        Embeddings {
            word: nn::embedding(&p / "word_embeddings", c.vocab_size, c.hidden_size, ec),
            word_q: None,
            position: nn::embedding(
                &p / "position_embeddings",
                c.max_position_embeddings,
                c.hidden_size,
                ec,
            ),
            token_type: nn::embedding(
                &p / "token_type_embeddings",
                c.type_vocab_size,
                c.hidden_size,
                ec,
            ),
            norm: nn::layer_norm(&p / "LayerNorm", vec![c.hidden_size], ln),
            dropout: c.hidden_dropout_prob,
        }
    }

    fn forward_t(&self, input_ids: &Tensor, token_type_ids: &Tensor, train: bool) -> Tensor {
        let seq = input_ids.size()[1];
        let positions = Tensor::arange(seq, (Kind::Int64, input_ids.device())).unsqueeze(0);
        let word = match &self.word_q {
            Some(q) => q.forward(input_ids),
            None => self.word.forward(input_ids),
        };
        let xs = word + self.position.forward(&positions) + self.token_type.forward(token_type_ids);
        crate::rng::dropout(&self.norm.forward(&xs), self.dropout, train)
    }
}

/// A linear layer that can be swapped for a quantized one
/// (`crate::quant`): the float layer while `q` is `None`.
pub struct Proj {
    pub lin: nn::Linear,
    pub q: Option<crate::quant::QLinear>,
}

impl Proj {
    pub(crate) fn new(p: nn::Path, i: i64, o: i64, c: &BertConfig) -> Self {
        Proj {
            lin: linear(p, i, o, c),
            q: None,
        }
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        match &self.q {
            Some(q) => q.forward(xs),
            None => self.lin.forward(xs),
        }
    }
}

pub(crate) fn linear(p: nn::Path, i: i64, o: i64, c: &BertConfig) -> nn::Linear {
    let cfg = nn::LinearConfig {
        ws_init: nn::Init::Randn {
            mean: 0.0,
            stdev: c.initializer_range,
        },
        bs_init: Some(nn::Init::Const(0.0)),
        bias: true,
    };
    nn::linear(p, i, o, cfg)
}

struct Layer {
    query: Proj,
    key: Proj,
    value: Proj,
    attn_out: Proj,
    attn_norm: nn::LayerNorm,
    intermediate: Proj,
    output: Proj,
    out_norm: nn::LayerNorm,
    heads: i64,
    head_dim: i64,
    act: Activation,
    dropout: f64,
    attn_dropout: f64,
}

impl Layer {
    fn new(p: nn::Path, c: &BertConfig) -> Self {
        let h = c.hidden_size;
        let ln = nn::LayerNormConfig {
            eps: c.layer_norm_eps,
            ..Default::default()
        };
        let att = &p / "attention";
        Layer {
            query: Proj::new(&att / "self" / "query", h, h, c),
            key: Proj::new(&att / "self" / "key", h, h, c),
            value: Proj::new(&att / "self" / "value", h, h, c),
            attn_out: Proj::new(&att / "output" / "dense", h, h, c),
            attn_norm: nn::layer_norm(&att / "output" / "LayerNorm", vec![h], ln),
            intermediate: Proj::new(&p / "intermediate" / "dense", h, c.intermediate_size, c),
            output: Proj::new(&p / "output" / "dense", c.intermediate_size, h, c),
            out_norm: nn::layer_norm(&p / "output" / "LayerNorm", vec![h], ln),
            heads: c.num_attention_heads,
            head_dim: c.head_dim(),
            act: c.activation().expect("validated config"),
            dropout: c.hidden_dropout_prob,
            attn_dropout: c.attention_probs_dropout_prob,
        }
    }

    /// The variable names of layer `i`'s linear layers, in field order
    /// (query, key, value, attention output, intermediate, output).
    fn proj_names(i: usize) -> [String; 6] {
        let p = format!("encoder.layer.{i}");
        [
            format!("{p}.attention.self.query"),
            format!("{p}.attention.self.key"),
            format!("{p}.attention.self.value"),
            format!("{p}.attention.output.dense"),
            format!("{p}.intermediate.dense"),
            format!("{p}.output.dense"),
        ]
    }

    fn split_heads(&self, xs: Tensor, b: i64, s: i64) -> Tensor {
        xs.view([b, s, self.heads, self.head_dim]).transpose(1, 2)
    }

    /// `mask` is additive, `[batch, 1, 1, seq]`: 0 where attended, a large
    /// negative number where masked.
    fn forward_t(
        &self,
        xs: &Tensor,
        mask: &Tensor,
        want_probs: bool,
        train: bool,
    ) -> (Tensor, Option<Tensor>) {
        let (b, s, h) = xs.size3().expect("[batch, seq, hidden]");
        let q = self.split_heads(self.query.forward(xs), b, s);
        let k = self.split_heads(self.key.forward(xs), b, s);
        let v = self.split_heads(self.value.forward(xs), b, s);
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let (ctx, probs) = if want_probs {
            let scores = q.matmul(&k.transpose(-1, -2)) * scale + mask;
            let probs = scores.softmax(-1, Kind::Float).to_kind(q.kind());
            let ctx = crate::rng::dropout(&probs, self.attn_dropout, train).matmul(&v);
            (ctx, Some(probs))
        } else {
            let p = if train { self.attn_dropout } else { 0.0 };
            let ctx =
                crate::rng::attention_dropout(&q, &k, &v, mask, p, scale).unwrap_or_else(|| {
                    Tensor::scaled_dot_product_attention(
                        &q,
                        &k,
                        &v,
                        Some(mask),
                        p,
                        false,
                        scale,
                        false,
                    )
                });
            (ctx, None)
        };
        let ctx = ctx.transpose(1, 2).contiguous().view([b, s, h]);
        let attn = self.attn_norm.forward(
            &(crate::rng::dropout(&self.attn_out.forward(&ctx), self.dropout, train) + xs),
        );
        let inter = self.intermediate.forward(&attn);
        let inter = match self.act {
            Activation::Gelu => inter.gelu("none"),
            Activation::GeluTanh => inter.gelu("tanh"),
            Activation::Relu => inter.relu(),
        };
        let out = self.out_norm.forward(
            &(crate::rng::dropout(&self.output.forward(&inter), self.dropout, train) + attn),
        );
        (out, probs)
    }
}

/// The encoder: embeddings and `num_hidden_layers` transformer layers.
pub struct BertEncoder {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    pub config: BertConfig,
}

impl BertEncoder {
    /// Variables are created under `p` with Hugging Face names
    /// (`embeddings.*`, `encoder.layer.N.*`).
    pub fn new(p: nn::Path, config: &BertConfig) -> Self {
        let embeddings = Embeddings::new(&p / "embeddings", config);
        let enc = &p / "encoder" / "layer";
        let layers = (0..config.num_hidden_layers)
            .map(|i| Layer::new(&enc / i, config))
            .collect();
        BertEncoder {
            embeddings,
            layers,
            config: config.clone(),
        }
    }

    /// `attention_mask` is 1 for real tokens and 0 for padding
    /// (`[batch, seq]`, any integer or float kind).
    /// Every linear layer with its variable name (without `.weight`), in
    /// layer order.
    pub fn projections_mut(&mut self) -> Vec<(String, &mut Proj)> {
        let mut v = vec![];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let refs = [
                &mut l.query,
                &mut l.key,
                &mut l.value,
                &mut l.attn_out,
                &mut l.intermediate,
                &mut l.output,
            ];
            v.extend(Layer::proj_names(i).into_iter().zip(refs));
        }
        v
    }

    /// The word-embedding table and its quantized form, if any.
    pub fn word_embeddings_mut(
        &mut self,
    ) -> (&mut nn::Embedding, &mut Option<crate::quant::QEmbedding>) {
        (&mut self.embeddings.word, &mut self.embeddings.word_q)
    }

    pub fn word_embeddings_q(&self) -> Option<&crate::quant::QEmbedding> {
        self.embeddings.word_q.as_ref()
    }

    /// As `projections_mut`, read-only.
    pub fn projections(&self) -> Vec<(String, &Proj)> {
        let mut v = vec![];
        for (i, l) in self.layers.iter().enumerate() {
            let refs = [
                &l.query,
                &l.key,
                &l.value,
                &l.attn_out,
                &l.intermediate,
                &l.output,
            ];
            v.extend(Layer::proj_names(i).into_iter().zip(refs));
        }
        v
    }

    pub fn forward_t(
        &self,
        input_ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
        outputs: Outputs,
        train: bool,
    ) -> EncoderOutput {
        let zeros;
        let token_type_ids = match token_type_ids {
            Some(t) => t,
            None => {
                zeros = input_ids.zeros_like();
                &zeros
            }
        };
        let mut xs = self.embeddings.forward_t(input_ids, token_type_ids, train);
        let additive = additive_mask(attention_mask, xs.kind());
        let mut hidden_states = Vec::new();
        let mut attentions = Vec::new();
        for layer in &self.layers {
            if outputs.hidden_states {
                hidden_states.push(xs.shallow_clone());
            }
            let (next, probs) = layer.forward_t(&xs, &additive, outputs.attentions, train);
            if let Some(p) = probs {
                attentions.push(p);
            }
            xs = next;
        }
        if outputs.hidden_states {
            hidden_states.push(xs.shallow_clone());
        }
        EncoderOutput {
            last_hidden: xs,
            hidden_states,
            attentions,
        }
    }
}

/// `[batch, seq]` 1/0 mask → additive `[batch, 1, 1, seq]` mask with the
/// dtype's most negative finite value at masked positions (as transformers).
pub fn additive_mask(attention_mask: &Tensor, kind: Kind) -> Tensor {
    let min = match kind {
        Kind::Half => -65504.0,
        Kind::BFloat16 => -3.3895313892515355e38,
        _ => f32::MIN as f64,
    };
    let keep = attention_mask.to_kind(Kind::Bool).logical_not();
    Tensor::zeros(attention_mask.size(), (kind, attention_mask.device()))
        .masked_fill(&keep, min)
        .unsqueeze(1)
        .unsqueeze(1)
}
