#!/usr/bin/env bash
# Data-parallel KD training throughput: distill's Trainer over its c10d
# Gloo shim (worker/examples/dp_train.rs) against PyTorch DDP with gloo
# (scripts/bench/dp_train_torch.py), the same model, data and batch, one
# thread per process, at world sizes 1 and 2, interleaved over ROUNDS.
# Prints per implementation the median samples/s at each world size, the
# scaling efficiency (world-2 throughput / twice world-1's), and distill's
# world-2 throughput against DDP's. distill's world-2 run goes twice: with
# its gradients summed while backward runs (what the cluster does on Gloo)
# and with every sum after backward ("distill-after"); their ratio is what
# the overlap buys, and the two must end in the same training state.
# It also runs two independent world-1 distill processes at once (no
# communication at all): their summed throughput over twice one process's
# alone is the ceiling that sharing the machine's cores, caches and memory
# bandwidth puts on any data-parallel run here, whatever its collectives.
#   scripts/bench/dp_train.sh [ROUNDS] [STEPS]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
rounds=${1:-2}; steps=${2:-20}
model=.cache/data/models/all-MiniLM-L6-v2
data=.cache/data/rotten_tomatoes/train.jsonl
cargo build --release -q -p distill-worker --features bench --example dp_train
bin=target/release/examples/dp_train
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
py=.venv/bin/python
out=$(mktemp)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for r in $(seq "$rounds"); do
  "$bin" 0 1 0 $model $data "$steps" | tee -a "$out"
  # Two independent processes side by side: the machine's own ceiling.
  "$bin" 0 1 0 $model $data "$steps" | sed 's/"impl":"distill"/"impl":"independent"/' >> "$out" &
  "$bin" 0 1 0 $model $data "$steps" | sed 's/"impl":"distill"/"impl":"independent"/' | tee -a "$out"; wait
  p=$(port); "$bin" 1 2 "$p" $model $data "$steps" > /dev/null & "$bin" 0 2 "$p" $model $data "$steps" | tee -a "$out"; wait
  p=$(port); "$bin" 1 2 "$p" $model $data "$steps" after > /dev/null & "$bin" 0 2 "$p" $model $data "$steps" after | tee -a "$out"; wait
  $py scripts/bench/dp_train_torch.py 0 1 0 $model $data "$steps" 2>/dev/null | tee -a "$out"
  p=$(port); $py scripts/bench/dp_train_torch.py 1 2 "$p" $model $data "$steps" > /dev/null 2>&1 &
  $py scripts/bench/dp_train_torch.py 0 2 "$p" $model $data "$steps" 2>/dev/null | tee -a "$out"; wait
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = {}
states = {}
for line in open(sys.argv[1]):
    j = json.loads(line)
    runs.setdefault((j["impl"], j["world"]), []).append(j["samples_per_second"])
    if "state" in j and j["world"] == 2:
        states.setdefault(j["impl"], set()).add(j["state"])
med = {k: statistics.median(v) for k, v in runs.items()}
for impl in ("distill", "pytorch-ddp"):
    one, two = med[(impl, 1)], med[(impl, 2)]
    print(f"{impl:>12}: world 1 {one:6.1f} samples/s, world 2 {two:6.1f} samples/s, scaling efficiency {two / (2 * one):.3f}")
print(f"distill / DDP at world 2: {med[('distill', 2)] / med[('pytorch-ddp', 2)]:.2f}x")
after = med[("distill-after", 2)]
print(f"distill summing after backward: world 2 {after:6.1f} samples/s, efficiency {after / (2 * med[('distill', 1)]):.3f}; overlap / after {med[('distill', 2)] / after:.3f}x")
same = states.get("distill") == states.get("distill-after") and len(states.get("distill", ())) == 1
print(f"overlap and after end in the same training state: {'yes' if same else 'NO: ' + str(states)}")
ind = runs[("independent", 1)]
# Each side-by-side pair gives two lines; their sum is one pair's throughput.
pairs = [a + b for a, b in zip(ind[0::2], ind[1::2])]
ceiling = statistics.median(pairs) / (2 * med[("distill", 1)])
print(f" independent: two world-1 processes side by side, no communication: {statistics.median(pairs):6.1f} samples/s together, ceiling {ceiling:.3f}")
print(f"distill's efficiency against that ceiling: {med[('distill', 2)] / statistics.median(pairs):.3f}")
PY
