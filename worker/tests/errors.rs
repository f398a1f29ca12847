//! Bad model directories get one clear error naming the file and the problem.

mod common;

use common::*;
use distill_worker::model::{Task, TaskModel};
use distill_worker::tokenize::TextTokenizer;
use std::path::{Path, PathBuf};
use tch::Device;

/// A small random model made by transformers (with its own tokenizer.json).
fn random_model(root: &Path) -> PathBuf {
    common::random_model(
        &root.join("model"),
        Random {
            seed: 7,
            layers: 1,
            hidden: 16,
            heads: 2,
            intermediate: 32,
            ..SMALL
        },
    )
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

fn load_err(dir: &Path) -> String {
    match TaskModel::load(dir, Task::Classification, None, Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn bad_model_directories_are_reported_precisely() {
    let tmp = tempfile::tempdir().unwrap();
    let good = random_model(tmp.path());
    let model = TaskModel::load(&good, Task::Classification, None, Device::Cpu)
        .expect("the untouched model loads");
    assert!(TextTokenizer::load(&good, model.config(), 32).is_ok());

    // Truncated weights.
    let d = tmp.path().join("truncated");
    copy_dir(&good, &d);
    let w = d.join("model.safetensors");
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );

    // Corrupt header.
    let d = tmp.path().join("corrupt");
    copy_dir(&good, &d);
    let mut bytes = std::fs::read(d.join("model.safetensors")).unwrap();
    for b in bytes[8..40].iter_mut() {
        *b = b'#';
    }
    std::fs::write(d.join("model.safetensors"), &bytes).unwrap();
    let e = load_err(&d);
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );

    // No weights at all.
    let d = tmp.path().join("noweights");
    copy_dir(&good, &d);
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    let e = load_err(&d);
    assert!(e.contains("no model.safetensors"), "{e}");

    // Vocab size in config.json disagrees with the embeddings.
    let d = tmp.path().join("vocab");
    copy_dir(&good, &d);
    edit_config(&d, |v| v["vocab_size"] = 61.into());
    let e = load_err(&d);
    assert!(
        e.contains("word_embeddings")
            && e.contains("vocab_size is 61")
            && e.contains("has 60 rows"),
        "{e}"
    );

    // A layer count that the weights do not have: missing tensors by name.
    let d = tmp.path().join("layers");
    copy_dir(&good, &d);
    edit_config(&d, |v| v["num_hidden_layers"] = 2.into());
    let e = load_err(&d);
    assert!(e.contains("missing tensors: encoder.layer.1."), "{e}");

    // Unsupported architecture.
    let d = tmp.path().join("arch");
    copy_dir(&good, &d);
    edit_config(&d, |v| v["model_type"] = "gpt2".into());
    let e = load_err(&d);
    assert!(
        e.contains("config.json") && e.contains("unsupported architecture 'gpt2'"),
        "{e}"
    );

    // Missing tokenizer.
    let d = tmp.path().join("notok");
    copy_dir(&good, &d);
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    let m = TaskModel::load(&d, Task::Classification, None, Device::Cpu).unwrap();
    let e = TextTokenizer::load(&d, m.config(), 32)
        .err()
        .expect("missing tokenizer must fail")
        .to_string();
    assert!(
        e.contains("tokenizer.json") && e.contains("missing tokenizer"),
        "{e}"
    );

    // A tokenizer whose vocabulary is bigger than the model's (the MiniLM one).
    let d = tmp.path().join("othertok");
    copy_dir(&good, &d);
    std::fs::copy(
        minilm_dir().join("tokenizer.json"),
        d.join("tokenizer.json"),
    )
    .unwrap();
    let e = TextTokenizer::load(&d, m.config(), 32)
        .err()
        .expect("vocab mismatch must fail")
        .to_string();
    assert!(
        e.contains("30522 tokens") && e.contains("vocab_size is 60"),
        "{e}"
    );
}

/// fp16 training needs loss scaling, which is not built: refused up front by
/// `plan` and every task (`prepare`), naming the field, instead of training badly.
#[test]
fn fp16_training_is_refused_naming_the_field() {
    let spec = distill_spec::from_toml_str(
        "task = \"text_classification\"\n[teacher]\npath = \"/nonexistent\"\n[data]\ntrain = \"t.jsonl\"\n[training]\nprecision = \"fp16\"\n",
    )
    .unwrap();
    for e in [
        distill_worker::plan::plan(&spec)
            .err()
            .map(|e| e.to_string()),
        distill_worker::pipeline::check_supported(&spec)
            .err()
            .map(|e| e.to_string()),
    ] {
        let e = e.expect("refused");
        // `plan` lists it among every problem it finds.
        assert!(e.contains("training.precision: \"fp16\""), "{e}");
    }
}
