#!/usr/bin/env bash
# CUDA's crt/ and nv/target headers, which ProcessGroupNCCL's headers
# include and the torch wheel lacks: fetched from PyPI (nvidia-cuda-crt
# and nvidia-cuda-cccl, the CUDA 13.0 the wheel is built for) into
# target/cuda-headers. Prints the include folder for DISTILL_CUDA_INCLUDE.
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=target/cuda-headers
inc=$dest/nvidia/cu13/include
if [ ! -f "$inc/crt/host_defines.h" ] || [ ! -d "$inc/nv" ]; then
  mkdir -p "$dest/wheels"
  .venv/bin/pip download --no-deps -q -d "$dest/wheels" \
    'nvidia-cuda-crt==13.0.*' 'nvidia-cuda-cccl==13.0.*' >&2
  for w in "$dest"/wheels/*.whl; do
    .venv/bin/python -m zipfile -e "$w" "$dest" >&2
  done
fi
echo "$PWD/$inc"
