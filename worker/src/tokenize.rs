//! Tokenization with the `tokenizers` crate from a model's `tokenizer.json`.
//!
//! Truncation and padding are ours, not the file's defaults: we truncate to
//! `max_length` (pairs with the longest-first strategy) and pad per batch —
//! to the longest sequence in the batch (dynamic) or to a fixed length.
//! `length_buckets` sorts examples by length so each batch pads little.

use crate::model::{Batch, BertConfig};
use crate::{Error, Result};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};
use tokenizers::{Tokenizer, TruncationParams};

/// One tokenized example (with special tokens, truncated).
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub type_ids: Vec<i64>,
}

pub struct TextTokenizer {
    inner: Tokenizer,
    pub pad_id: i64,
    pub max_length: usize,
    pub path: PathBuf,
}

/// How a batch is padded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Padding {
    /// To the longest example in the batch.
    Dynamic,
    /// Always to `max_length`.
    Fixed,
}

impl TextTokenizer {
    /// Load `<dir>/tokenizer.json` and check it against the model config:
    /// every token id it can produce must be inside the model's vocabulary.
    pub fn load(dir: &Path, config: &BertConfig, max_length: usize) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(Error::Tokenizer {
                path,
                message: "missing tokenizer file (tokenizer.json)".into(),
            });
        }
        let mut inner = Tokenizer::from_file(&path).map_err(|e| Error::Tokenizer {
            path: path.clone(),
            message: format!("cannot load tokenizer: {e}"),
        })?;
        let vocab = inner.get_vocab_size(true) as i64;
        if vocab > config.vocab_size {
            return Err(Error::Tokenizer {
                path,
                message: format!(
                    "tokenizer has {vocab} tokens but config.json field vocab_size is {}: tokenizer and model do not match",
                    config.vocab_size
                ),
            });
        }
        let max_length = max_length.min(config.max_position_embeddings as usize);
        if max_length < 2 {
            return Err(Error::Invalid(format!(
                "max_length {max_length} is too small"
            )));
        }
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..Default::default()
            }))
            .map_err(|e| Error::Tokenizer {
                path: path.clone(),
                message: format!("setting truncation: {e}"),
            })?;
        let pad_id = ["[PAD]", "<pad>"]
            .iter()
            .find_map(|t| inner.token_to_id(t))
            .unwrap_or(config.pad_token_id.unwrap_or(0) as u32);
        Ok(TextTokenizer {
            inner,
            pad_id: pad_id as i64,
            max_length,
            path,
        })
    }

    /// The text of `ids` (special tokens left out).
    pub fn decode(&self, ids: &[i64]) -> String {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, true).unwrap_or_default()
    }

    /// Every token and its id (added tokens included).
    pub fn vocab(&self) -> std::collections::HashMap<String, u32> {
        self.inner.get_vocab(true)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokenize texts (and optional second segments for pair tasks).
    pub fn encode(&self, texts: &[&str], pairs: Option<&[&str]>) -> Result<Vec<Encoded>> {
        let inputs: Vec<tokenizers::EncodeInput> = match pairs {
            None => texts.iter().map(|t| (*t).into()).collect(),
            Some(p) => texts.iter().zip(p).map(|(a, b)| (*a, *b).into()).collect(),
        };
        let encs = self
            .inner
            .encode_batch(inputs, true)
            .map_err(|e| Error::Tokenizer {
                path: self.path.clone(),
                message: format!("encoding failed: {e}"),
            })?;
        Ok(encs
            .into_iter()
            .map(|e| Encoded {
                ids: e.get_ids().iter().map(|&i| i as i64).collect(),
                type_ids: e.get_type_ids().iter().map(|&i| i as i64).collect(),
            })
            .collect())
    }

    /// Pad `examples` into a batch on `device`.
    pub fn batch(&self, examples: &[&Encoded], padding: Padding, device: Device) -> Batch {
        let len = match padding {
            Padding::Fixed => self.max_length,
            Padding::Dynamic => examples
                .iter()
                .map(|e| e.ids.len())
                .max()
                .unwrap_or(1)
                .max(1),
        };
        pad_batch(examples, len, self.pad_id, device)
    }
}

/// `examples` cut or padded (with `pad_id`, attention mask 0, type 0) to
/// `len` tokens each, as one batch on `device`.
pub fn pad_batch(examples: &[&Encoded], len: usize, pad_id: i64, device: Device) -> Batch {
    let n = examples.len();
    let mut ids = vec![pad_id; n * len];
    let mut mask = vec![0i64; n * len];
    let mut types = vec![0i64; n * len];
    for (r, e) in examples.iter().enumerate() {
        let k = e.ids.len().min(len);
        ids[r * len..r * len + k].copy_from_slice(&e.ids[..k]);
        types[r * len..r * len + k].copy_from_slice(&e.type_ids[..k]);
        mask[r * len..r * len + k].iter_mut().for_each(|m| *m = 1);
    }
    let shape = [n as i64, len as i64];
    Batch {
        input_ids: Tensor::from_slice(&ids).view(shape).to_device(device),
        attention_mask: Tensor::from_slice(&mask).view(shape).to_device(device),
        token_type_ids: Tensor::from_slice(&types).view(shape).to_device(device),
    }
}

/// Batches of example indices. With `bucket`, examples are sorted by length
/// (stable, so equal lengths keep input order) before being cut into batches;
/// otherwise batches follow input order.
pub fn batches(lengths: &[usize], batch_size: usize, bucket: bool) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    if bucket {
        order.sort_by_key(|&i| lengths[i]);
    }
    order
        .chunks(batch_size.max(1))
        .map(|c| c.to_vec())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucketing_sorts_and_covers_every_index_once() {
        let lengths = [5, 1, 9, 3, 3, 7, 2];
        let b = batches(&lengths, 3, true);
        assert_eq!(b, vec![vec![1, 6, 3], vec![4, 0, 5], vec![2]]);
        let mut all: Vec<usize> = b.concat();
        all.sort();
        assert_eq!(all, (0..7).collect::<Vec<_>>());
        assert_eq!(
            batches(&lengths, 3, false),
            vec![vec![0, 1, 2], vec![3, 4, 5], vec![6]]
        );
    }
}
