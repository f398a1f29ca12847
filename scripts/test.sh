#!/usr/bin/env bash
# Set up (if needed) and run every test of the workspace.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
bash scripts/setup.sh
# Parity tests call the venv's python (transformers); put it first on PATH.
export PATH="$root/.venv/bin:$PATH"
cargo test --workspace --release "$@"
