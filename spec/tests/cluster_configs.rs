//! Every job file in `cluster-configs/` and `cluster-configs/quality/` (the
//! quality study's jobs) parses, validates, and survives the TOML → JobSpec →
//! JSON → JobSpec round trip unchanged.

use std::path::Path;

use distill_spec::{from_json_str, load, StudentSize, Task};

fn configs() -> Vec<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-configs");
    let mut files = Vec::new();
    for dir in [root.clone(), root.join("quality")] {
        files.extend(
            std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "toml" || e == "json")),
        );
    }
    files.sort();
    files
}

#[test]
fn every_cluster_config_parses_and_round_trips() {
    let files = configs();
    // The top level holds at least 3 examples and quality/ at least 10 jobs.
    assert!(
        files.len() >= 13,
        "expected at least 13 job specs, found {files:?}"
    );
    for file in files {
        let spec = load(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        let json = spec.to_json();
        let again = from_json_str(&json)
            .unwrap_or_else(|e| panic!("{}: json round trip: {e}\n{json}", file.display()));
        assert_eq!(
            spec,
            again,
            "{}: round trip changed the spec",
            file.display()
        );
    }
}

#[test]
fn sentiment_example_uses_the_local_teacher_and_data() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cluster-configs");
    let spec = load(&dir.join("sentiment-minilm.toml")).unwrap();
    assert_eq!(spec.task, Task::TextClassification);
    assert_eq!(spec.teacher.path, ".cache/data/models/all-MiniLM-L6-v2");
    assert_eq!(
        spec.data.train.as_deref(),
        Some(".cache/data/rotten_tomatoes/train.jsonl")
    );
    assert_eq!(
        spec.data.labels.as_deref(),
        Some(&["rotten".to_string(), "fresh".to_string()][..])
    );
    let StudentSize::Explicit(arch) = spec.student.size else {
        panic!("preset should resolve to an explicit arch")
    };
    assert_eq!(
        (
            arch.layers,
            arch.hidden_size,
            arch.num_heads,
            arch.intermediate_size
        ),
        (3, 384, 12, 1536)
    );

    let emb = load(&dir.join("embedding-minilm.toml")).unwrap();
    assert_eq!(emb.task, Task::SentenceEmbedding);
    assert_eq!(
        emb.student.size,
        StudentSize::Ratio {
            compression_ratio: 0.5
        }
    );
}
