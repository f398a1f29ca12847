//! GGUF (llama.cpp's model file, versions 2 and 3): a reader, dequantization
//! of F32/F16/BF16/Q4_0/Q4_1/Q8_0 tensors, and conversion of a Llama or Qwen2
//! GGUF into a Hugging Face directory (`distill convert`), so everything
//! downstream sees one format.
//!
//! Hand-written (about 300 lines) rather than a crate: the maintained GGUF
//! readers on crates.io come inside whole inference frameworks (candle's
//! `quantized` module returns candle tensors; llama.cpp bindings need its C++
//! build), and the format is a small fixed header, typed key/values, tensor
//! records and aligned data, documented in ggml's `docs/gguf.md`. The
//! dequantization follows ggml's block layouts (32 values per block, an fp16
//! scale, for Q4_1 also an fp16 minimum; the low nibbles hold values 0..16,
//! the high nibbles 16..32).
//!
//! llama.cpp stores a Llama's q/k projections with each head's rotary halves
//! interleaved; conversion undoes that permutation as transformers' own GGUF
//! loader does, so the converted weights are the original checkpoint's
//! (up to the quantization).

use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Value::U64(v) => Some(*v),
            Value::I64(v) if *v >= 0 => Some(*v as u64),
            _ => None,
        }
    }
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::F64(v) => Some(*v),
            Value::U64(v) => Some(*v as f64),
            Value::I64(v) => Some(*v as f64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
}

/// ggml tensor types read here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    F32,
    F16,
    BF16,
    Q4_0,
    Q4_1,
    Q8_0,
}

impl GgmlType {
    fn from_id(id: u32) -> std::result::Result<Self, String> {
        Ok(match id {
            0 => GgmlType::F32,
            1 => GgmlType::F16,
            2 => GgmlType::Q4_0,
            3 => GgmlType::Q4_1,
            8 => GgmlType::Q8_0,
            30 => GgmlType::BF16,
            6 => return Err("Q5_0 is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0 are)".into()),
            7 => return Err("Q5_1 is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0 are)".into()),
            10..=15 => {
                return Err(format!(
                    "k-quant type {id} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0 are)"
                ))
            }
            other => {
                return Err(format!(
                    "ggml type {other} is not supported (F32, F16, BF16, Q4_0, Q4_1, Q8_0 are)"
                ))
            }
        })
    }
    /// (values per block, bytes per block)
    fn block(self) -> (usize, usize) {
        match self {
            GgmlType::F32 => (1, 4),
            GgmlType::F16 | GgmlType::BF16 => (1, 2),
            GgmlType::Q4_0 => (32, 18),
            GgmlType::Q4_1 => (32, 20),
            GgmlType::Q8_0 => (32, 34),
        }
    }
}

#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// PyTorch order (GGUF lists the innermost dimension first).
    pub shape: Vec<i64>,
    pub ty: GgmlType,
    offset: u64,
}

pub struct Gguf {
    pub path: PathBuf,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    data: Vec<u8>,
    data_start: usize,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl Cursor<'_> {
    fn err(&self, what: &str) -> Error {
        Error::Weights {
            path: self.path.to_path_buf(),
            message: format!(
                "not a valid GGUF file: {what} at byte {} (truncated or corrupt?)",
                self.pos
            ),
        }
    }
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        if self.pos + n > self.bytes.len() {
            return Err(self.err("unexpected end of file"));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn string(&mut self) -> Result<String> {
        let n = self.u64()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| self.err("a string that is not UTF-8"))
    }
    fn value(&mut self, ty: u32) -> Result<Value> {
        Ok(match ty {
            0 => Value::U64(self.take(1)?[0] as u64),
            1 => Value::I64(self.take(1)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.take(2)?.try_into().unwrap()) as u64),
            3 => Value::I64(i16::from_le_bytes(self.take(2)?.try_into().unwrap()) as i64),
            4 => Value::U64(self.u32()? as u64),
            5 => Value::I64(self.u32()? as i32 as i64),
            6 => Value::F64(f32::from_le_bytes(self.take(4)?.try_into().unwrap()) as f64),
            7 => Value::Bool(self.take(1)?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                let ety = self.u32()?;
                let n = self.u64()? as usize;
                if n > self.bytes.len() {
                    return Err(self.err("an array longer than the file"));
                }
                let mut v = Vec::with_capacity(n);
                for _ in 0..n {
                    v.push(self.value(ety)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(self.u64()? as i64),
            12 => Value::F64(f64::from_le_bytes(self.take(8)?.try_into().unwrap())),
            other => return Err(self.err(&format!("unknown value type {other}"))),
        })
    }
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut c = Cursor {
            bytes: &data,
            pos: 0,
            path,
        };
        if c.take(4)? != b"GGUF" {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                message: "not a GGUF file (no GGUF magic)".into(),
            });
        }
        let version = c.u32()?;
        if !(2..=3).contains(&version) {
            return Err(Error::Weights {
                path: path.to_path_buf(),
                message: format!("GGUF version {version} is not supported (2 and 3 are)"),
            });
        }
        let n_tensors = c.u64()? as usize;
        let n_kv = c.u64()? as usize;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string()?;
            let ty = c.u32()?;
            let v = c.value(ty)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::with_capacity(n_tensors.min(1 << 16));
        for _ in 0..n_tensors {
            let name = c.string()?;
            let nd = c.u32()? as usize;
            if nd > 8 {
                return Err(c.err(&format!("tensor {name} with {nd} dimensions")));
            }
            let mut dims = vec![];
            for _ in 0..nd {
                dims.push(c.u64()? as i64);
            }
            dims.reverse();
            let ty = GgmlType::from_id(c.u32()?).map_err(|m| Error::Weights {
                path: path.to_path_buf(),
                message: format!("tensor {name}: {m}"),
            })?;
            let offset = c.u64()?;
            tensors.push(TensorInfo {
                name,
                shape: dims,
                ty,
                offset,
            });
        }
        let align = metadata
            .get("general.alignment")
            .and_then(|v| v.as_u64())
            .unwrap_or(32) as usize;
        let data_start = c.pos.div_ceil(align) * align;
        let g = Gguf {
            path: path.to_path_buf(),
            metadata,
            tensors,
            data,
            data_start,
        };
        for t in &g.tensors {
            g.tensor_bytes(t)?;
        }
        Ok(g)
    }

    fn tensor_bytes(&self, t: &TensorInfo) -> Result<&[u8]> {
        let n: i64 = t.shape.iter().product();
        let (per, bytes) = t.ty.block();
        if n as usize % per != 0 {
            return Err(Error::Weights {
                path: self.path.clone(),
                message: format!(
                    "tensor {}: {n} values are not whole {per}-value blocks",
                    t.name
                ),
            });
        }
        let len = n as usize / per * bytes;
        let start = self.data_start + t.offset as usize;
        self.data
            .get(start..start + len)
            .ok_or_else(|| Error::Weights {
                path: self.path.clone(),
                message: format!(
                    "tensor {}: data past the end of the file (truncated?)",
                    t.name
                ),
            })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// A tensor dequantized to fp32, in PyTorch's shape.
    pub fn tensor(&self, t: &TensorInfo) -> Result<Tensor> {
        let raw = self.tensor_bytes(t)?;
        let values = dequantize(t.ty, raw);
        Ok(Tensor::from_slice(&values).view(t.shape.as_slice()))
    }
}

fn f16(b: &[u8]) -> f32 {
    half_to_f32(u16::from_le_bytes([b[0], b[1]]))
}

/// IEEE half to single (subnormals, infinities and NaN included).
pub fn half_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let mant = (h & 0x3ff) as u32;
    let bits = match (exp, mant) {
        (0, 0) => sign,
        (0, m) => {
            // Subnormal: normalise.
            let mut e = 127 - 15 + 1;
            let mut m = m;
            while m & 0x400 == 0 {
                m <<= 1;
                e -= 1;
            }
            sign | ((e as u32) << 23) | ((m & 0x3ff) << 13)
        }
        (0x1f, m) => sign | 0x7f80_0000 | (m << 13),
        (e, m) => sign | ((e + 127 - 15) << 23) | (m << 13),
    };
    f32::from_bits(bits)
}

/// Dequantize `raw` bytes of type `ty` to fp32 values.
pub fn dequantize(ty: GgmlType, raw: &[u8]) -> Vec<f32> {
    match ty {
        GgmlType::F32 => raw
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        GgmlType::F16 => raw.chunks_exact(2).map(f16).collect(),
        GgmlType::BF16 => raw
            .chunks_exact(2)
            .map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16))
            .collect(),
        GgmlType::Q8_0 => {
            let mut out = Vec::with_capacity(raw.len() / 34 * 32);
            for blk in raw.chunks_exact(34) {
                let d = f16(&blk[0..2]);
                out.extend(blk[2..].iter().map(|&q| q as i8 as f32 * d));
            }
            out
        }
        GgmlType::Q4_0 | GgmlType::Q4_1 => {
            let q41 = ty == GgmlType::Q4_1;
            let size = if q41 { 20 } else { 18 };
            let mut out = Vec::with_capacity(raw.len() / size * 32);
            for blk in raw.chunks_exact(size) {
                let d = f16(&blk[0..2]);
                let (m, qs) = if q41 {
                    (f16(&blk[2..4]), &blk[4..])
                } else {
                    (0.0, &blk[2..])
                };
                let mut vals = [0f32; 32];
                for (j, &q) in qs.iter().enumerate() {
                    let (lo, hi) = ((q & 0x0f) as f32, (q >> 4) as f32);
                    if q41 {
                        vals[j] = lo * d + m;
                        vals[j + 16] = hi * d + m;
                    } else {
                        vals[j] = (lo - 8.0) * d;
                        vals[j + 16] = (hi - 8.0) * d;
                    }
                }
                out.extend_from_slice(&vals);
            }
            out
        }
    }
}

/// Undo llama.cpp's interleaving of the rotary halves in a Llama q/k
/// projection `[heads * head_dim, in]`.
pub fn reverse_permute(w: &Tensor, heads: i64) -> Tensor {
    let shape = w.size();
    let dim = shape[0] / heads / 2;
    w.reshape([heads, dim, 2, shape[1]])
        .transpose(1, 2)
        .reshape(shape.as_slice())
}

/// Convert a Llama or Qwen2 GGUF into a Hugging Face directory `out`:
/// `config.json`, `model.safetensors` (fp32, dequantized),
/// `tokenizer.json`, `tokenizer_config.json` (with the chat template) and
/// `generation_config.json`. Returns the config written.
pub fn convert(path: &Path, out: &Path) -> Result<serde_json::Value> {
    let g = Gguf::open(path)?;
    let bad = |m: String| Error::Weights {
        path: path.to_path_buf(),
        message: m,
    };
    let arch = g
        .get("general.architecture")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("metadata general.architecture: missing".into()))?
        .to_string();
    if arch != "llama" && arch != "qwen2" {
        return Err(bad(format!(
            "metadata general.architecture: '{arch}' is not converted (llama, qwen2 are)"
        )));
    }
    let int = |k: &str| -> Result<i64> {
        g.get(&format!("{arch}.{k}"))
            .and_then(|v| v.as_u64())
            .map(|v| v as i64)
            .ok_or_else(|| bad(format!("metadata {arch}.{k}: missing or not an integer")))
    };
    let float = |k: &str| g.get(&format!("{arch}.{k}")).and_then(|v| v.as_f64());
    let hidden = int("embedding_length")?;
    let heads = int("attention.head_count")?;
    let kv_heads = int("attention.head_count_kv").unwrap_or(heads);
    let head_dim = int("attention.key_length")
        .or_else(|_| int("rope.dimension_count"))
        .unwrap_or(hidden / heads);
    let tokens = match g.get("tokenizer.ggml.tokens") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("metadata tokenizer.ggml.tokens: not strings".into()))?,
        _ => return Err(bad("metadata tokenizer.ggml.tokens: missing".into())),
    };
    let vocab = int("vocab_size").unwrap_or(tokens.len() as i64);
    if let Some(t) = g
        .get(&format!("{arch}.rope.scaling.type"))
        .and_then(|v| v.as_str())
    {
        if t != "none" {
            return Err(bad(format!(
                "metadata {arch}.rope.scaling.type: '{t}' is not converted"
            )));
        }
    }
    if g.tensors.iter().any(|t| t.name == "rope_freqs.weight") {
        return Err(bad(
            "tensor rope_freqs.weight (llama3 rotary scaling in GGUF) is not converted".into(),
        ));
    }
    let tied = !g.tensors.iter().any(|t| t.name == "output.weight");
    let tok_id = |k: &str| {
        g.get(&format!("tokenizer.ggml.{k}"))
            .and_then(|v| v.as_u64())
            .map(|v| v as i64)
    };
    let (bos, eos, pad, unk) = (
        tok_id("bos_token_id"),
        tok_id("eos_token_id"),
        tok_id("padding_token_id"),
        tok_id("unknown_token_id"),
    );
    let mut config = serde_json::json!({
        "architectures": [if arch == "llama" { "LlamaForCausalLM" } else { "Qwen2ForCausalLM" }],
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int("feed_forward_length")?,
        "num_hidden_layers": int("block_count")?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int("context_length").unwrap_or(2048),
        "rms_norm_eps": float("attention.layer_norm_rms_epsilon").unwrap_or(1e-6),
        "rope_theta": float("rope.freq_base").unwrap_or(10000.0),
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
    });
    if arch == "llama" {
        config["attention_bias"] = false.into();
        config["mlp_bias"] = false.into();
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    // Tensors, renamed to transformers' names.
    let mut named = vec![];
    for t in &g.tensors {
        let Some(name) = hf_name(&t.name) else {
            return Err(bad(format!(
                "tensor {}: no Hugging Face name for it",
                t.name
            )));
        };
        let mut w = g.tensor(t)?;
        if arch == "llama" && name.ends_with("self_attn.q_proj.weight") {
            w = reverse_permute(&w, heads);
        } else if arch == "llama" && name.ends_with("self_attn.k_proj.weight") {
            w = reverse_permute(&w, kv_heads);
        }
        named.push((name, w.to_kind(Kind::Float).contiguous()));
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    super::weights::write_safetensors(&out.join("model.safetensors"), &named)?;
    // Tokenizer.
    let tokenizer = tokenizer_from_gguf(&g, &tokens)?;
    let tok_path = out.join("tokenizer.json");
    tokenizer
        .save(&tok_path, false)
        .map_err(|e| Error::Tokenizer {
            path: tok_path.clone(),
            message: format!("writing: {e}"),
        })?;
    let name_of = |id: Option<i64>| id.and_then(|i| tokens.get(i as usize)).cloned();
    let mut tc = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": name_of(bos),
        "eos_token": name_of(eos),
        "pad_token": name_of(pad),
        "unk_token": name_of(unk),
        "add_bos_token": g.get("tokenizer.ggml.add_bos_token").map(|v| v == &Value::Bool(true)).unwrap_or(false),
        "model_max_length": int("context_length").unwrap_or(2048),
    });
    if let Some(t) = g.get("tokenizer.chat_template").and_then(|v| v.as_str()) {
        tc["chat_template"] = t.into();
    }
    write_json(&out.join("tokenizer_config.json"), &tc)?;
    write_json(
        &out.join("generation_config.json"),
        &serde_json::json!({ "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad }),
    )?;
    write_json(&out.join("config.json"), &config)?;
    Ok(config)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(v).unwrap() + "\n";
    crate::fsutil::write_atomic(path, text.as_bytes())
}

/// The transformers name of a llama.cpp tensor name.
fn hf_name(gguf: &str) -> Option<String> {
    match gguf {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = part.rsplit_once('.')?;
    let hf = match module {
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// A byte-level BPE tokenizer from the GGUF's vocabulary and merges (what
/// transformers builds from a `gpt2`-model GGUF): ByteLevel pre-tokenizer
/// and decoder, no prefix space; control tokens (type 3) and user-defined
/// ones (type 4) added as special tokens.
fn tokenizer_from_gguf(g: &Gguf, tokens: &[String]) -> Result<tokenizers::Tokenizer> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::{AddedToken, Tokenizer};
    let bad = |m: String| Error::Tokenizer {
        path: g.path.clone(),
        message: m,
    };
    let model = g
        .get("tokenizer.ggml.model")
        .and_then(|v| v.as_str())
        .unwrap_or("");
    if model != "gpt2" {
        return Err(bad(format!(
            "metadata tokenizer.ggml.model: '{model}' is not converted (gpt2, byte-level BPE, is)"
        )));
    }
    let merges = match g.get("tokenizer.ggml.merges") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| {
                let s = v.as_str()?;
                let (a, b) = s.split_once(' ')?;
                Some((a.to_string(), b.to_string()))
            })
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("metadata tokenizer.ggml.merges: not 'a b' strings".into()))?,
        _ => return Err(bad("metadata tokenizer.ggml.merges: missing".into())),
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| bad(format!("building BPE: {e}")))?;
    let mut tok = Tokenizer::new(bpe);
    let byte_level = tokenizers::pre_tokenizers::byte_level::ByteLevel::new(false, true, true);
    tok.with_pre_tokenizer(Some(byte_level));
    tok.with_decoder(Some(tokenizers::decoders::byte_level::ByteLevel::new(
        false, true, true,
    )));
    let types: Vec<u64> = match g.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| v.as_u64().unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    let special: Vec<AddedToken> = tokens
        .iter()
        .zip(&types)
        .filter(|(_, &t)| t == 3 || t == 4)
        .map(|(s, _)| AddedToken::from(s.clone(), true))
        .collect();
    tok.add_special_tokens(special)
        .map_err(|e| bad(format!("adding special tokens: {e}")))?;
    Ok(tok)
}
