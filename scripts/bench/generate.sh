#!/usr/bin/env bash
# Generation benchmark: distill vs transformers' generate(), same machine,
# same threads, same 16 chat prompts of SmolLM2-135M-Instruct (fp32,
# greedy, a fixed number of new tokens), interleaved runs; prints medians,
# ratios (distill / transformers, > 1.0 means distill is faster) and how
# close batch-1 decoding is to the memory-bandwidth limit (weight bytes read
# per token ÷ measured copy bandwidth).
#   scripts/bench/generate.sh [RUNS=3] [NEW_TOKENS=32] [THREADS=2]
# DISTILL_DTYPE=bf16: both sides with bf16 weights.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
runs=${1:-3}; new=${2:-32}; threads=${3:-2}
gguf=.cache/data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
dir=.cache/data/models/smollm2-hf
cargo build --release -q --bin distill
cargo build --release -q -p distill-worker --features bench --example generate_bench
[ -e "$dir/model.safetensors" ] || target/release/distill convert "$gguf" "$dir"
export OMP_NUM_THREADS=$threads HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
prompts=$(mktemp --suffix .json)
.venv/bin/python - "$dir" "$prompts" <<'PY'
import json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
qs = ["What is the capital of France?", "Name three colours.", "Hello!", "Explain rain in one sentence.",
      "Write a haiku about autumn.", "What is 12 times 7?", "Give me a word that rhymes with cat.",
      "Why is the sky blue?", "List two fruits.", "Translate 'good morning' into French.",
      "What does a CPU do?", "Tell me a fun fact about octopuses.", "How many legs does a spider have?",
      "Summarise the plot of Cinderella in one line.", "What is the boiling point of water?",
      "Suggest a name for a cat."]
ids = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=False) for q in qs]
ids = [list(x["input_ids"]) if hasattr(x, "keys") else list(x) for x in ids]
json.dump(ids, open(sys.argv[2], "w"))
PY
out=$(mktemp)
for r in $(seq "$runs"); do
  target/release/examples/generate_bench "$dir" "$prompts" "$new" "$threads" | tee -a "$out"
  .venv/bin/python scripts/bench/generate_torch.py "$dir" "$prompts" "$new" "$threads" 2>/dev/null | tee -a "$out"
done
python3 - "$out" "$threads" "$new" "${DISTILL_DTYPE:-fp32}" <<'PY'
import json, statistics, sys
r = {}
for l in open(sys.argv[1]):
    j = json.loads(l)
    for k, v in j.items():
        if k != "impl":
            r.setdefault(j["impl"], {}).setdefault(k, []).append(v)
med = lambda i, k: statistics.median(r[i][k])
print(f"\nSmolLM2-135M {sys.argv[4]}, {sys.argv[2]} threads, {sys.argv[3]} new tokens (median of runs):")
print(f"  prefill ms (batch 1, ~{med('distill','prompt_tokens_mean'):.0f} tokens): distill {med('distill','prefill_ms_batch1'):.1f}  transformers {med('pytorch','prefill_ms_batch1'):.1f}  ratio {med('pytorch','prefill_ms_batch1')/med('distill','prefill_ms_batch1'):.2f}x")
for b in (1, 16):
    d, p = med("distill", f"tokens_per_s_batch{b}"), med("pytorch", f"tokens_per_s_batch{b}")
    print(f"  decode tokens/s batch {b:>2}: distill {d:.1f}  transformers {p:.1f}  ratio {d/p:.2f}x")
d, p = med("distill", "eos_tokens_per_s_batch16"), med("pytorch", "eos_tokens_per_s_batch16")
print(f"  stopping at EOS, 16 prompts (distill {med('distill','eos_tokens'):.0f} tokens, transformers {med('pytorch','eos_tokens'):.0f}): useful tokens/s distill {d:.1f}  transformers {p:.1f}  ratio {d/p:.2f}x")
bw = med("pytorch", "copy_gb_per_s")
limit = bw * 1e9 / med("distill", "weight_bytes")
print(f"  memory-bandwidth limit at batch 1: {med('distill','weight_bytes')/1e6:.0f} MB of weights per token / {bw:.1f} GB/s copy = {limit:.1f} tokens/s; distill reaches {med('distill','tokens_per_s_batch1')/limit*100:.0f} % of it")
PY
