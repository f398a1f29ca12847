//! Architecture invariants checked against the real build.
//!
//! - The coordinator and the wire crate never depend on libtorch: no path
//!   from `distill-coordinator` or `distill-proto` to `tch`/`torch-sys` in
//!   `cargo metadata`'s resolved graph (normal, build and dev edges alike).
//! - The `distill` binary runs with an empty `LD_LIBRARY_PATH` (rpath) and
//!   links `libtorch_cuda.so` whenever the libtorch it was built against
//!   has one (so CUDA registers on a GPU machine).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;

fn metadata() -> serde_json::Value {
    // The host's platform only: every crate it needs is already in the
    // local registry after the build, so this runs offline.
    let host = String::from_utf8(
        Command::new("rustc")
            .arg("-vV")
            .output()
            .expect("rustc -vV")
            .stdout,
    )
    .unwrap();
    let host = host
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("host triple")
        .to_string();
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--format-version",
            "1",
            "--offline",
            "--filter-platform",
            &host,
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parse cargo metadata")
}

/// Names of every package reachable from the package called `root`.
fn reachable(meta: &serde_json::Value, root: &str) -> BTreeSet<String> {
    let names: HashMap<&str, &str> = meta["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let nodes: HashMap<&str, Vec<&str>> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let deps = n["deps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d["pkg"].as_str().unwrap())
                .collect();
            (n["id"].as_str().unwrap(), deps)
        })
        .collect();
    let start = names
        .iter()
        .find(|(_, n)| **n == root)
        .map(|(id, _)| *id)
        .expect("root package in metadata");
    let mut seen = BTreeSet::new();
    let mut stack = vec![start];
    while let Some(id) = stack.pop() {
        if seen.insert(id) {
            stack.extend(nodes.get(id).into_iter().flatten().copied());
        }
    }
    seen.into_iter().map(|id| names[id].to_string()).collect()
}

#[test]
fn coordinator_and_proto_never_reach_libtorch() {
    let meta = metadata();
    // The check must be able to fail: the worker does reach tch.
    assert!(
        reachable(&meta, "distill-worker").contains("tch"),
        "sanity: the worker should depend on tch"
    );
    for krate in ["distill-coordinator", "distill-proto", "distill-spec"] {
        let deps = reachable(&meta, krate);
        for forbidden in ["tch", "torch-sys"] {
            assert!(
                !deps.contains(forbidden),
                "{krate} depends on {forbidden}: the coordinator side must never link libtorch"
            );
        }
    }
}

fn distill_bin() -> &'static str {
    env!("CARGO_BIN_EXE_distill")
}

#[test]
fn binary_runs_without_ld_library_path() {
    let out = Command::new(distill_bin())
        .arg("doctor")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("spawn distill");
    assert!(
        out.status.success(),
        "distill doctor failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("doctor prints JSON");
    assert!(report["cpu_threads"].as_i64().unwrap() >= 1);
}

#[test]
fn binary_links_libtorch_cuda_when_available() {
    let libtorch = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/libtorch/lib");
    let out = Command::new("ldd")
        .arg(distill_bin())
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .expect("run ldd");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("not found"), "unresolved libraries:\n{text}");
    assert!(
        text.contains("libtorch_cpu.so"),
        "libtorch_cpu missing:\n{text}"
    );
    if libtorch.join("libtorch_cuda.so").exists() {
        assert!(
            text.contains("libtorch_cuda.so"),
            "libtorch has libtorch_cuda.so but the binary does not link it:\n{text}"
        );
    }
}
