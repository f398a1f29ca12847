//! The language-model commands as a user runs them, on the packaged
//! SmolLM2 (converted by `distill convert`): `distill generate` keeps each
//! line's fields and order and adds text, ids, finish and log-probabilities;
//! a bad prompts line is refused naming the file and line, and no output is
//! written; `distill student` on the decoder prints its shape and memory.

mod common;

use std::process::Command;

fn distill() -> Command {
    Command::new(env!("CARGO_BIN_EXE_distill"))
}

#[test]
fn convert_generate_and_refuse_a_bad_line() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = common::root().join(".cache/data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        gguf.exists(),
        "{} missing: run scripts/setup.sh",
        gguf.display()
    );
    let model = tmp.path().join("smol");
    let out = distill()
        .args(["convert"])
        .arg(&gguf)
        .arg(&model)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(model.join(f).exists(), "convert did not write {f}");
    }

    let prompts = tmp.path().join("prompts.jsonl");
    std::fs::write(
        &prompts,
        concat!(
            r#"{"id": "a", "messages": [{"role": "user", "content": "What is the capital of France?"}]}"#, "\n",
            "\n",
            r#"{"id": "b", "prompt": "The three primary colours are"}"#, "\n",
        ),
    )
    .unwrap();
    let result = tmp.path().join("out.jsonl");
    let out = distill()
        .args(["--log-format", "plain", "generate"])
        .arg(&model)
        .arg(&prompts)
        .arg("--output")
        .arg(&result)
        .args([
            "--max-new-tokens",
            "6",
            "--logprobs",
            "3",
            "--threads",
            "2",
            "--signal-out",
        ])
        .arg(tmp.path().join("signal.safetensors"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("tokens/s") && !err.contains('\u{1b}'),
        "progress without colour codes expected:\n{err}"
    );
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(&result)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["id"], "a");
    assert_eq!(rows[1]["id"], "b");
    assert!(rows[0]["messages"].is_array(), "input fields are kept");
    for r in &rows {
        let ids = r["ids"].as_array().unwrap();
        assert!(!ids.is_empty() && ids.len() <= 6);
        assert!(["eos", "stop", "length"].contains(&r["finish"].as_str().unwrap()));
        assert_eq!(r["logprobs"].as_array().unwrap().len(), ids.len());
        assert_eq!(r["logprobs"][0]["top"].as_array().unwrap().len(), 3);
    }
    assert!(
        rows[0]["text"].as_str().unwrap().contains("Paris"),
        "{}",
        rows[0]["text"]
    );
    assert!(err.contains("bytes per response token"), "{err}");
    let sig =
        distill_worker::distill::lm_train::read_signal(&tmp.path().join("signal.safetensors"))
            .unwrap();
    assert_eq!(sig.len(), 2);
    assert_eq!(
        sig[0].ids[sig[0].prompt_len..].to_vec(),
        serde_json::from_value::<Vec<i64>>(rows[0]["ids"].clone()).unwrap()
    );

    // A line without prompt or messages: refused by file and line, nothing written.
    std::fs::write(
        &prompts,
        "{\"prompt\": \"ok\"}\n{\"question\": \"where is the prompt?\"}\n",
    )
    .unwrap();
    let result2 = tmp.path().join("out2.jsonl");
    let out = distill()
        .arg("generate")
        .arg(&model)
        .arg(&prompts)
        .arg("--output")
        .arg(&result2)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("prompts.jsonl:2") && err.contains("no prompt or messages"),
        "{err}"
    );
    assert!(
        !result2.exists(),
        "an output file was written for a refused input"
    );

    // A decoder student: shape, parameters and memory printed.
    let student = tmp.path().join("student");
    let out = distill()
        .args(["student", "--teacher"])
        .arg(&model)
        .arg("--output")
        .arg(&student)
        .args(["--compression-ratio", "0.75"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["student"]["hidden"], 384);
    assert!(
        (v["kept_fraction"].as_f64().unwrap() - 0.25).abs() < 0.05,
        "{v}"
    );
    assert!(v["memory_mb"]["weights"].as_f64().unwrap() > 100.0);
    assert!(student.join("model.safetensors").exists() && student.join("tokenizer.json").exists());
}

/// `distill generate` killed (SIGKILL) after its first group of prompts
/// resumes from OUT.partial when the same command runs again, and writes
/// exactly what an uninterrupted run writes; a partial file from other
/// settings is refused, not mixed in.
#[test]
fn generate_resumes_after_sigkill() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = common::root().join(".cache/data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    let model = tmp.path().join("smol");
    assert!(distill()
        .arg("convert")
        .arg(&gguf)
        .arg(&model)
        .status()
        .unwrap()
        .success());
    let prompts = tmp.path().join("prompts.jsonl");
    let lines: String = (0..12)
        .map(|i| {
            format!("{{\"n\": {i}, \"prompt\": \"Here is fact number {i} about the ocean:\"}}\n")
        })
        .collect();
    std::fs::write(&prompts, lines).unwrap();
    let run = |out: &std::path::Path, new: &str| {
        let mut c = distill();
        c.args(["--log-format", "plain", "generate"])
            .arg(&model)
            .arg(&prompts)
            .arg("--output")
            .arg(out)
            .args([
                "--batch-size",
                "1",
                "--max-new-tokens",
                new,
                "--threads",
                "2",
            ]);
        c
    };
    let full = tmp.path().join("full.jsonl");
    let o = run(&full, "20").output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let out = tmp.path().join("out.jsonl");
    let partial = tmp.path().join("out.jsonl.partial");
    let mut child = run(&out, "20")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the first group's results to reach the disk, then kill.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    loop {
        let lines = std::fs::read_to_string(&partial)
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if lines >= 2 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "generate ended before its first group was on disk"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no partial results after 120 s"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !out.exists(),
        "killed after the first group, yet the output exists"
    );
    let saved = std::fs::read_to_string(&partial).unwrap().lines().count() - 1;
    assert!((1..12).contains(&saved), "{saved} results saved");

    // Other settings: refused, the partial file kept.
    let o = run(&out, "7").output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("another model, prompts or settings"));
    assert!(partial.exists());

    // The same command: resumes and writes what the uninterrupted run wrote.
    let o = run(&out, "20").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("{saved} of 12 prompts already generated")),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        std::fs::read_to_string(&full).unwrap()
    );
    assert!(
        !partial.exists(),
        "the partial file is removed once the output is written"
    );
}
