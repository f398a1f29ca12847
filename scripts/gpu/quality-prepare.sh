#!/usr/bin/env bash
# Packs what scripts/gpu/quality.sh needs on a GPU machine into
# target/quality/ (under the 64 MiB a device run carries): the `distill`
# binary (xz), the MiniLM-L6 teacher in fp16 (made fp32 again there; the
# fp16 rounding is the only difference) with its tokenizer, and the
# sentiment and Reuters-R8 data.
set -euo pipefail
cd "$(dirname "$0")/../.."
q=target/quality
rm -rf $q && mkdir -p $q/model $q/data
xz -T2 -6 -c target/release/distill > $q/distill.xz
m=.cache/data/models/all-MiniLM-L6-v2
cp $m/config.json $m/tokenizer.json $m/tokenizer_config.json $m/vocab.txt $m/special_tokens_map.json $q/model/
.venv/bin/python - $m/model.safetensors $q/model/model-fp16.safetensors <<'PY'
import sys
from safetensors.torch import load_file, save_file
t = load_file(sys.argv[1])
save_file({k: v.half() if v.is_floating_point() else v for k, v in t.items()}, sys.argv[2], metadata={"format": "pt"})
PY
cp -r .cache/data/rotten_tomatoes .cache/data/reuters_r8 $q/data/
du -sh $q
