//! Models: a BERT-family encoder with a task head, loaded from and exported
//! to Hugging Face model directories.

pub mod bert;
pub mod config;
pub mod export;
pub mod student;
pub mod weights;

pub use bert::{BertEncoder, EncoderOutput, Outputs};
pub use config::BertConfig;

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
    pooler: nn::Linear,
    classifier: Option<nn::Linear>,
    pub task: Task,
    /// L2-normalise sentence embeddings (sentence-transformers `Normalize`).
    pub normalize: bool,
    pub labels: Vec<String>,
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
        let pooler = bert::linear(&root / "pooler" / "dense", h, h, config);
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
        })
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
        let mut model = TaskModel::new(&config, task, labels, device)?;
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
        weights::load_into(
            &mut model.vs,
            &tensors,
            &["classifier."],
            &optional,
            &origin,
        )?;
        model.normalize = task == Task::Embedding && sentence_transformers_normalizes(dir);
        Ok(model)
    }

    pub fn config(&self) -> &BertConfig {
        &self.encoder.config
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    pub fn num_params(&self) -> i64 {
        self.vs
            .trainable_variables()
            .iter()
            .map(|t| t.numel() as i64)
            .sum()
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
                    .forward(&pooled.dropout(drop, train))
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
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        vars.into_iter()
            .map(|(n, t)| match self.task {
                Task::Classification if !n.starts_with("classifier.") => (format!("bert.{n}"), t),
                _ => (n, t),
            })
            .collect()
    }

    /// Switch every variable to `kind` (fp16/bf16 inference on GPU).
    pub fn set_kind(&mut self, kind: Kind) {
        self.vs.set_kind(kind);
    }
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
