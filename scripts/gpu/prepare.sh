#!/usr/bin/env bash
# Prepares target/gpu/ for scripts/gpu/check.sh on a CUDA machine that has
# PyTorch but no Rust toolchain: the NCCL build of `distill`, the
# `allreduce` and `kd_step` benchmark programs, a tiny random teacher with
# its data and a job file, and the real MiniLM-L6's config and tokenizer
# (the check makes random weights of that shape there: 90 MB of weights
# would not travel). Then, from the repository root on the GPU machine:
#   bash scripts/gpu/check.sh        (writes its logs to $OUT or gpu-out/)
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"
bash scripts/gpu/build.sh
DISTILL_CUDA_INCLUDE="$(bash scripts/gpu/headers.sh)"
export DISTILL_CUDA_INCLUDE
cargo build --release -q -p distill-worker --features nccl,bench --example allreduce --example kd_step
g=target/gpu
cp target/release/examples/allreduce target/release/examples/kd_step "$g/"
rm -rf "$g/fixture" && mkdir -p "$g/fixture/minilm"
.venv/bin/python scripts/parity/reference.py make-random "$g/fixture/teacher" --seed 3 \
  --layers 2 --hidden 32 --heads 4 --intermediate 64 --vocab 60 --labels 2 >/dev/null
python3 - "$g/fixture" <<'PY'
import json, sys
d = sys.argv[1]
def rows(path, n, offset):
    with open(path, "w") as f:
        for i in range(n):
            k = i + offset
            words = " ".join(f"w{5 + (k * 11 + j * 7) % 50}" for j in range(4 + k % 12))
            f.write(json.dumps({"text": words, "label": f"class_{k % 2}"}) + "\n")
rows(f"{d}/train.jsonl", 600, 0)
rows(f"{d}/test.jsonl", 40, 10000)
PY
m=.cache/data/models/all-MiniLM-L6-v2
cp $m/config.json $m/tokenizer.json $m/tokenizer_config.json $m/vocab.txt $m/special_tokens_map.json "$g/fixture/minilm/"
head -64 .cache/data/rotten_tomatoes/train.jsonl > "$g/fixture/reviews.jsonl"
cp scripts/bench/kd_step_torch.py scripts/bench/allreduce_torch.py "$g/"
du -sh "$g"
