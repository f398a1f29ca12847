//! Offline teacher-signal shards: written once, reused by key, and a
//! mismatched or tampered shard is refused.

mod common;

use common::*;
use distill_worker::artifacts::Artifacts;
use distill_worker::infer::{infer, InferOptions};
use distill_worker::model::{Task, TaskModel};
use distill_worker::signal::{read_shard, write_shard, ShardSpec, TeacherId};
use distill_worker::tokenize::TextTokenizer;
use tch::Device;

#[test]
fn shards_roundtrip_and_mismatches_are_refused() {
    let dir = minilm_dir();
    let teacher = TaskModel::load(&dir, Task::Embedding, None, Device::Cpu).unwrap();
    let tok = TextTokenizer::load(&dir, teacher.config(), 64).unwrap();
    let texts = [
        "a quiet triumph",
        "tedious and overlong",
        "the cast is superb",
        "never finds its footing",
    ];
    let ex = tok.encode(&texts, None).unwrap();
    let id = TeacherId::of(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let store = Artifacts::open(tmp.path().to_str().unwrap()).unwrap();
    let spec = ShardSpec {
        teacher: &id,
        kind: "embeddings",
        max_length: 64,
        start: 1,
        end: 4,
    };
    assert!(
        read_shard(&store, &spec, &ex).unwrap().is_none(),
        "nothing computed yet"
    );
    let sig = infer(
        &teacher,
        &tok,
        &ex[1..4],
        InferOptions::default(),
        |_, _| {},
    )
    .unwrap();
    let (manifest_key, _) = write_shard(&store, &spec, &ex, &sig).unwrap();
    let written = tmp
        .path()
        .join(manifest_key.trim_end_matches("/manifest.json"));
    let back = read_shard(&store, &spec, &ex)
        .unwrap()
        .expect("shard found by key");
    assert!(back.equal(&sig));

    // Different data, settings or teacher: a different key, so nothing stale is found.
    let other = tok
        .encode(
            &[
                "a quiet triumph",
                "tedious",
                "the cast is superb",
                "never finds its footing",
            ],
            None,
        )
        .unwrap();
    assert!(read_shard(&store, &spec, &other).unwrap().is_none());
    let spec32 = ShardSpec {
        max_length: 32,
        ..spec.clone()
    };
    assert!(read_shard(&store, &spec32, &ex).unwrap().is_none());
    let other_teacher = TeacherId {
        teacher_sha256: "0".repeat(64),
        ..id.clone()
    };
    assert!(read_shard(
        &store,
        &ShardSpec {
            teacher: &other_teacher,
            ..spec.clone()
        },
        &ex
    )
    .unwrap()
    .is_none());

    // A manifest that disagrees with what the job needs is refused, naming the field.
    let mpath = written.join("manifest.json");
    let good = std::fs::read_to_string(&mpath).unwrap();
    let mut m: serde_json::Value = serde_json::from_str(&good).unwrap();
    m["tokenizer_sha256"] = "f".repeat(64).into();
    std::fs::write(&mpath, m.to_string()).unwrap();
    let e = read_shard(&store, &spec, &ex).unwrap_err().to_string();
    assert!(
        e.contains("manifest.json") && e.contains("tokenizer_sha256") && e.contains("refusing"),
        "{e}"
    );

    // A tampered signal file is refused by its checksum.
    std::fs::write(&mpath, good).unwrap();
    let f = written.join("signal.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&f, bytes).unwrap();
    let e = read_shard(&store, &spec, &ex).unwrap_err().to_string();
    assert!(e.contains("checksum"), "{e}");
}
