#!/usr/bin/env bash
# Set up (if needed) and run every test of the workspace.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
# Parity tests call the venv's python (transformers); put it first on PATH.
export PATH="$root/.venv/bin:$PATH"
# No test needs DNS, but c10d's store looks up each connecting peer's host
# name (for its messages), and where the resolver drops a query (this
# machine's drops about 1 in 60) glibc waits 5 s for it, twice, in the
# middle of a group's formation: wait 1 s, once (c10d then prints the
# address). See docs/operations.md, Timeouts.
export RES_OPTIONS="${RES_OPTIONS:-timeout:1 attempts:1}"
cargo test --workspace --release "$@"
