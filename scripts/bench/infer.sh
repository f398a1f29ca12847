#!/usr/bin/env bash
# Teacher-inference benchmark: distill vs PyTorch/transformers on the same
# machine, same texts (rotten-tomatoes test split), batch 64, same threads,
# for fixed padding to 128 and for dynamic length-bucketed padding.
# Prints each run, then medians and the distill/PyTorch ratio.
#   scripts/bench/infer.sh [REPEATS] [THREADS]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
repeats=${1:-3}
threads=${2:-2}
model=.cache/data/models/all-MiniLM-L6-v2
data=.cache/data/rotten_tomatoes/test.jsonl
bin=target/release/distill
[ -x "$bin" ] || cargo build --release --bin distill
out=$(mktemp -d)
export OPENBLAS_NUM_THREADS=$threads OMP_NUM_THREADS=$threads HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
for padding in fixed dynamic; do
  for r in $(seq "$repeats"); do
    "$bin" infer --model $model --data $data --output "$out/o.safetensors" --batch-size 64 --max-length 128 \
      --padding $padding --threads "$threads" 2>/dev/null | sed "s/^/distill $padding /" | tee -a "$out/runs"
    .venv/bin/python scripts/bench/infer_torch.py --model $model --data $data --batch-size 64 --max-length 128 \
      --padding $padding --threads "$threads" | sed "s/^/pytorch $padding /" | tee -a "$out/runs"
  done
done
python3 - "$out/runs" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    impl, padding, js = line.split(" ", 2)
    runs.setdefault((impl, padding), []).append(json.loads(js)["examples_per_second"])
print("\nmedian sentences/s (batch 64, all-MiniLM-L6-v2, rotten-tomatoes test split)")
for padding in ("fixed", "dynamic"):
    d, p = statistics.median(runs[("distill", padding)]), statistics.median(runs[("pytorch", padding)])
    print(f"  {padding:8s} distill {d:8.1f}  pytorch {p:8.1f}  ratio {d / p:.2f}x")
d_fix, d_dyn = statistics.median(runs[("distill", "fixed")]), statistics.median(runs[("distill", "dynamic")])
print(f"  distill dynamic/fixed: {d_dyn / d_fix:.2f}x")
PY
