//! A checkpoint's masked-LM head (`cls.predictions.*`, as
//! `BertForMaskedLM` and `BertForPreTraining` save it) on top of its
//! encoder: the word predictions that `[data.augment] method = "mlm"` draws
//! replacements from (TinyBERT's augmentation). Inference only; the head is
//! never trained or exported.

use std::path::Path;

use tch::{Device, Kind, Tensor};

use super::config::Activation;
use super::{weights, Batch, Task, TaskModel};
use crate::model::bert::Outputs;
use crate::{Error, Result};

/// The encoder of a model directory with its masked-LM head.
pub struct MaskedLm {
    model: TaskModel,
    dense_w: Tensor,
    dense_b: Tensor,
    norm_w: Tensor,
    norm_b: Tensor,
    eps: f64,
    act: Activation,
    /// `[vocab, hidden]`: `cls.predictions.decoder.weight`, or the word
    /// embeddings it is tied to.
    decoder_w: Tensor,
    decoder_b: Tensor,
}

impl MaskedLm {
    /// Loads `dir` (fp32, on `device`). An error names the directory and
    /// the tensors it lacks when the checkpoint has no masked-LM head.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let files = weights::weight_files(dir)?;
        let tensors = weights::read_tensors(&files)?;
        let origin = files.first().cloned().unwrap_or_else(|| dir.to_path_buf());
        let get = |names: &[&str]| -> Option<Tensor> {
            names.iter().find_map(|n| {
                tensors
                    .get(*n)
                    .map(|t| t.to_kind(Kind::Float).to_device(device))
            })
        };
        let need = |name: &str| -> Result<Tensor> {
            get(&[name]).ok_or_else(|| Error::Weights {
                path: origin.clone(),
                message: format!(
                    "no masked-LM head: {name} is missing (a BertForMaskedLM or BertForPreTraining \
                     checkpoint has cls.predictions.*); data.augment.method = \"mlm\" needs one, \
                     \"neighbours\" does not"
                ),
            })
        };
        let dense_w = need("cls.predictions.transform.dense.weight")?;
        let dense_b = need("cls.predictions.transform.dense.bias")?;
        let norm_w = need("cls.predictions.transform.LayerNorm.weight")?;
        let norm_b = need("cls.predictions.transform.LayerNorm.bias")?;
        let model = TaskModel::load(dir, Task::Embedding, None, device)?;
        let word = tensors
            .iter()
            .find(|(n, _)| n.ends_with("embeddings.word_embeddings.weight"))
            .map(|(_, t)| t.to_kind(Kind::Float).to_device(device));
        let decoder_w = get(&["cls.predictions.decoder.weight"])
            .or(word)
            .ok_or_else(|| Error::Weights {
                path: origin.clone(),
                message: "no decoder for the masked-LM head: neither \
                          cls.predictions.decoder.weight nor embeddings.word_embeddings.weight"
                    .into(),
            })?;
        let vocab = decoder_w.size()[0];
        let decoder_b = get(&["cls.predictions.bias", "cls.predictions.decoder.bias"])
            .unwrap_or_else(|| Tensor::zeros([vocab], (Kind::Float, device)));
        let config = model.config();
        let act = config.activation().map_err(|m| Error::Config {
            path: dir.join("config.json"),
            message: m,
        })?;
        let eps = config.layer_norm_eps;
        Ok(MaskedLm {
            model,
            dense_w,
            dense_b,
            norm_w,
            norm_b,
            eps,
            act,
            decoder_w,
            decoder_b,
        })
    }

    /// `[batch, seq, vocab]` prediction logits, as `BertForMaskedLM`'s.
    pub fn logits(&self, batch: &Batch) -> Tensor {
        let _g = tch::no_grad_guard();
        let enc = self.model.encoder.forward_t(
            &batch.input_ids,
            &batch.attention_mask,
            Some(&batch.token_type_ids),
            Outputs::default(),
            false,
        );
        let h = enc.last_hidden.linear(&self.dense_w, Some(&self.dense_b));
        let h = match self.act {
            Activation::Gelu => h.gelu("none"),
            Activation::GeluTanh => h.gelu("tanh"),
            Activation::Relu => h.relu(),
        };
        let h = h.layer_norm(
            [h.size()[2]].as_slice(),
            Some(&self.norm_w),
            Some(&self.norm_b),
            self.eps,
            false,
        );
        h.linear(&self.decoder_w, Some(&self.decoder_b))
    }

    pub fn device(&self) -> Device {
        self.model.device()
    }
}
