#!/usr/bin/env bash
# All-reduce bus bandwidth on loopback, two processes: distill's c10d Gloo
# shim (worker/examples/allreduce.rs) against torch.distributed with gloo,
# in the same run, at 1, 16 and 64 MiB; interleaved over ROUNDS rounds.
# Prints each run, then per size the median busbw of each, the ratio of the
# medians, and the per-round ratio (mean ± sd, rounds distill was ahead).
# SIZES overrides the sizes in MiB (default "1 16 64").
#   [SIZES="1"] scripts/bench/allreduce.sh [ROUNDS] [ITERS]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
rounds=${1:-3}
iters=${2:-20}
sizes=${SIZES:-1 16 64}
cargo build --release -p distill-worker --features bench --example allreduce >/dev/null 2>&1
bin=target/release/examples/allreduce
out=$(mktemp)
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
for r in $(seq "$rounds"); do
  p=$(port)
  "$bin" 1 2 "$p" "$iters" $sizes > /dev/null & "$bin" 0 2 "$p" "$iters" $sizes | tee -a "$out"; wait
  p=$(port)
  .venv/bin/python scripts/bench/allreduce_torch.py 1 2 "$p" "$iters" $sizes > /dev/null &
  .venv/bin/python scripts/bench/allreduce_torch.py 0 2 "$p" "$iters" $sizes | tee -a "$out"; wait
done
python3 - "$out" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    j = json.loads(line)
    runs.setdefault((j["mib"], j["impl"]), []).append(j["busbw_gbs"])
for mib in sorted({m for m, _ in runs}):
    d = statistics.median(runs[(mib, "distill")])
    t = statistics.median(runs[(mib, "pytorch")])
    print(f"{mib:>3} MiB: distill {d:.3f} GB/s, torch.distributed {t:.3f} GB/s, ratio {d / t:.2f}x (busbw, median of {len(runs[(mib, 'distill')])})")
    # Round r's distill run and torch run ran one after the other.
    per = [a / b for a, b in zip(runs[(mib, "distill")], runs[(mib, "pytorch")])]
    sd = statistics.stdev(per) if len(per) > 1 else 0.0
    ahead = sum(r > 1 for r in per)
    print(f"{mib:>3} MiB: per-round ratio {statistics.mean(per):.3f} ± {sd:.3f}, distill ahead in {ahead}/{len(per)} rounds")
PY
rm -f "$out"
