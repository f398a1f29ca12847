//! Stage one: the job file exactly as written, as serde structs.
//!
//! Every struct denies unknown fields, every field is optional here (defaults
//! and requirements are applied by `validate`, so a missing field gets a
//! message that names it), and counts are signed so that a negative value
//! reaches validation and gets a precise message instead of a serde one.
//! Values that may be a word or a number/list (`"auto"` or `0.5`, `"uniform"`
//! or `[1, 3]`) use small visitors rather than `untagged`, whose errors say
//! nothing useful.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSpec {
    pub name: Option<String>,
    pub task: Option<String>,
    pub teacher: Option<RawTeacher>,
    pub data: Option<RawData>,
    pub student: Option<RawStudent>,
    pub distill: Option<RawDistill>,
    pub training: Option<RawTraining>,
    pub quantization: Option<RawQuantization>,
    pub evaluation: Option<RawEvaluation>,
    pub cluster: Option<RawCluster>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTeacher {
    pub path: Option<String>,
    pub fine_tune: Option<bool>,
    pub epochs: Option<i64>,
    pub learning_rate: Option<f64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawData {
    pub train: Option<String>,
    pub unlabelled: Option<String>,
    pub eval: Option<String>,
    pub test: Option<String>,
    pub text_field: Option<String>,
    pub text_pair_field: Option<String>,
    pub label_field: Option<String>,
    pub labels: Option<Vec<String>>,
    pub max_length: Option<i64>,
    pub shard_size: Option<i64>,
    pub num_samples: Option<i64>,
    pub on_bad_example: Option<String>,
    pub augment: Option<RawAugment>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAugment {
    pub method: Option<String>,
    pub factor: Option<i64>,
    pub probability: Option<f64>,
    pub neighbours: Option<i64>,
    pub seed: Option<i64>,
    pub min_confidence: Option<f64>,
    pub per_batch: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStudent {
    pub preset: Option<String>,
    pub layers: Option<i64>,
    pub hidden_size: Option<i64>,
    pub num_heads: Option<i64>,
    pub intermediate_size: Option<i64>,
    pub compression_ratio: Option<f64>,
    pub init: Option<String>,
    pub layer_map: Option<Vec<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDistill {
    pub task: Option<NumberOrWord>,
    pub kd: Option<NumberOrWord>,
    pub attention: Option<NumberOrWord>,
    pub hidden: Option<NumberOrWord>,
    pub embedding: Option<NumberOrWord>,
    pub temperature: Option<RawTemperature>,
    pub layer_map: Option<WordOrList<i64>>,
    pub teacher_signal: Option<String>,
}

/// `temperature = 2.0` (constant) or `{ start = 4.0, end = 1.0 }`.
#[derive(Debug, Default)]
pub struct RawTemperature {
    pub start: Option<f64>,
    pub end: Option<f64>,
}

impl<'de> Deserialize<'de> for RawTemperature {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            start: Option<f64>,
            end: Option<f64>,
        }
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawTemperature;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number (a constant temperature) or a table such as { start = 4.0, end = 1.0 }")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(RawTemperature {
                    start: Some(v),
                    end: Some(v),
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                self.visit_f64(v as f64)
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                self.visit_f64(v as f64)
            }
            fn visit_map<A: de::MapAccess<'de>>(self, m: A) -> Result<Self::Value, A::Error> {
                let t = Table::deserialize(de::value::MapAccessDeserializer::new(m))?;
                Ok(RawTemperature {
                    start: t.start,
                    end: t.end,
                })
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTraining {
    pub epochs: Option<i64>,
    pub steps: Option<i64>,
    pub batch_size: Option<i64>,
    pub optimizer: Option<String>,
    pub learning_rate: Option<f64>,
    pub warmup_ratio: Option<f64>,
    pub lr_schedule: Option<String>,
    pub weight_decay: Option<f64>,
    pub grad_clip: Option<f64>,
    pub grad_accum: Option<i64>,
    pub precision: Option<String>,
    pub checkpoint_every: Option<i64>,
    pub eval_every: Option<i64>,
    pub seed: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuantization {
    pub formats: Option<WordOrList<String>>,
    pub hardware: Option<String>,
    pub max_accuracy_drop: Option<f64>,
    pub group_size: Option<i64>,
    pub keep_all: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvaluation {
    pub latency_batch_sizes: Option<Vec<i64>>,
    pub latency_iters: Option<i64>,
    pub baseline: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    pub min_workers: Option<i64>,
    pub max_workers: Option<i64>,
    pub devices_per_worker: Option<i64>,
    pub device: Option<String>,
}

/// A number, or a word such as `"auto"`.
#[derive(Debug, Clone, PartialEq)]
pub enum NumberOrWord {
    Number(f64),
    Word(String),
}

impl<'de> Deserialize<'de> for NumberOrWord {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = NumberOrWord;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a number or the string \"auto\"")
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(NumberOrWord::Number(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(NumberOrWord::Number(v as f64))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(NumberOrWord::Number(v as f64))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(NumberOrWord::Word(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// A word such as `"auto"`, or a list of `T`.
#[derive(Debug, Clone, PartialEq)]
pub enum WordOrList<T> {
    Word(String),
    List(Vec<T>),
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for WordOrList<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = WordOrList<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or a list")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(WordOrList::Word(v.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element()? {
                    out.push(item);
                }
                Ok(WordOrList::List(out))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}
