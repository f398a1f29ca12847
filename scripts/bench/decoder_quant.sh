#!/usr/bin/env bash
# Decoder quantization: SmolLM2-135M-Instruct (converted from the packaged
# GGUF) in fp32, bf16, int8_dynamic, int8_weight_only and int4 (group 32):
# perplexity on held-out texts (the sentiment test split), weights in
# memory, prefill ms and decode tokens/s at batch 1, each as a ratio to
# fp32 measured in the same run.
#   scripts/bench/decoder_quant.sh [N_TEXTS=200] [THREADS=2]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
n=${1:-200}; threads=${2:-2}
dir=.cache/data/models/smollm2-hf
cargo build --release -q --bin distill
cargo build --release -q -p distill-worker --features bench --example decoder_quant
[ -e "$dir/model.safetensors" ] || target/release/distill convert .cache/data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$dir"
out=$(mktemp)
OMP_NUM_THREADS=$threads target/release/examples/decoder_quant "$dir" .cache/data/rotten_tomatoes/test.jsonl "$n" "$threads" | tee "$out"
python3 - "$out" "$threads" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base = rows[0]
print(f"\nSmolLM2-135M, {base['texts']} held-out texts ({base['tokens']} predicted tokens), {sys.argv[2]} threads:")
print(f"  {'variant':<17} {'perplexity':>10} {'vs fp32':>8} {'weights MB':>10} {'prefill ms':>10} {'decode tok/s':>12} {'vs fp32':>8}")
for r in rows:
    print(f"  {r['variant']:<17} {r['perplexity']:10.2f} {r['perplexity']/base['perplexity']-1:+8.1%} {r['weight_mb']:10.1f} {r['prefill_ms_batch1']:10.1f} {r['decode_tokens_per_s_batch1']:12.1f} {r['decode_tokens_per_s_batch1']/base['decode_tokens_per_s_batch1']:7.2f}x")
PY
