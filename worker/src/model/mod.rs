//! Models: a BERT-family encoder with a task head, loaded from and exported
//! to Hugging Face model directories.

pub mod bert;
pub mod config;
pub mod decoder;
pub mod export;
pub mod gguf;
pub mod mlm;
pub mod student;
pub mod weights;

pub use bert::{BertEncoder, EncoderOutput, Outputs};
pub use config::BertConfig;

use crate::quant::{QEmbedding, QLinear, QuantManifest, Scheme};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};

/// What the model is for, and so which head it carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Pooler (tanh dense on `[CLS]`) + linear classifier, as
    /// `BertForSequenceClassification`.
    Classification,
    /// Mean of the last hidden states over real tokens, optionally
    /// L2-normalised, as sentence-transformers' MiniLM.
    Embedding,
}

impl std::str::FromStr for Task {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "classification" | "text_classification" | "text_pair_classification" => {
                Ok(Task::Classification)
            }
            "embedding" | "sentence_embedding" => Ok(Task::Embedding),
            other => Err(Error::Invalid(format!(
                "unknown task '{other}': expected classification or embedding"
            ))),
        }
    }
}

/// A tokenized, padded batch on the model's device.
pub struct Batch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
    pub token_type_ids: Tensor,
}

pub struct ModelOutput {
    /// `[batch, num_labels]` logits, or `[batch, hidden]` sentence embeddings.
    pub output: Tensor,
    pub encoder: EncoderOutput,
}

impl ModelOutput {
    /// Every tensor as fp32 (after a mixed-precision forward, losses are
    /// computed in fp32); differentiable, and free for tensors already fp32.
    pub fn into_float(self) -> Self {
        let f = |t: Tensor| {
            if t.kind() == tch::Kind::Float {
                t
            } else {
                t.to_kind(tch::Kind::Float)
            }
        };
        ModelOutput {
            output: f(self.output),
            encoder: EncoderOutput {
                last_hidden: f(self.encoder.last_hidden),
                hidden_states: self.encoder.hidden_states.into_iter().map(f).collect(),
                attentions: self.encoder.attentions.into_iter().map(f).collect(),
            },
        }
    }
}

/// An encoder with its head, owning its variables.
pub struct TaskModel {
    pub vs: nn::VarStore,
    pub encoder: BertEncoder,
    pooler: bert::Proj,
    classifier: Option<nn::Linear>,
    pub task: Task,
    /// L2-normalise sentence embeddings (sentence-transformers `Normalize`).
    pub normalize: bool,
    pub labels: Vec<String>,
    /// The quantization applied (`quantize`, or a quantized directory).
    pub quant: Option<Scheme>,
}

impl TaskModel {
    /// A randomly initialised model. `labels` sets the classifier's size for
    /// classification (ignored for embedding).
    pub fn new(
        config: &BertConfig,
        task: Task,
        labels: Vec<String>,
        device: Device,
    ) -> Result<Self> {
        config.validate().map_err(Error::Invalid)?;
        if task == Task::Classification && labels.is_empty() {
            return Err(Error::Invalid(
                "a classification model needs at least one label".into(),
            ));
        }
        let vs = nn::VarStore::new(device);
        let root = vs.root();
        let mut encoder = BertEncoder::new(root.clone(), config);
        let h = config.hidden_size;
        let pooler = bert::Proj::new(&root / "pooler" / "dense", h, h, config);
        let classifier = (task == Task::Classification)
            .then(|| bert::linear(&root / "classifier", h, labels.len() as i64, config));
        let mut config = config.clone();
        if task == Task::Classification {
            config.num_labels = Some(labels.len() as i64);
            config.id2label = Some(
                labels
                    .iter()
                    .enumerate()
                    .map(|(i, l)| (i.to_string(), l.clone()))
                    .collect(),
            );
        }
        encoder.config = config;
        Ok(TaskModel {
            vs,
            encoder,
            pooler,
            classifier,
            task,
            normalize: false,
            labels,
            quant: None,
        })
    }

    /// [`TaskModel::new`] with every variable initialised by
    /// [`init_by_name`] from `seed`.
    pub fn new_seeded(
        config: &BertConfig,
        task: Task,
        labels: Vec<String>,
        device: Device,
        seed: u64,
    ) -> Result<Self> {
        let m = TaskModel::new(config, task, labels, device)?;
        init_by_name(&m.vs, seed, config.initializer_range);
        Ok(m)
    }

    /// Load a Hugging Face model directory. For classification, the labels
    /// come from `config.json` (`id2label`/`num_labels`) unless `labels` is
    /// given; a checkpoint without a classifier (a plain encoder to be
    /// fine-tuned) is accepted only when `labels` is given, and the new head
    /// is randomly initialised.
    pub fn load(
        dir: &Path,
        task: Task,
        labels: Option<Vec<String>>,
        device: Device,
    ) -> Result<Self> {
        Self::load_seeded(dir, task, labels, device, 0)
    }

    /// [`TaskModel::load`], where any parameter the directory lacks (a new
    /// classifier head) is initialised by name from `seed`.
    pub fn load_seeded(
        dir: &Path,
        task: Task,
        labels: Option<Vec<String>>,
        device: Device,
        seed: u64,
    ) -> Result<Self> {
        let config = BertConfig::from_dir(dir)?;
        let files = weights::weight_files(dir)?;
        let tensors = weights::read_tensors(&files)?;
        let origin = files.first().cloned().unwrap_or_else(|| dir.to_path_buf());
        // The embeddings must agree with the config's vocabulary.
        let emb = tensors
            .iter()
            .find(|(n, _)| n.ends_with("embeddings.word_embeddings.weight"))
            .map(|(_, t)| t.size());
        match emb {
            Some(s) if s.first() != Some(&config.vocab_size) => {
                return Err(Error::Weights {
                    path: origin,
                    message: format!(
                        "embeddings.word_embeddings.weight has {} rows but config.json field vocab_size is {}",
                        s.first().copied().unwrap_or(0),
                        config.vocab_size
                    ),
                })
            }
            _ => {}
        }
        let has_classifier = tensors.keys().any(|n| n.starts_with("classifier."));
        let labels = match (task, labels) {
            (Task::Embedding, _) => vec![],
            (Task::Classification, Some(l)) => l,
            (Task::Classification, None) => {
                let l = config.label_names();
                if l.is_empty() || !has_classifier {
                    return Err(Error::Config {
                        path: dir.join("config.json"),
                        message: "the model has no classification head (no classifier weights or id2label); give the labels to fine-tune one".into(),
                    });
                }
                l
            }
        };
        let mut model = TaskModel::new_seeded(&config, task, labels, device, seed)?;
        let mut optional = vec!["pooler."];
        let head_fits = model
            .classifier
            .as_ref()
            .zip(tensors.get("classifier.weight"))
            .map(|(c, t)| c.ws.size() == t.size())
            .unwrap_or(false);
        if !has_classifier || !head_fits {
            optional.push("classifier.");
        }
        let mut tensors = tensors;
        if !head_fits {
            tensors.retain(|n, _| !n.starts_with("classifier."));
        }
        let manifest = read_manifest(dir)?;
        if let Some(m) = &manifest {
            model
                .attach_stored(m, &mut tensors)
                .map_err(|e| Error::Weights {
                    path: origin.clone(),
                    message: e.to_string(),
                })?;
        }
        weights::load_into(
            &mut model.vs,
            &tensors,
            &["classifier."],
            &optional,
            &origin,
        )?;
        model.normalize = task == Task::Embedding && sentence_transformers_normalizes(dir);
        match manifest.as_ref().map(|m| m.scheme) {
            Some(Scheme::Fp16) => model.set_kind(Kind::Half),
            Some(Scheme::Bf16) => model.set_kind(Kind::BFloat16),
            _ => {}
        }
        model.quant = manifest.map(|m| m.scheme);
        Ok(model)
    }

    pub fn config(&self) -> &BertConfig {
        &self.encoder.config
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Parameters, counting a quantized layer's weight and bias as the
    /// float layer it replaced.
    pub fn num_params(&self) -> i64 {
        let float: i64 = self
            .vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum();
        let quantized: i64 = self
            .projections()
            .iter()
            .filter_map(|(_, p)| p.q.as_ref())
            .map(|q| q.weight_numel() + q.out_features())
            .sum();
        let table = self
            .encoder
            .word_embeddings_q()
            .map_or(0, |q| q.q.numel() as i64);
        float + quantized + table
    }

    /// Every linear layer that quantization may replace, with its variable
    /// name: the encoder's and the pooler.
    pub fn projections_mut(&mut self) -> Vec<(String, &mut bert::Proj)> {
        let mut v = self.encoder.projections_mut();
        v.push(("pooler.dense".to_string(), &mut self.pooler));
        v
    }

    pub fn projections(&self) -> Vec<(String, &bert::Proj)> {
        let mut v = self.encoder.projections();
        v.push(("pooler.dense".to_string(), &self.pooler));
        v
    }

    /// Post-training quantization in place (see `crate::quant`): fp16/bf16
    /// cast every variable; the integer schemes replace each linear layer
    /// of `projections` by its quantized form and free the float weight.
    pub fn quantize(&mut self, scheme: Scheme) -> Result<()> {
        if let Some(q) = self.quant {
            return Err(Error::Invalid(format!(
                "the model is already quantized ({})",
                q.name()
            )));
        }
        match scheme {
            Scheme::Fp16 => self.set_kind(Kind::Half),
            Scheme::Bf16 => self.set_kind(Kind::BFloat16),
            _ => {
                let device = self.device();
                let mut dropped = vec![];
                for (name, p) in self.projections_mut() {
                    let bias = p.lin.bs.as_ref().expect("linear layers have a bias");
                    let q = QLinear::new(&p.lin.ws, bias, scheme, device)
                        .map_err(|e| Error::Invalid(format!("quantizing {name}: {e}")))?;
                    p.q = Some(q);
                    dropped.push(take_float(&name, p));
                }
                let (word, word_q) = self.encoder.word_embeddings_mut();
                *word_q = Some(QEmbedding::new(&word.ws));
                dropped.push(take_table(WORD_EMBEDDINGS, word));
                forget(&self.vs, &dropped);
            }
        }
        self.quant = Some(scheme);
        Ok(())
    }

    /// Rebuilds the quantized layers a manifest lists from their stored
    /// tensors (removed from `tensors`, so the float ones remain).
    fn attach_stored(
        &mut self,
        m: &QuantManifest,
        tensors: &mut std::collections::BTreeMap<String, Tensor>,
    ) -> Result<()> {
        if matches!(m.scheme, Scheme::Fp16 | Scheme::Bf16) {
            return Ok(());
        }
        let device = self.device();
        let mut dropped = vec![];
        let prefix = if self.task == Task::Classification {
            "bert."
        } else {
            ""
        };
        let mut projs: std::collections::HashMap<String, &mut bert::Proj> =
            self.projections_mut().into_iter().collect();
        for layer in &m.layers {
            let p = projs.get_mut(layer).ok_or_else(|| {
                Error::Invalid(format!("{}: unknown layer {layer}", crate::quant::MANIFEST))
            })?;
            let stored = format!("{prefix}{layer}");
            p.q = Some(QLinear::from_stored(tensors, &stored, m.scheme, device)?);
            dropped.push(take_float(layer, p));
            tensors.retain(|n, _| !n.starts_with(&format!("{stored}.")));
        }
        drop(projs);
        if m.int8_word_embeddings {
            let stored = format!("{prefix}{WORD_EMBEDDINGS}");
            let q = QEmbedding::from_stored(tensors, &stored, device)?;
            tensors.retain(|n, _| !n.starts_with(&format!("{stored}.")));
            let (word, word_q) = self.encoder.word_embeddings_mut();
            *word_q = Some(q);
            dropped.push(take_table(WORD_EMBEDDINGS, word));
        }
        forget(&self.vs, &dropped);
        Ok(())
    }

    pub fn forward_t(&self, batch: &Batch, outputs: Outputs, train: bool) -> ModelOutput {
        let enc = self.encoder.forward_t(
            &batch.input_ids,
            &batch.attention_mask,
            Some(&batch.token_type_ids),
            outputs,
            train,
        );
        let output = match self.task {
            Task::Classification => {
                let cls = enc.last_hidden.select(1, 0);
                let pooled = self.pooler.forward(&cls).tanh();
                let drop = self.config().hidden_dropout_prob;
                self.classifier
                    .as_ref()
                    .expect("classifier")
                    .forward(&crate::rng::dropout(&pooled, drop, train))
            }
            Task::Embedding => {
                let e = mean_pool(&enc.last_hidden, &batch.attention_mask);
                if self.normalize {
                    l2_normalize(&e)
                } else {
                    e
                }
            }
        };
        ModelOutput {
            output,
            encoder: enc,
        }
    }

    /// Every variable with the name it has in a Hugging Face checkpoint of
    /// this task (`bert.` prefix for classification, as
    /// `BertForSequenceClassification` saves it).
    /// A quantized layer contributes the tensors of `QLinear::stored`.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        for (name, p) in self.projections() {
            if let Some(q) = &p.q {
                vars.extend(q.stored(&name));
            }
        }
        if let Some(q) = self.encoder.word_embeddings_q() {
            vars.extend(q.stored(WORD_EMBEDDINGS));
        }
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars.into_iter()
            .map(|(n, t)| match self.task {
                Task::Classification if !n.starts_with("classifier.") => (format!("bert.{n}"), t),
                _ => (n, t),
            })
            .collect()
    }

    /// `quantization.json` for this model, when it is quantized.
    pub fn quant_manifest(&self) -> Option<QuantManifest> {
        let scheme = self.quant?;
        let layers = self
            .projections()
            .into_iter()
            .filter(|(_, p)| p.q.is_some())
            .map(|(n, _)| n)
            .collect();
        Some(QuantManifest {
            version: crate::quant::MANIFEST_VERSION,
            scheme,
            layers,
            int8_word_embeddings: self.encoder.word_embeddings_q().is_some(),
        })
    }

    /// Switch every variable to `kind` (fp16/bf16 inference on GPU).
    pub fn set_kind(&mut self, kind: Kind) {
        self.vs.set_kind(kind);
    }
}

/// A replaced layer's float weight and bias: set aside by `take_float`,
/// then removed from the variable store by `forget` (so they are neither
/// saved nor kept in memory).
struct Dropped {
    name: String,
    ptrs: Vec<usize>,
}

fn take_float(name: &str, p: &mut bert::Proj) -> Dropped {
    let mut ptrs = vec![p.lin.ws.data_ptr() as usize];
    ptrs.extend(p.lin.bs.as_ref().map(|b| b.data_ptr() as usize));
    p.lin.ws = Tensor::zeros([0], (Kind::Float, p.lin.ws.device()));
    p.lin.bs = None;
    Dropped {
        name: name.to_string(),
        ptrs,
    }
}

const WORD_EMBEDDINGS: &str = "embeddings.word_embeddings";

fn take_table(name: &str, e: &mut nn::Embedding) -> Dropped {
    let ptrs = vec![e.ws.data_ptr() as usize];
    e.ws = Tensor::zeros([0], (Kind::Float, e.ws.device()));
    Dropped {
        name: name.to_string(),
        ptrs,
    }
}

fn forget(vs: &nn::VarStore, dropped: &[Dropped]) {
    let mut v = vs.variables_.lock().expect("variable store lock");
    for d in dropped {
        for suffix in ["weight", "bias"] {
            v.named_variables.remove(&format!("{}.{suffix}", d.name));
        }
    }
    let gone: std::collections::HashSet<usize> = dropped
        .iter()
        .flat_map(|d| d.ptrs.iter().copied())
        .collect();
    v.trainable_variables
        .retain(|t| !gone.contains(&(t.tensor.data_ptr() as usize)));
}

/// A stable 64-bit seed for variable `name` of a model seeded with `seed`
/// (FNV-1a over the name, mixed with the seed).
pub fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// `n` draws from N(0, std) from a generator seeded with `seed`
/// (splitmix64 + Box-Muller): the same values on every machine, thread
/// and libtorch version.
fn normal(seed: u64, n: usize, std: f64) -> Vec<f32> {
    let mut s = seed;
    let mut next = || {
        s = s.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let (u1, u2) = (next().max(f64::MIN_POSITIVE), next());
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let t = std::f64::consts::TAU * u2;
        out.push((r * t.cos()) as f32);
        out.push((r * t.sin()) as f32);
    }
    out.truncate(n);
    out
}

/// Initialises every variable of `vs` as Hugging Face's BERT does
/// (weights and embeddings N(0, `range`), biases 0, layer-norm scales 1),
/// each from a generator seeded by `seed` and the variable's name: a fresh
/// parameter's values depend on the job seed and its name only — not on
/// the global random state, nor on how many parameters were made before
/// it, nor on the thread.
pub fn init_by_name(vs: &nn::VarStore, seed: u64, range: f64) {
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (name, mut t) in vars {
            if name.ends_with("LayerNorm.weight") {
                let _ = t.fill_(1.0);
            } else if name.ends_with(".bias") || name.ends_with("LayerNorm.bias") {
                let _ = t.zero_();
            } else {
                let v = normal(name_seed(seed, &name), t.numel(), range);
                let src = Tensor::from_slice(&v)
                    .reshape(t.size())
                    .to_kind(t.kind())
                    .to_device(t.device());
                t.copy_(&src);
            }
        }
    });
}

/// The `quantization.json` of a model directory, if it has one.
pub fn read_manifest(dir: &Path) -> Result<Option<QuantManifest>> {
    let path = dir.join(crate::quant::MANIFEST);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let m: QuantManifest = serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.clone(),
        message: format!("not a quantization manifest: {e}"),
    })?;
    if m.version != crate::quant::MANIFEST_VERSION {
        return Err(Error::Config {
            path,
            message: format!(
                "field version: layout {} is not the {} this build reads",
                m.version,
                crate::quant::MANIFEST_VERSION
            ),
        });
    }
    Ok(Some(m))
}

/// Mean of `hidden` over positions where `mask` is 1.
pub fn mean_pool(hidden: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.to_kind(hidden.kind()).unsqueeze(-1);
    let summed = (hidden * &m).sum_dim_intlist(1, false, hidden.kind());
    let counts = m.sum_dim_intlist(1, false, hidden.kind()).clamp_min(1e-9);
    summed / counts
}

pub fn l2_normalize(x: &Tensor) -> Tensor {
    let norm = x.norm_scalaropt_dim(2.0, [-1], true).clamp_min(1e-12);
    x / norm
}

/// sentence-transformers directories list their modules in `modules.json`;
/// a `Normalize` module means embeddings are L2-normalised.
fn sentence_transformers_normalizes(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("modules.json"))
        .map(|t| t.contains("models.Normalize"))
        .unwrap_or(false)
}

/// The tokenizer file of a model directory.
pub fn tokenizer_path(dir: &Path) -> PathBuf {
    dir.join("tokenizer.json")
}
