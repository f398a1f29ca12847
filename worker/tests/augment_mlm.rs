//! `[data.augment] method = "mlm"` (TinyBERT's word replacement by the
//! teacher's masked-LM head) on a random `BertForMaskedLM` made by
//! transformers: the head's logits match transformers', such a checkpoint
//! (with its pre-training heads) loads as a teacher to fine-tune, and the
//! copies replace whole words by words the head ranks among its most likely
//! there, the same way every time.

mod common;

use common::*;
use distill_spec::{Augment, AugmentMethod};
use distill_worker::augment::Augmenter;
use distill_worker::model::mlm::MaskedLm;
use distill_worker::model::weights::read_tensors;
use distill_worker::model::{Batch, BertConfig, Task, TaskModel};
use distill_worker::tokenize::{Encoded, TextTokenizer};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

const VOCAB: i64 = 60;

fn mlm_model(dir: &Path, seed: i64) -> PathBuf {
    let s = |v: i64| v.to_string();
    reference(&[
        "make-random",
        dir.to_str().unwrap(),
        "--seed",
        &s(seed),
        "--layers",
        "2",
        "--hidden",
        "32",
        "--heads",
        "4",
        "--intermediate",
        "64",
        "--vocab",
        &s(VOCAB),
        "--labels",
        "2",
        "--mlm",
    ]);
    dir.to_path_buf()
}

fn cfg(p: f64, k: u32, seed: Option<u64>) -> Augment {
    Augment {
        method: AugmentMethod::Mlm,
        factor: 2,
        probability: p,
        neighbours: k,
        seed,
        min_confidence: None,
        per_batch: None,
    }
}

#[test]
fn the_masked_lm_head_matches_transformers_and_its_checkpoint_loads_as_a_teacher() {
    let dir = tempfile::tempdir().unwrap();
    let model = mlm_model(&dir.path().join("mlm"), 3);
    tch::manual_seed(3);
    let (b, s) = (4, 10);
    let ids = Tensor::randint_low(5, VOCAB, [b, s], (Kind::Int64, Device::Cpu));
    let mask = Tensor::ones([b, s], (Kind::Int64, Device::Cpu));
    let _ = mask.get(1).narrow(0, 6, 4).fill_(0);
    let _ = ids.get(1).narrow(0, 6, 4).fill_(0);
    let _ = ids.narrow(1, 2, 1).fill_(4); // [MASK] in every row
    let batch = Batch {
        input_ids: ids,
        attention_mask: mask.shallow_clone(),
        token_type_ids: Tensor::zeros([b, s], (Kind::Int64, Device::Cpu)),
    };
    let inputs = dir.path().join("inputs.safetensors");
    save_batch(&batch, &inputs);
    let out = dir.path().join("ref.safetensors");
    reference(&[
        "run",
        model.to_str().unwrap(),
        inputs.to_str().unwrap(),
        out.to_str().unwrap(),
        "--task",
        "mlm",
    ]);
    let want = &read_tensors(&[out]).unwrap()["logits"];
    let got = MaskedLm::load(&model, Device::Cpu).unwrap().logits(&batch);
    assert_eq!(got.size(), vec![b, s, VOCAB]);
    let m = mask.unsqueeze(-1).to_kind(Kind::Float);
    let d = max_abs_diff(&(&got * &m), &(want * &m));
    assert!(
        d < 1e-5,
        "masked-LM logits differ from transformers' by {d}"
    );

    // A checkpoint with pre-training heads (cls.*) is a teacher to fine-tune,
    // as transformers loads bert-base-uncased for a task: the heads are
    // left out, not an error.
    let t = TaskModel::load(
        &model,
        Task::Classification,
        Some(vec!["a".into(), "b".into()]),
        Device::Cpu,
    )
    .expect("a BertForMaskedLM checkpoint loads as a classification teacher");
    assert_eq!(t.labels.len(), 2);
}

/// `[CLS]` id 2, `[SEP]` 3, `[MASK]` 4; words `w5`..`w59`.
fn sources(tok: &TextTokenizer) -> Vec<Encoded> {
    let texts: Vec<String> = (0..24)
        .map(|k| {
            (0..6 + k % 5)
                .map(|j| format!("w{}", 5 + (k * 7 + j * 11) % 55))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    tok.encode(&refs, None).unwrap()
}

#[test]
fn mlm_copies_take_words_the_head_ranks_most_likely_and_are_the_same_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let model = mlm_model(&dir.path().join("mlm"), 5);
    let config = BertConfig::from_dir(&model).unwrap();
    let tok = TextTokenizer::load(&model, &config, 32).unwrap();
    let src = sources(&tok);
    let (p, k) = (0.4, 3u32);
    let make = |c: &Augment| Augmenter::new(c, 7, &tok, &model, &src).unwrap().all(&src);
    let copies = make(&cfg(p, k, None));
    assert_eq!(copies.len(), src.len() * 2);
    assert_eq!(
        copies,
        make(&cfg(p, k, None)),
        "the same seed gives the same copies"
    );
    assert_ne!(
        copies,
        make(&cfg(p, k, Some(99))),
        "another seed gives others"
    );

    let mlm = MaskedLm::load(&model, Device::Cpu).unwrap();
    let vocab = tok.vocab();
    let word = |id: i64| {
        vocab
            .iter()
            .any(|(t, &i)| i as i64 == id && t.starts_with('w'))
    };
    let mut changed = 0;
    for (n, copy) in copies.iter().enumerate() {
        let s = &src[n / 2];
        assert_eq!(copy.ids.len(), s.ids.len());
        assert_eq!(copy.type_ids, s.type_ids);
        let at: Vec<usize> = (0..s.ids.len())
            .filter(|&i| copy.ids[i] != s.ids[i])
            .collect();
        if at.is_empty() {
            continue;
        }
        changed += at.len();
        // The head's view of this example, with exactly these words masked.
        let mut masked = s.ids.clone();
        for &i in &at {
            assert!(
                word(s.ids[i]) && word(copy.ids[i]),
                "only whole words, by whole words"
            );
            masked[i] = 4;
        }
        let len = masked.len() as i64;
        let batch = Batch {
            input_ids: Tensor::from_slice(&masked).view([1, len]),
            attention_mask: Tensor::ones([1, len], (Kind::Int64, Device::Cpu)),
            token_type_ids: Tensor::from_slice(&s.type_ids).view([1, len]),
        };
        let logits = mlm.logits(&batch).get(0);
        for &i in &at {
            let row = Vec::<f32>::try_from(logits.get(i as i64)).unwrap();
            let mut ranked: Vec<(f32, i64)> = (0..VOCAB)
                .filter(|&v| word(v) && v != s.ids[i])
                .map(|v| (row[v as usize], v))
                .collect();
            ranked.sort_by(|a, b| b.0.total_cmp(&a.0));
            let kth = ranked[k as usize - 1].0;
            let mine = row[copy.ids[i] as usize];
            assert!(
                mine >= kth - 1e-4,
                "copy {n} position {i}: w{} scores {mine}, under the head's top {k} (from {kth})",
                copy.ids[i]
            );
        }
    }
    let words: usize = src.iter().map(|e| e.ids.len() - 2).sum::<usize>() * 2;
    let share = changed as f64 / words as f64;
    assert!(
        (0.25..0.55).contains(&share),
        "{changed} of {words} words replaced, expected about {p}"
    );
}

#[test]
fn mlm_without_a_masked_lm_head_is_refused_naming_the_file_and_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let model = random_model(&dir.path().join("cls"), SMALL);
    let config = BertConfig::from_dir(&model).unwrap();
    let tok = TextTokenizer::load(&model, &config, 32).unwrap();
    let src = sources(&tok);
    let err = match Augmenter::new(&cfg(0.3, 3, None), 7, &tok, &model, &src) {
        Ok(_) => panic!("mlm on a checkpoint without cls.predictions was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("model.safetensors"), "{err}");
    assert!(
        err.contains("cls.predictions.transform.dense.weight"),
        "{err}"
    );
    assert!(err.contains("\"mlm\""), "{err}");
}
