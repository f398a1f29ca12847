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
cargo build --release -q -p distill-worker --features nccl,bench --example allreduce --example kd_step --example generate_bench
g=target/gpu
cp target/release/examples/allreduce target/release/examples/kd_step target/release/examples/generate_bench "$g/"
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
cp scripts/bench/kd_step_torch.py scripts/bench/allreduce_torch.py scripts/bench/generate_torch.py "$g/"
# The decoder check: SmolLM2's config, tokenizer and chat template (its
# 538 MB of weights would not travel; check.sh makes random ones of that
# shape), 64 chat prompts as ids and as JSONL.
s=.cache/data/models/smollm2-hf
[ -e "$s/config.json" ] || target/release/distill convert .cache/data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$s"
mkdir -p "$g/fixture/smollm2"
cp $s/config.json $s/tokenizer.json $s/tokenizer_config.json $s/generation_config.json "$g/fixture/smollm2/"
.venv/bin/python - "$s" "$g/fixture" <<'PY'
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
rows = [json.loads(l)["text"] for l in open(".cache/data/rotten_tomatoes/train.jsonl")][:64]
chats = [[{"role": "user", "content": f"Is this review positive or negative?\n\n{t}"}] for t in rows]
with open(f"{sys.argv[2]}/smollm2-chats.jsonl", "w") as f:
    for c in chats:
        f.write(json.dumps({"messages": c}) + "\n")
ids = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in chats[:16]]
ids = [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in ids]
json.dump(ids, open(f"{sys.argv[2]}/smollm2-prompts.json", "w"))
PY
du -sh "$g"
