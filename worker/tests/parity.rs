//! Parity with Hugging Face transformers (the reference users trust): the same
//! weights and inputs give the same hidden states, attentions and
//! logits/embeddings within 1e-5 (fp32), and a model exported by distill and
//! reloaded by transformers gives the same outputs again.

mod common;

use common::*;
use distill_worker::model::export::export;
use distill_worker::model::weights::read_tensors;
use distill_worker::model::{Batch, Outputs, Task, TaskModel};
use distill_worker::tokenize::{Padding, TextTokenizer};
use std::collections::BTreeMap;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-5;

fn random_batch(vocab: i64, seed: i64) -> Batch {
    tch::manual_seed(seed);
    let (b, s) = (5, 12);
    let ids = Tensor::randint_low(5, vocab, [b, s], (Kind::Int64, Device::Cpu));
    let lengths = [12, 7, 3, 12, 9];
    let mask = Tensor::zeros([b, s], (Kind::Int64, Device::Cpu));
    for (r, &l) in lengths.iter().enumerate() {
        let _ = mask.get(r as i64).narrow(0, 0, l).fill_(1);
    }
    let ids = &ids * &mask; // pad id 0 where masked
    let types = Tensor::zeros([b, s], (Kind::Int64, Device::Cpu));
    let _ = types.narrow(1, 6, 6).fill_(1);
    let types = types * &mask;
    Batch {
        input_ids: ids,
        attention_mask: mask,
        token_type_ids: types,
    }
}

/// Compare everything distill computes against the reference file.
fn compare(model: &TaskModel, batch: &Batch, reference: &BTreeMap<String, Tensor>, what: &str) {
    let out = tch::no_grad(|| {
        model.forward_t(
            batch,
            Outputs {
                hidden_states: true,
                attentions: true,
            },
            false,
        )
    });
    let mask = batch.attention_mask.unsqueeze(-1).to_kind(Kind::Float);
    let n_layers = model.config().num_hidden_layers as usize;
    assert_eq!(out.encoder.hidden_states.len(), n_layers + 1);
    assert_eq!(out.encoder.attentions.len(), n_layers);
    for (i, h) in out.encoder.hidden_states.iter().enumerate() {
        // Compare real-token positions (padding rows are don't-care in both).
        let r = &reference[&format!("hidden_states.{i}")];
        let d = max_abs_diff(&(h * &mask), &(r * &mask));
        assert!(d < TOL, "{what}: hidden_states.{i} differs by {d}");
    }
    for (i, a) in out.encoder.attentions.iter().enumerate() {
        let key_mask = batch
            .attention_mask
            .unsqueeze(1)
            .unsqueeze(-1)
            .to_kind(Kind::Float);
        let r = &reference[&format!("attentions.{i}")];
        let d = max_abs_diff(&(a * &key_mask), &(r * &key_mask));
        assert!(d < TOL, "{what}: attentions.{i} differs by {d}");
    }
    let key = if model.task == Task::Classification {
        "logits"
    } else {
        "embeddings"
    };
    let d = max_abs_diff(&out.output, &reference[key]);
    assert!(d < TOL, "{what}: {key} differs by {d}");
    // The fused-attention path (used when attentions are not asked for) agrees too.
    let fast = tch::no_grad(|| model.forward_t(batch, Outputs::default(), false));
    let d = max_abs_diff(&fast.output, &reference[key]);
    assert!(d < TOL, "{what}: {key} (fused attention) differs by {d}");
}

fn check_random(
    layers: i64,
    hidden: i64,
    heads: i64,
    inter: i64,
    vocab: i64,
    labels: i64,
    seed: i64,
) {
    let dir = tempfile::tempdir().unwrap();
    let model_dir = dir.path().join("model");
    random_model(
        &model_dir,
        Random {
            seed,
            layers,
            hidden,
            heads,
            intermediate: inter,
            vocab,
            labels,
        },
    );
    let batch = random_batch(vocab, seed);
    let inputs = dir.path().join("inputs.safetensors");
    save_batch(&batch, &inputs);
    let what = format!("L{layers}-H{hidden}-A{heads}-V{vocab}");
    for task in [Task::Classification, Task::Embedding] {
        let tname = if task == Task::Classification {
            "classification"
        } else {
            "embedding"
        };
        let ref_path = dir.path().join(format!("ref-{tname}.safetensors"));
        reference(&[
            "run",
            model_dir.to_str().unwrap(),
            inputs.to_str().unwrap(),
            ref_path.to_str().unwrap(),
            "--task",
            tname,
        ]);
        let reference_out = read_tensors(&[ref_path]).unwrap();
        let model = TaskModel::load(&model_dir, task, None, Device::Cpu).unwrap();
        compare(&model, &batch, &reference_out, &format!("{what} {tname}"));

        // Export, reload in transformers, compare again.
        let exported = dir.path().join(format!("export-{tname}"));
        export(&model, &exported, &model_dir).unwrap();
        let ref2 = dir.path().join(format!("ref2-{tname}.safetensors"));
        reference(&[
            "run",
            exported.to_str().unwrap(),
            inputs.to_str().unwrap(),
            ref2.to_str().unwrap(),
            "--task",
            tname,
        ]);
        compare(
            &model,
            &batch,
            &read_tensors(&[ref2]).unwrap(),
            &format!("{what} {tname} exported"),
        );
    }
}

#[test]
fn random_configs_match_transformers() {
    check_random(2, 32, 4, 64, 100, 3, 1);
    check_random(3, 48, 6, 80, 211, 2, 2);
    check_random(1, 64, 2, 128, 57, 5, 3);
    check_random(4, 24, 3, 40, 90, 4, 4);
}

#[test]
fn minilm_teacher_matches_transformers() {
    let teacher = minilm_dir();
    let model = TaskModel::load(&teacher, Task::Embedding, None, Device::Cpu).unwrap();
    assert!(model.normalize, "all-MiniLM-L6-v2 ships a Normalize module");
    let tok = TextTokenizer::load(&teacher, model.config(), 128).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Real text: the first 12 rotten-tomatoes test reviews.
    let text = std::fs::read_to_string(data_file("rotten_tomatoes/test.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().take(12).collect();
    let texts_path = dir.path().join("texts.jsonl");
    std::fs::write(&texts_path, lines.join("\n")).unwrap();
    let texts: Vec<String> = lines
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let enc = tok.encode(&refs, None).unwrap();
    let encr: Vec<_> = enc.iter().collect();
    let batch = tok.batch(&encr, Padding::Dynamic, Device::Cpu);

    // Tokenization matches the HF fast tokenizer.
    let tok_ref = dir.path().join("tok.safetensors");
    reference(&[
        "tokenize",
        teacher.to_str().unwrap(),
        texts_path.to_str().unwrap(),
        tok_ref.to_str().unwrap(),
    ]);
    let t = read_tensors(&[tok_ref]).unwrap();
    assert!(
        batch.input_ids.equal(&t["input_ids"]),
        "token ids differ from transformers' tokenizer"
    );
    assert!(batch.attention_mask.equal(&t["attention_mask"]));

    let inputs = dir.path().join("inputs.safetensors");
    save_batch(&batch, &inputs);
    let ref_path = dir.path().join("ref.safetensors");
    reference(&[
        "run",
        teacher.to_str().unwrap(),
        inputs.to_str().unwrap(),
        ref_path.to_str().unwrap(),
        "--task",
        "embedding",
        "--normalize",
    ]);
    compare(
        &model,
        &batch,
        &read_tensors(&[ref_path]).unwrap(),
        "all-MiniLM-L6-v2",
    );
}
