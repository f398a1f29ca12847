#!/usr/bin/env bash
# Set up (if needed), build, and run the quick-start job end to end on the real
# teacher: fine-tune all-MiniLM-L6-v2 on rotten-tomatoes sentiment, distil a
# 3-layer student, evaluate on the test split, quantize, export, and print the
# result table. Arguments go to `distill run`: `--baseline` also trains the
# same student on labels alone for comparison (about 8 more minutes on 2
# CPU cores), `--output DIR` writes elsewhere.
# Output: runs/sentiment-quickstart/ (re-running resumes from checkpoints).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
cargo build --release --bin distill
target/release/distill plan cluster-configs/sentiment-quickstart.toml
time target/release/distill run cluster-configs/sentiment-quickstart.toml "$@"
