#!/usr/bin/env bash
# Builds `distill` with NCCL collectives (the `nccl` feature) into
# target/gpu/distill, for a CUDA machine. The default build (cargo build)
# has Gloo only; this one has both.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/.venv/bin:$PATH"
DISTILL_CUDA_INCLUDE="$(bash scripts/gpu/headers.sh)"
export DISTILL_CUDA_INCLUDE
cargo build --release --features nccl --bin distill
mkdir -p target/gpu
cp target/release/distill target/gpu/distill
echo "built target/gpu/distill ($(du -h target/gpu/distill | cut -f1))"
