#!/usr/bin/env bash
# Language-model distillation on one machine, end to end, with the packaged
# SmolLM2-135M-Instruct as the teacher:
#   1. convert the GGUF into a Hugging Face directory;
#   2. prompts: "is this review positive or negative, and why" over movie
#      reviews (train split for training, dev split held out);
#   3. the teacher answers every prompt (greedy) with its top-K
#      log-probabilities per token: the teacher signal;
#   4. a student with half the teacher's parameters (compression 0.5:
#      11 of 30 layers), initialised from the teacher's layers;
#   5. the student trained on the signal with forward KL over the top-K
#      (+ tail), and, as the peer, the same student trained on the teacher's
#      tokens alone (sequence-level KD: cross-entropy), same steps and order;
#   6. held-out figures before and after for both: cross-entropy and
#      perplexity of the teacher's responses under the student, and the
#      forward KL (T = 1, top-K + tail) to the teacher.
#   scripts/lm_distill_demo.sh [N_TRAIN=160] [N_EVAL=40] [STEPS=100] [THREADS=2]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
ntrain=${1:-160}; neval=${2:-40}; steps=${3:-100}; threads=${4:-2}
k=${TOPK:-32}; new=${NEW_TOKENS:-48}
bin=${DISTILL_BIN:-target/release/distill}
out=${OUT:-runs/lm-distill-demo}
mkdir -p "$out"
teacher=.cache/data/models/smollm2-hf
[ -e "$teacher/model.safetensors" ] || "$bin" convert .cache/data/models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$teacher"
python3 - "$out" "$ntrain" "$neval" <<'PY'
import json, sys
out, ntrain, neval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def prompts(src, n, dst):
    with open(src) as f, open(dst, "w") as g:
        for line in list(f)[:n]:
            text = json.loads(line)["text"]
            q = f"Is this movie review positive or negative? Answer, then say why in one sentence.\n\nReview: {text}"
            g.write(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n")
prompts(".cache/data/rotten_tomatoes/train.jsonl", ntrain, f"{out}/train-prompts.jsonl")
prompts(".cache/data/rotten_tomatoes/dev.jsonl", neval, f"{out}/eval-prompts.jsonl")
PY
for split in train eval; do
  [ -e "$out/$split-signal.jsonl" ] || "$bin" generate "$teacher" "$out/$split-prompts.jsonl" --output "$out/$split-signal.jsonl" \
      --max-new-tokens "$new" --logprobs "$k" --threads "$threads"
done
[ -e "$out/student/model.safetensors" ] || "$bin" student --teacher "$teacher" --output "$out/student" --compression-ratio 0.5 > "$out/student.json"
cat "$out/student.json"
for loss in forward_kl sequence_ce; do
  [ -e "$out/$loss/lm_distill.json" ] || "$bin" --log-format plain lm-distill --student "$out/student" --signal "$out/train-signal.jsonl" \
      --eval "$out/eval-signal.jsonl" --output "$out/$loss" --loss "$loss" --steps "$steps" --threads "$threads"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
print(f"\nheld-out teacher responses ({out}/eval-signal.jsonl):")
print(f"  {'student':<34} {'CE before':>9} {'CE after':>9} {'ppl after':>9} {'FKL before':>10} {'FKL after':>9}")
for loss in ["forward_kl", "sequence_ce"]:
    r = json.load(open(f"{out}/{loss}/lm_distill.json"))
    b, a = r["held_out_before"], r["held_out_after"]
    kd = lambda x: f"{x['forward_kl']:9.4f}"
    print(f"  {loss + ' (' + str(r['steps']) + ' steps)':<34} {b['response_ce']:9.4f} {a['response_ce']:9.4f} {a['response_perplexity']:9.2f} {kd(b)} {kd(a)}")
PY
