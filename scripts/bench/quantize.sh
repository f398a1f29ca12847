#!/usr/bin/env bash
# Quantization benchmark on the quick-start student: one command prints
# accuracy (rotten-tomatoes test split), p50 latency at batch 1 and 32, and
# size for the student in fp32, bf16, int8_dynamic, int8_weight_only and
# int4 (distill quantize + distill eval), and beside them, in the same run,
# the same student under PyTorch fp32 and torch.ao.quantization.quantize_dynamic
# (INT8), with the same inputs and threads.
#   scripts/bench/quantize.sh [STUDENT_DIR] [TEACHER_DIR] [THREADS]
# STUDENT_DIR defaults to runs/sentiment-quickstart/student (scripts/demo.sh
# makes it); TEACHER_DIR to the job's fine-tuned teacher beside it.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
student=${1:-runs/sentiment-quickstart/student}
teacher=${2:-$(dirname "$student")/teacher}
threads=${3:-2}
spec=cluster-configs/sentiment-quickstart.toml
bin=target/release/distill
[ -x "$bin" ] || cargo build --release --bin distill
[ -e "$student/model.safetensors" ] || { echo "no student at $student: run scripts/demo.sh first" >&2; exit 2; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
export OMP_NUM_THREADS=$threads HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
models=(--model "$student")
for f in bf16 int8_dynamic int8_weight_only int4; do
  "$bin" quantize "$student" --format $f --output "$out/$f" >&2
  models+=(--model "$out/$f")
done
OMP_NUM_THREADS=$threads "$bin" eval $spec "${models[@]}" --teacher "$teacher" --output json > "$out/distill.json"
.venv/bin/python scripts/bench/quantize_torch.py --model "$student" \
  --test .cache/data/rotten_tomatoes/test.jsonl --labels rotten,fresh --max-length 64 \
  --batch-sizes 1,32 --iters 50 --threads "$threads" > "$out/torch.jsonl"
python3 - "$out" <<'PY'
import json, os, sys
out = sys.argv[1]
rows = []
for r in json.load(open(f"{out}/distill.json"))[1:]:
    m = r["report"]
    name = r["model"].rsplit("(", 1)[-1].rstrip(")")
    lat = {str(l["batch_size"]): l["p50_ms"] for l in m["latency"]}
    rows.append(("distill " + name, m["metric"], lat["1"], lat["32"], m["bytes_on_disk"]))
for l in open(f"{out}/torch.jsonl"):
    t = json.loads(l)
    rows.append((t["model"], t["accuracy"], t["p50_ms"]["1"], t["p50_ms"]["32"], t["bytes"]))
fp32 = rows[0]
peer = [r for r in rows if "quantize_dynamic" in r[0]][0]
print("\nquick-start student, rotten-tomatoes test split, p50 over 50 passes, same inputs and threads")
print(f"{'model':34s} {'accuracy':>8s} {'Δ vs fp32':>9s} {'p50@1 ms':>9s} {'p50@32 ms':>10s} {'@32 vs fp32':>11s} {'@32 vs torch int8':>17s} {'MB':>7s}")
for n, acc, l1, l32, b in rows:
    print(f"{n:34s} {acc:8.4f} {100*(acc-fp32[1]):+8.2f}p {l1:9.2f} {l32:10.2f} {fp32[3]/l32:10.2f}x {peer[3]/l32:16.2f}x {b/1e6:7.1f}")
PY
