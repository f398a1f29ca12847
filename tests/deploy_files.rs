//! The deployment files in `cluster-configs/deploy/` parse (YAML, with
//! every Kubernetes document named and kinded), and every `distill`
//! command they run exists, with every flag it passes, in this binary's
//! CLI (`distill <command> --help`). A file that runs no `distill` command
//! fails the test, so it cannot pass by finding nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use yaml_rust2::{Yaml, YamlLoader};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster-configs/deploy")
}

/// Every string in `y`, and every sequence of strings joined by spaces
/// (a `command:` or `args:` list), as candidate command lines.
fn strings(y: &Yaml, out: &mut Vec<String>) {
    match y {
        Yaml::String(s) => out.push(s.clone()),
        Yaml::Array(items) => {
            let words: Vec<String> = items
                .iter()
                .filter_map(|i| match i {
                    Yaml::String(s) => Some(s.clone()),
                    Yaml::Integer(n) => Some(n.to_string()),
                    _ => None,
                })
                .collect();
            if !words.is_empty() {
                out.push(words.join(" "));
            }
            items.iter().for_each(|i| strings(i, out));
        }
        Yaml::Hash(h) => h.values().for_each(|v| strings(v, out)),
        _ => {}
    }
}

/// Each `distill <command> <args…>` in `line`: the command and its flags.
fn commands(line: &str) -> Vec<(String, Vec<String>)> {
    let tokens: Vec<String> = line
        .split_whitespace()
        .map(|t| t.trim_matches(|c| "'\"[],".contains(c)).to_string())
        .collect();
    let mut found = vec![];
    for (i, t) in tokens.iter().enumerate() {
        // `distill …`, or `$(distill …)` in a shell substitution.
        if t != "distill" && !t.ends_with("(distill") {
            continue;
        }
        let Some(cmd) = tokens.get(i + 1).filter(|c| !c.is_empty()) else {
            continue;
        };
        let mut flags = vec![];
        let rest = if cmd.starts_with("--") {
            &tokens[i + 1..]
        } else {
            &tokens[i + 2..]
        };
        for t in rest {
            if ["&", "&&", ";", "|", ")"].contains(&t.as_str()) || t == "distill" {
                break;
            }
            if let Some(f) = t.strip_prefix("--") {
                flags.push(format!("--{}", f.split('=').next().unwrap()));
            }
        }
        let cmd = if cmd.starts_with("--") { "" } else { cmd };
        found.push((cmd.to_string(), flags));
    }
    found
}

/// Shell files: non-comment lines, with `\` continuations joined.
fn shell_lines(text: &str) -> Vec<String> {
    let joined = text.replace("\\\n", " ");
    joined
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .map(String::from)
        .collect()
}

fn help(cmd: &str, cache: &mut BTreeMap<String, String>) -> String {
    cache
        .entry(cmd.to_string())
        .or_insert_with(|| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_distill"));
            if !cmd.is_empty() {
                c.arg(cmd);
            }
            let out = c.arg("--help").output().unwrap();
            assert!(
                out.status.success(),
                "`distill {cmd} --help` failed: there is no such command\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
        .clone()
}

#[test]
fn deployment_files_parse_and_use_only_real_commands_and_flags() {
    let mut files: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        // The README explains the files; it runs nothing.
        .filter(|p| p.extension().is_none_or(|e| e != "md"))
        .collect();
    files.sort();
    let names: BTreeSet<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for want in [
        "Dockerfile",
        "docker-compose.yaml",
        "kubernetes.yaml",
        "slurm.sbatch",
    ] {
        assert!(names.contains(want), "cluster-configs/deploy/{want} exists");
    }
    let mut cache = BTreeMap::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let lines = if name.ends_with(".yaml") {
            let docs = YamlLoader::load_from_str(&text)
                .unwrap_or_else(|e| panic!("{name}: not YAML: {e}"));
            assert!(!docs.is_empty(), "{name}: no YAML document");
            if name == "kubernetes.yaml" {
                for d in &docs {
                    assert!(
                        d["kind"].as_str().is_some() && d["metadata"]["name"].as_str().is_some(),
                        "{name}: a document without kind or metadata.name: {d:?}"
                    );
                }
                let kinds: BTreeSet<&str> =
                    docs.iter().filter_map(|d| d["kind"].as_str()).collect();
                for k in ["StatefulSet", "Deployment", "Service"] {
                    assert!(kinds.contains(k), "{name}: has a {k}");
                }
                assert!(
                    text.contains("nvidia.com/gpu"),
                    "{name}: workers request GPUs"
                );
            }
            let mut out = vec![];
            docs.iter().for_each(|d| strings(d, &mut out));
            out
        } else {
            shell_lines(&text)
        };
        let mut used = BTreeSet::new();
        for line in &lines {
            for (cmd, flags) in commands(line) {
                let h = help(&cmd, &mut cache);
                for f in &flags {
                    assert!(
                        h.contains(&format!("{f} ")) || h.contains(&format!("{f}\n")),
                        "{name}: `distill {cmd}` has no flag {f}:\n{line}"
                    );
                }
                used.insert(cmd);
            }
        }
        eprintln!("{name}: distill {used:?}");
        assert!(!used.is_empty(), "{name}: runs no distill command");
        if name != "Dockerfile" {
            let roles: &[&str] = if name == "slurm.sbatch" {
                &["coordinator", "worker", "submit", "watch"]
            } else {
                &["coordinator", "worker"]
            };
            for role in roles {
                assert!(used.contains(*role), "{name}: runs `distill {role}`");
            }
        }
    }
}
