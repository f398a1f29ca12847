//! Pseudo-label data augmentation (`[data.augment]`): new unlabelled
//! training examples made from the training texts' tokens, which the
//! teacher then labels with soft targets like any other example.
//!
//! Each augmented example is a pure function of its source example's
//! tokens, the copy number and the seed (a splitmix64 stream seeded by a
//! hash of the three), so the same job makes the same examples on every
//! machine, in any order (`mlm` copies: see below), and teacher-signal
//! shards over them are content-addressed like any others.
//!
//! Methods:
//! - `neighbours` (TinyBERT-style word replacement): a whole-word token
//!   (one that is not a `##` piece and is not followed by one) is replaced
//!   by one of its `neighbours` nearest whole-word tokens by cosine
//!   similarity in the teacher's input-embedding table.
//! - `mlm` (TinyBERT's own variant, for a teacher checkpoint with a
//!   masked-LM head, `cls.predictions.*`): the chosen whole words of a copy
//!   are masked together, and each becomes one of the `neighbours` whole
//!   words the head ranks most likely there, other than itself. TinyBERT
//!   masks one word per pass; masking a copy's words together costs one
//!   pass per batch of copies instead of one per word. The copies then also
//!   depend on the head's fp32 logits (fixed batches, so the same device
//!   and thread count give the same copies). The teacher this project
//!   ships (sentence-transformers MiniLM) has no masked-LM head: there
//!   `mlm` is refused, naming the missing tensor.
//! - `mask`: a token becomes `[MASK]`.
//! - `delete`: a token is dropped (at least one content token is kept).
//! - `swap`: a token trades places with the next one of its segment.
//!
//! `[CLS]`, `[SEP]` and padding are never touched; pair examples keep each
//! token's segment.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use distill_spec::{Augment, AugmentMethod};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::model::mlm::MaskedLm;
use crate::tokenize::{Encoded, TextTokenizer};
use crate::{Error, Result};

/// A deterministic stream of pseudo-random numbers (splitmix64).
struct Rng(u64);

impl Rng {
    fn for_example(seed: u64, copy: u32, e: &Encoded) -> Self {
        let mut h = Sha256::new();
        h.update(seed.to_le_bytes());
        h.update(copy.to_le_bytes());
        for (i, t) in e.ids.iter().zip(&e.type_ids) {
            h.update(i.to_le_bytes());
            h.update(t.to_le_bytes());
        }
        let d = h.finalize();
        Rng(u64::from_le_bytes(d[..8].try_into().expect("8 bytes")))
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// What augmentation needs from the tokenizer and the teacher.
pub struct Augmenter {
    cfg: Augment,
    seed: u64,
    special: BTreeSet<i64>,
    mask_id: Option<i64>,
    pad_id: i64,
    /// `neighbours`: each whole-word token's nearest whole-word tokens.
    neighbours: HashMap<i64, Vec<i64>>,
    /// `neighbours`: which ids are whole words.
    whole: Vec<bool>,
    continuation: Vec<bool>,
    /// `mlm`: the teacher checkpoint's masked-LM head.
    mlm: Option<MaskedLm>,
}

impl Augmenter {
    /// Prepares augmentation of `sources` (the training examples). For
    /// `neighbours`, reads the teacher's input-embedding table from
    /// `teacher_dir` and finds the neighbours of every whole word in the
    /// sources.
    pub fn new(
        cfg: &Augment,
        job_seed: u64,
        tok: &TextTokenizer,
        teacher_dir: &Path,
        sources: &[Encoded],
    ) -> Result<Self> {
        let mut a = Self::from_vocab(cfg, job_seed, &tok.vocab(), tok.pad_id)
            .map_err(|e| Error::Invalid(format!("{e} (tokenizer {})", tok.path.display())))?;
        match cfg.method {
            AugmentMethod::Neighbours => {
                let table = embedding_table(teacher_dir)?;
                a.neighbours = a.neighbours_in(&table, sources)?;
            }
            AugmentMethod::Mlm => a.mlm = Some(MaskedLm::load(teacher_dir, Device::Cpu)?),
            _ => {}
        }
        Ok(a)
    }

    /// An augmenter over a vocabulary (token → id); `neighbours` then
    /// needs [`neighbours_in`](Self::neighbours_in).
    pub fn from_vocab(
        cfg: &Augment,
        job_seed: u64,
        vocab: &HashMap<String, u32>,
        pad_id: i64,
    ) -> Result<Self> {
        let n = vocab.values().map(|&i| i as usize + 1).max().unwrap_or(0);
        let mut whole = vec![false; n];
        let mut continuation = vec![false; n];
        let mut special = BTreeSet::new();
        for (t, &i) in vocab {
            let i = i as usize;
            if t.starts_with("##") {
                continuation[i] = true;
            } else if (t.starts_with('[') && t.ends_with(']'))
                || (t.starts_with('<') && t.ends_with('>'))
            {
                special.insert(i as i64);
            } else if t.chars().count() >= 2 && t.chars().all(|c| c.is_alphanumeric()) {
                whole[i] = true;
            }
        }
        special.insert(pad_id);
        let mask_id = ["[MASK]", "<mask>"]
            .iter()
            .find_map(|t| vocab.get(*t).map(|&i| i as i64));
        if matches!(cfg.method, AugmentMethod::Mask | AugmentMethod::Mlm) && mask_id.is_none() {
            return Err(Error::Invalid(format!(
                "data.augment.method = \"{}\": the tokenizer has no [MASK] token",
                if cfg.method == AugmentMethod::Mask {
                    "mask"
                } else {
                    "mlm"
                }
            )));
        }
        Ok(Augmenter {
            cfg: cfg.clone(),
            seed: cfg.seed.unwrap_or(job_seed),
            special,
            mask_id,
            pad_id,
            neighbours: HashMap::new(),
            whole,
            continuation,
            mlm: None,
        })
    }

    /// The positions of `ids` that are whole words, not followed by a
    /// `##` piece, and not special: what `neighbours` and `mlm` replace.
    fn word_positions(&self, ids: &[i64]) -> Vec<usize> {
        (0..ids.len())
            .filter(|&i| {
                let next_piece = ids.get(i + 1).is_some_and(|&n| self.is_continuation(n));
                !self.special.contains(&ids[i]) && self.is_whole(ids[i]) && !next_piece
            })
            .collect()
    }

    fn is_whole(&self, id: i64) -> bool {
        self.whole.get(id as usize).copied().unwrap_or(false)
    }

    fn is_continuation(&self, id: i64) -> bool {
        self.continuation.get(id as usize).copied().unwrap_or(false)
    }

    /// The `neighbours` nearest whole-word tokens (cosine, in the input
    /// embedding `table`) of each whole word the sources use; kept for
    /// [`one`](Self::one).
    pub fn neighbours_in(
        &self,
        table: &Tensor,
        sources: &[Encoded],
    ) -> Result<HashMap<i64, Vec<i64>>> {
        let _g = tch::no_grad_guard();
        let candidates: Vec<i64> = (0..self.whole.len() as i64)
            .filter(|&i| self.is_whole(i) && i < table.size()[0])
            .collect();
        let queries: Vec<i64> = sources
            .iter()
            .flat_map(|e| e.ids.iter().copied())
            .filter(|&i| self.is_whole(i) && i < table.size()[0])
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if candidates.len() < 2 || queries.is_empty() {
            return Ok(HashMap::new());
        }
        let norm = |t: Tensor| {
            let n = t
                .norm_scalaropt_dim(2, [1i64].as_slice(), true)
                .clamp_min(1e-12);
            t / n
        };
        let cand = norm(table.index_select(0, &Tensor::from_slice(&candidates)));
        let k = (self.cfg.neighbours as i64 + 1).min(candidates.len() as i64);
        let mut out = HashMap::new();
        for chunk in queries.chunks(512) {
            let q = norm(table.index_select(0, &Tensor::from_slice(chunk)));
            let (_, idx) = q.matmul(&cand.tr()).topk(k, 1, true, true);
            let idx = Vec::<i64>::try_from(idx.reshape([-1]))
                .map_err(|e| Error::Invalid(format!("neighbour search: {e}")))?;
            for (r, &qid) in chunk.iter().enumerate() {
                let near: Vec<i64> = idx[r * k as usize..(r + 1) * k as usize]
                    .iter()
                    .map(|&j| candidates[j as usize])
                    .filter(|&c| c != qid)
                    .take(self.cfg.neighbours as usize)
                    .collect();
                out.insert(qid, near);
            }
        }
        Ok(out)
    }

    /// Uses `neighbours` (from [`neighbours_in`](Self::neighbours_in)).
    pub fn set_neighbours(&mut self, n: HashMap<i64, Vec<i64>>) {
        self.neighbours = n;
    }

    /// The augmented copy `copy` of `e`.
    pub fn one(&self, e: &Encoded, copy: u32) -> Encoded {
        let mut rng = Rng::for_example(self.seed, copy, e);
        let p = self.cfg.probability;
        let content = |i: usize| !self.special.contains(&e.ids[i]);
        let mut ids = e.ids.clone();
        let mut types = e.type_ids.clone();
        match self.cfg.method {
            AugmentMethod::Mask => {
                let m = self.mask_id.expect("checked in new");
                for i in 0..ids.len() {
                    if content(i) && rng.unit() < p {
                        ids[i] = m;
                    }
                }
            }
            AugmentMethod::Neighbours => {
                for i in self.word_positions(&e.ids) {
                    if rng.unit() < p {
                        if let Some(near) = self.neighbours.get(&e.ids[i]).filter(|n| !n.is_empty())
                        {
                            ids[i] = near[rng.below(near.len())];
                        }
                    }
                }
            }
            AugmentMethod::Mlm => return self.mlm_copies(&[(e, copy)]).remove(0),
            AugmentMethod::Delete => {
                let n_content = (0..ids.len()).filter(|&i| content(i)).count();
                let mut keep = vec![true; ids.len()];
                let mut dropped = 0;
                for (i, k) in keep.iter_mut().enumerate() {
                    if content(i) && dropped + 1 < n_content && rng.unit() < p {
                        *k = false;
                        dropped += 1;
                    }
                }
                (ids, types) = ids
                    .iter()
                    .zip(&types)
                    .zip(&keep)
                    .filter(|(_, &k)| k)
                    .map(|((&i, &t), _)| (i, t))
                    .unzip();
            }
            AugmentMethod::Swap => {
                let mut i = 0;
                while i + 1 < ids.len() {
                    let (a, b) = (i, i + 1);
                    if content(a) && content(b) && types[a] == types[b] && rng.unit() < p {
                        ids.swap(a, b);
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
            }
        }
        Encoded {
            ids,
            type_ids: types,
        }
    }

    /// Every source's `factor` copies, source by source.
    pub fn all(&self, sources: &[Encoded]) -> Vec<Encoded> {
        let pairs: Vec<(&Encoded, u32)> = sources
            .iter()
            .flat_map(|e| (0..self.cfg.factor).map(move |c| (e, c)))
            .collect();
        if self.cfg.method == AugmentMethod::Mlm {
            // One masked-LM pass per batch of copies, always the same
            // batches in the same order: the same job, device and thread
            // count give the same copies.
            return pairs.chunks(64).flat_map(|b| self.mlm_copies(b)).collect();
        }
        pairs.into_iter().map(|(e, c)| self.one(e, c)).collect()
    }

    /// `mlm` copies of `pairs` (example, copy number): each chosen whole
    /// word is masked (all of an example's at once, in one pass of the
    /// teacher's masked-LM head) and replaced by one of the `neighbours`
    /// whole words most likely there, other than itself.
    fn mlm_copies(&self, pairs: &[(&Encoded, u32)]) -> Vec<Encoded> {
        let mlm = self
            .mlm
            .as_ref()
            .expect("mlm: the masked-LM head is loaded in new");
        let mask = self.mask_id.expect("mlm: [MASK] checked in from_vocab");
        let p = self.cfg.probability;
        let mut rngs = Vec::with_capacity(pairs.len());
        let mut chosen = Vec::with_capacity(pairs.len());
        for &(e, copy) in pairs {
            let mut rng = Rng::for_example(self.seed, copy, e);
            let at: Vec<usize> = self
                .word_positions(&e.ids)
                .into_iter()
                .filter(|_| rng.unit() < p)
                .collect();
            rngs.push(rng);
            chosen.push(at);
        }
        let mut out: Vec<Encoded> = pairs.iter().map(|(e, _)| (*e).clone()).collect();
        let rows: Vec<usize> = (0..pairs.len())
            .filter(|&r| !chosen[r].is_empty())
            .collect();
        if rows.is_empty() {
            return out;
        }
        let seq = rows
            .iter()
            .map(|&r| pairs[r].0.ids.len())
            .max()
            .unwrap_or(1);
        // Each chosen row with its chosen words masked; `flat` indexes the
        // masked positions in the padded batch.
        let mut masked = Vec::with_capacity(rows.len());
        let mut flat = vec![];
        for (b, &r) in rows.iter().enumerate() {
            let mut row = pairs[r].0.clone();
            for &i in &chosen[r] {
                row.ids[i] = mask;
                flat.push((b * seq + i) as i64);
            }
            masked.push(row);
        }
        let dev = mlm.device();
        let refs: Vec<&Encoded> = masked.iter().collect();
        let batch = crate::tokenize::pad_batch(&refs, seq, self.pad_id, dev);
        let logits = mlm.logits(&batch);
        let vocab = logits.size()[2];
        let logits = logits
            .view([-1, vocab])
            .index_select(0, &Tensor::from_slice(&flat).to_device(dev))
            .to_device(Device::Cpu);
        // Only whole words may come in, and never the word itself.
        let allowed: Vec<f32> = (0..vocab)
            .map(|v| {
                if self.is_whole(v) {
                    0.0
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let originals: Vec<i64> = rows
            .iter()
            .flat_map(|&r| chosen[r].iter().map(move |&i| pairs[r].0.ids[i]))
            .collect();
        let scores = (logits + Tensor::from_slice(&allowed).unsqueeze(0)).scatter_value(
            1,
            &Tensor::from_slice(&originals).unsqueeze(1),
            f64::NEG_INFINITY,
        );
        let words = (0..vocab).filter(|&v| self.is_whole(v)).count() as i64;
        let k = (self.cfg.neighbours as i64).min(words - 1).max(1);
        let (_, top) = scores.topk(k, 1, true, true);
        let top = Vec::<i64>::try_from(top.reshape([-1])).expect("top-k ids");
        let mut n = 0;
        for &r in &rows {
            for &i in &chosen[r] {
                out[r].ids[i] = top[n * k as usize + rngs[r].below(k as usize)];
                n += 1;
            }
        }
        out
    }
}

/// The teacher's input-embedding table (fp32, CPU) from its weights.
fn embedding_table(teacher_dir: &Path) -> Result<Tensor> {
    let files = crate::model::weights::weight_files(teacher_dir)?;
    let tensors = crate::model::weights::read_tensors(&files)?;
    tensors
        .iter()
        .find(|(n, _)| n.ends_with("embeddings.word_embeddings.weight"))
        .map(|(_, t)| t.to_kind(Kind::Float).to_device(Device::Cpu))
        .ok_or_else(|| Error::Weights {
            path: teacher_dir.to_path_buf(),
            message: "data.augment.method = \"neighbours\" needs the teacher's embeddings.word_embeddings.weight".into(),
        })
}

/// How many augmented examples were made and kept (the report's
/// `augmentation`).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AugmentStats {
    pub method: String,
    pub generated: usize,
    pub kept: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_confidence: Option<f64>,
}

/// Which rows of teacher logits reach `min_confidence` (top softmax
/// probability at temperature 1).
pub fn confident(logits: &Tensor, min_confidence: f64) -> Vec<bool> {
    let p = logits
        .to_kind(Kind::Float)
        .softmax(-1, Kind::Float)
        .amax([-1i64].as_slice(), false);
    Vec::<f32>::try_from(p.to_device(Device::Cpu))
        .unwrap_or_default()
        .into_iter()
        .map(|x| x as f64 >= min_confidence)
        .collect()
}

/// The confidence filter's decision, taken once per job. The first process
/// to decide writes `path` (`augment-keep.json` in the job's directory);
/// every later one takes the decision from there: the other ranks of a
/// data-parallel group, a worker that joins later, a resumed run. Ranks
/// that ran the teacher themselves could otherwise disagree on an example
/// at the threshold (another thread count sums in another order), and
/// train on different data and different numbers of steps. `decide` runs
/// only when no decision is stored. A decision of another `key` (the job's
/// configuration and augmented examples) or size is refused, naming the
/// file.
pub fn kept_once(
    path: &Path,
    key: &str,
    generated: usize,
    decide: impl FnOnce() -> Result<Vec<bool>>,
) -> Result<Vec<bool>> {
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Stored {
        key: String,
        generated: usize,
        /// One character per augmented example: '1' kept, '0' dropped.
        keep: String,
    }
    let read = || -> Result<Vec<bool>> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let s: Stored = serde_json::from_slice(&bytes).map_err(|e| {
            Error::Invalid(format!(
                "{}: not a confidence-filter decision: {e}",
                path.display()
            ))
        })?;
        if s.key != key || s.generated != generated || s.keep.len() != generated {
            return Err(Error::Invalid(format!(
                "{}: the confidence filter's decision of a job of another configuration or \
                 data (key {}, {} examples; this job's {key}, {generated}): give the job its \
                 own output directory, or delete the file",
                path.display(),
                s.key,
                s.generated
            )));
        }
        Ok(s.keep.bytes().map(|b| b == b'1').collect())
    };
    if path.exists() {
        return read();
    }
    let keep = decide()?;
    let stored = Stored {
        key: key.to_string(),
        generated,
        keep: keep.iter().map(|&k| if k { '1' } else { '0' }).collect(),
    };
    let bytes = serde_json::to_vec(&stored).expect("a decision serialises");
    if crate::fsutil::create_once(path, &bytes)? {
        Ok(keep)
    } else {
        // Another rank decided first: its decision holds.
        read()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[PAD]` 0, `[CLS]` 1, `[SEP]` 2, `[MASK]` 3, words `w4`..`w19`,
    /// pieces `##x20`..`##x23`.
    fn vocab() -> HashMap<String, u32> {
        let mut v: HashMap<String, u32> = ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]
            .iter()
            .enumerate()
            .map(|(i, t)| (t.to_string(), i as u32))
            .collect();
        for i in 4..20 {
            v.insert(format!("w{i}"), i);
        }
        for i in 20..24 {
            v.insert(format!("##x{i}"), i);
        }
        v
    }

    fn cfg(method: AugmentMethod, p: f64) -> Augment {
        Augment {
            method,
            factor: 2,
            probability: p,
            neighbours: 2,
            seed: None,
            min_confidence: None,
            per_batch: None,
        }
    }

    /// `[CLS] w.. [SEP] w.. [SEP]`, the second segment with type 1.
    fn example(k: i64) -> Encoded {
        let mut ids = vec![1];
        let mut types = vec![0];
        for j in 0..12 {
            ids.push(4 + (k * 7 + j * 5) % 16);
            types.push(0);
        }
        ids.push(2);
        types.push(0);
        for j in 0..6 {
            ids.push(4 + (k + j * 3) % 16);
            types.push(1);
        }
        ids.push(2);
        types.push(1);
        Encoded {
            ids,
            type_ids: types,
        }
    }

    fn specials_kept(src: &Encoded, out: &Encoded) {
        let s = |e: &Encoded| -> Vec<i64> {
            e.ids
                .iter()
                .copied()
                .filter(|&i| i == 1 || i == 2)
                .collect()
        };
        assert_eq!(s(src), s(out), "[CLS]/[SEP] kept, in order");
        assert_eq!(out.ids[0], 1);
        assert_eq!(*out.ids.last().unwrap(), 2);
        assert_eq!(out.ids.len(), out.type_ids.len());
    }

    #[test]
    fn the_same_seed_gives_the_same_copies_and_another_seed_others() {
        let src: Vec<Encoded> = (0..40).map(example).collect();
        for m in [
            AugmentMethod::Mask,
            AugmentMethod::Delete,
            AugmentMethod::Swap,
        ] {
            let a = Augmenter::from_vocab(&cfg(m, 0.3), 7, &vocab(), 0).unwrap();
            let b = Augmenter::from_vocab(&cfg(m, 0.3), 7, &vocab(), 0).unwrap();
            let c = Augmenter::from_vocab(&cfg(m, 0.3), 8, &vocab(), 0).unwrap();
            let (x, y, z) = (a.all(&src), b.all(&src), c.all(&src));
            assert_eq!(x.len(), 80, "{m:?}: factor 2");
            assert_eq!(
                x.iter().map(|e| &e.ids).collect::<Vec<_>>(),
                y.iter().map(|e| &e.ids).collect::<Vec<_>>(),
                "{m:?}"
            );
            assert_ne!(
                x.iter().map(|e| &e.ids).collect::<Vec<_>>(),
                z.iter().map(|e| &e.ids).collect::<Vec<_>>(),
                "{m:?}: another seed"
            );
            // Per example: the same copy whatever else is augmented.
            assert_eq!(a.one(&src[17], 1).ids, x[17 * 2 + 1].ids, "{m:?}");
            // The two copies of an example differ.
            assert!(
                (0..40).any(|i| x[2 * i].ids != x[2 * i + 1].ids),
                "{m:?}: copies 0 and 1"
            );
        }
    }

    #[test]
    fn mask_changes_about_p_of_the_content_tokens_and_nothing_else() {
        let a = Augmenter::from_vocab(&cfg(AugmentMethod::Mask, 0.25), 1, &vocab(), 0).unwrap();
        let (mut masked, mut content) = (0, 0);
        for k in 0..200 {
            let src = example(k);
            let out = a.one(&src, 0);
            specials_kept(&src, &out);
            assert_eq!(out.type_ids, src.type_ids);
            for (x, y) in src.ids.iter().zip(&out.ids) {
                if *x > 3 {
                    content += 1;
                    if y == &3 {
                        masked += 1;
                    } else {
                        assert_eq!(x, y, "a content token is masked or left alone");
                    }
                }
            }
        }
        let rate = masked as f64 / content as f64;
        assert!(
            (0.22..0.28).contains(&rate),
            "masked {rate:.3} of tokens at p 0.25"
        );
    }

    #[test]
    fn delete_drops_tokens_in_order_and_keeps_segments() {
        let a = Augmenter::from_vocab(&cfg(AugmentMethod::Delete, 0.3), 1, &vocab(), 0).unwrap();
        let mut dropped = 0;
        for k in 0..100 {
            let src = example(k);
            let out = a.one(&src, 0);
            specials_kept(&src, &out);
            dropped += src.ids.len() - out.ids.len();
            // `out` is a subsequence of `src`, with each token's segment.
            let mut it = src.ids.iter().zip(&src.type_ids);
            for (x, t) in out.ids.iter().zip(&out.type_ids) {
                assert!(it.any(|(a, b)| a == x && b == t), "subsequence");
            }
        }
        assert!(
            dropped > 400,
            "about 30 % of 1800 content tokens dropped, got {dropped}"
        );
        // Never every content token.
        let all = Augmenter::from_vocab(&cfg(AugmentMethod::Delete, 1.0), 1, &vocab(), 0).unwrap();
        let out = all.one(&example(3), 0);
        assert!(out.ids.iter().any(|&i| i > 3), "one content token kept");
    }

    #[test]
    fn swap_permutes_within_a_segment() {
        let a = Augmenter::from_vocab(&cfg(AugmentMethod::Swap, 0.5), 1, &vocab(), 0).unwrap();
        let mut moved = 0;
        for k in 0..50 {
            let src = example(k);
            let out = a.one(&src, 0);
            specials_kept(&src, &out);
            assert_eq!(
                out.type_ids, src.type_ids,
                "each position keeps its segment"
            );
            for seg in [0, 1] {
                let pick = |e: &Encoded| {
                    let mut v: Vec<i64> = e
                        .ids
                        .iter()
                        .zip(&e.type_ids)
                        .filter(|(_, &t)| t == seg)
                        .map(|(&i, _)| i)
                        .collect();
                    v.sort();
                    v
                };
                assert_eq!(pick(&src), pick(&out), "segment {seg}: the same tokens");
            }
            moved += src.ids.iter().zip(&out.ids).filter(|(a, b)| a != b).count();
        }
        assert!(moved > 100, "tokens moved: {moved}");
    }

    #[test]
    fn neighbours_replace_whole_words_by_near_ones() {
        // Words w4..w19 on a circle: each one's nearest are its two
        // circle neighbours. Pieces and specials sit far away.
        let mut rows = vec![vec![0f32, 0.0, 5.0]; 24];
        for i in 4..20 {
            let a = (i - 4) as f32 / 16.0 * std::f32::consts::TAU;
            rows[i] = vec![a.cos(), a.sin(), 0.0];
        }
        let flat: Vec<f32> = rows.concat();
        let table = Tensor::from_slice(&flat).view([24, 3]);
        let mut a =
            Augmenter::from_vocab(&cfg(AugmentMethod::Neighbours, 0.5), 1, &vocab(), 0).unwrap();
        let src: Vec<Encoded> = (0..60).map(example).collect();
        let near = a.neighbours_in(&table, &src).unwrap();
        let ring = |i: i64, d: i64| 4 + (i - 4 + d).rem_euclid(16);
        for (&w, n) in &near {
            let mut n = n.clone();
            n.sort();
            let mut want = vec![ring(w, -1), ring(w, 1)];
            want.sort();
            assert_eq!(n, want, "neighbours of w{w}");
        }
        a.set_neighbours(near);
        let mut replaced = 0;
        for e in &src {
            let out = a.one(e, 0);
            specials_kept(e, &out);
            for (x, y) in e.ids.iter().zip(&out.ids) {
                if x != y {
                    replaced += 1;
                    assert!(
                        *y == ring(*x, -1) || *y == ring(*x, 1),
                        "w{x} replaced by w{y}, not a neighbour"
                    );
                }
            }
        }
        assert!(
            replaced > 300,
            "about half of 1080 words replaced: {replaced}"
        );
        // A word followed by a `##` piece is part of a longer word: kept.
        let e = Encoded {
            ids: vec![1, 5, 20, 5, 2],
            type_ids: vec![0; 5],
        };
        let all =
            Augmenter::from_vocab(&cfg(AugmentMethod::Neighbours, 1.0), 1, &vocab(), 0).unwrap();
        let mut all = all;
        all.set_neighbours(a.neighbours.clone());
        let out = all.one(&e, 0);
        assert_eq!(out.ids[1..3], [5, 20], "w5 ##x20 left whole");
        assert_ne!(out.ids[3], 5, "a lone w5 replaced at p 1");
    }

    #[test]
    fn confidence_filter_keeps_confident_rows() {
        let logits = Tensor::from_slice(&[3.0f32, 0.0, 0.1, 0.0, 0.0, 2.0]).view([3, 2]);
        assert_eq!(confident(&logits, 0.8), vec![true, false, true]);
    }

    /// The first decision of a job holds for every later process, even
    /// one whose own teacher would decide otherwise; a decision of another
    /// configuration is refused; two ranks deciding at once end up with
    /// the same one.
    #[test]
    fn the_confidence_decision_is_taken_once_per_job() {
        let dir = std::env::temp_dir().join(format!("distill-kept-once-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("augment-keep.json");
        let first = kept_once(&path, "fp", 3, || Ok(vec![true, false, true])).unwrap();
        assert_eq!(first, [true, false, true]);
        let mut asked = false;
        let later = kept_once(&path, "fp", 3, || {
            asked = true;
            Ok(vec![false, false, false])
        })
        .unwrap();
        assert_eq!(later, first, "a later rank takes the stored decision");
        assert!(!asked, "and does not decide again");
        for (fp, n) in [("other", 3), ("fp", 4)] {
            let e = kept_once(&path, fp, n, || Ok(vec![true; n]))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("augment-keep.json") && e.contains("another configuration"),
                "{e}"
            );
        }
        for round in 0..20 {
            let path = dir.join(format!("race-{round}.json"));
            let ranks: Vec<_> = (0..4)
                .map(|r| {
                    let path = path.clone();
                    std::thread::spawn(move || {
                        kept_once(&path, "fp", 4, || Ok((0..4).map(|i| i == r).collect())).unwrap()
                    })
                })
                .collect();
            let got: Vec<Vec<bool>> = ranks.into_iter().map(|h| h.join().unwrap()).collect();
            assert!(got.iter().all(|g| g == &got[0]), "round {round}: {got:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
