#!/usr/bin/env bash
# Recovery after a SIGKILL, distill's elastic training against
# `torchrun --standalone` (elastic agent, gloo DDP), interleaved trials on
# the same small job: fraction of trials that recover, seconds from the
# kill to the first completed step, steps redone (scripts/bench/recovery.py
# says how each is measured).
#   scripts/bench/recovery.sh [TRIALS]   (default 8)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
cargo build --release --bin distill >/dev/null 2>&1
export HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec .venv/bin/python scripts/bench/recovery.py "${1:-8}"
