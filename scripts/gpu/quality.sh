#!/usr/bin/env bash
# The quality study of issue 13 on a GPU machine (files from
# scripts/gpu/quality-prepare.sh in target/quality/): every
# cluster-configs/quality/*.toml over 3 seeds with the labels-only
# baseline (scripts/seeds.sh), all at once on one GPU. Summaries go to
# $OUT/<config>.txt, reports and logs to $OUT/runs.tar.gz.
#   bash scripts/gpu/quality.sh [SECONDS=480]
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-gpu-out}; mkdir -p "$out"
q=target/quality
py=${PYTHON:-/opt/torch/.venv/bin/python3}
site=$("$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
LD_LIBRARY_PATH="$site/torch/lib:$(ls -d "$site"/nvidia/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH PYTHON=$py DISTILL_BIN=/tmp/distill
"$py" -c 'import lzma, sys; open("/tmp/distill", "wb").write(lzma.open(sys.argv[1]).read())' $q/distill.xz
chmod +x /tmp/distill
m=.cache/data/models/all-MiniLM-L6-v2
mkdir -p $m && cp $q/model/*.json $q/model/vocab.txt $m/ && cp -r $q/data/* .cache/data/
"$py" - $q/model/model-fp16.safetensors $m/model.safetensors <<'PY'
import sys
from safetensors.torch import load_file, save_file
t = load_file(sys.argv[1])
save_file({k: v.float() if v.is_floating_point() else v for k, v in t.items()}, sys.argv[2], metadata={"format": "pt"})
PY
/tmp/distill --version
t0=$SECONDS
for cfg in cluster-configs/quality/*.toml; do
  n=$(basename "$cfg" .toml)
  JOBS=3 timeout "${1:-480}" bash scripts/seeds.sh "$cfg" 3 --device cuda --threads 1 > "$out/$n.txt" 2>&1 &
done
wait
echo "all configs: $((SECONDS - t0)) s"
for f in "$out"/*.txt; do echo "##### $f"; cat "$f"; done
tar czf "$out/runs.tar.gz" runs/*/report.json runs/*.log 2>/dev/null
