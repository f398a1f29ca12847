#!/usr/bin/env bash
# KD training-step benchmark: distill vs PyTorch, same machine, same threads,
# interleaved runs; prints medians and the ratio (PyTorch time / distill time,
# so > 1.0 means distill is faster), and per phase where the time goes.
#   scripts/bench/kd_step.sh [RUNS] [STEPS] [THREADS] [DEVICE] [PRECISION]
# DEVICE: cpu (default) or cuda[:N]; PRECISION: fp32 (default) or bf16 (autocast).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
runs=${1:-3}; steps=${2:-10}; threads=${3:-2}; device=${4:-cpu}; precision=${5:-fp32}
model=.cache/data/models/all-MiniLM-L6-v2
data=.cache/data/rotten_tomatoes/train.jsonl
cargo build --release -q -p distill-worker --features bench --example kd_step
export OMP_NUM_THREADS=$threads HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
out=$(mktemp)
for r in $(seq "$runs"); do
  target/release/examples/kd_step $model $data "$steps" "$threads" "$device" "$precision" | tee -a "$out"
  .venv/bin/python scripts/bench/kd_step_torch.py $model $data "$steps" "$threads" "$device" "$precision" 2>/dev/null | tee -a "$out"
done
python3 - "$out" "$device $precision, $threads threads" <<'PY'
import json, statistics, sys
r, ph = {}, {}
for l in open(sys.argv[1]):
    j = json.loads(l); r.setdefault(j["impl"], []).append(j["median_step_seconds"])
    for k, v in j.get("phases", {}).items():
        ph.setdefault(k, {}).setdefault(j["impl"], []).append(v)
d, p = statistics.median(r["distill"]), statistics.median(r["pytorch"])
print("\nwhere the time goes (median ms):  phase                 distill  pytorch  ratio")
for k, v in ph.items():
    a, b = statistics.median(v["distill"]), statistics.median(v["pytorch"])
    print(f"  {k:<22} {a*1000:8.1f} {b*1000:8.1f}  {b/a:5.2f}x")
print(f"\nKD step (batch 32, len 64, teacher online, {sys.argv[2]}): distill {d*1000:.0f} ms  pytorch {p*1000:.0f} ms  speed ratio {p/d:.2f}x")
PY
