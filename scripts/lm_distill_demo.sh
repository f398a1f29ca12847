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
# SEED=K (default 42) trains with that seed (order and nothing else: the
# signal and the student are shared) into <loss>-seedK/; the summary
# covers every seed found, with mean ± sd.
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
seed=${SEED:-42}
for loss in forward_kl sequence_ce; do
  dest=$out/$loss-seed$seed
  [ -e "$dest/lm_distill.json" ] || "$bin" --log-format plain lm-distill --student "$out/student" --signal "$out/train-signal.jsonl" \
      --eval "$out/eval-signal.jsonl" --output "$dest" --loss "$loss" --steps "$steps" --threads "$threads" --seed "$seed"
done
# 7. Downstream: each seed-42 student (and the untrained one) answers the
#    held-out prompts (greedy); its verdict (the first of "positive" /
#    "negative" in its answer) is compared with the teacher's and with the
#    review's gold label.
for m in student forward_kl-seed42 sequence_ce-seed42; do
  [ -e "$out/$m/model.safetensors" ] || continue
  [ -e "$out/answers-$m.jsonl" ] || "$bin" --log-format plain generate "$out/$m" "$out/eval-prompts.jsonl" \
      --output "$out/answers-$m.jsonl" --max-new-tokens "$new" --threads "$threads"
done
python3 - "$out" "$neval" <<'PY'
import json, sys
out, n = sys.argv[1], int(sys.argv[2])
gold = [json.loads(l)["label"] for l in list(open(".cache/data/rotten_tomatoes/dev.jsonl"))[:n]]
gold = ["positive" if g == "fresh" else "negative" for g in gold]
def verdicts(path):
    v = []
    for l in open(path):
        t = json.loads(l)["text"].lower()
        i, j = t.find("positive"), t.find("negative")
        v.append(None if i < 0 and j < 0 else ("positive" if j < 0 or (0 <= i < j) else "negative"))
    return v
teacher = verdicts(f"{out}/eval-signal.jsonl")
acc = lambda v: sum(a == g for a, g in zip(v, gold)) / len(gold)
print(f"\ndownstream, {len(gold)} held-out reviews (verdict = first 'positive'/'negative' in the answer):")
print(f"  {'model':<22} {'agrees with teacher':>20} {'accuracy vs gold':>17} {'no verdict':>10}")
print(f"  {'teacher':<22} {'':>20} {acc(teacher):17.3f} {sum(x is None for x in teacher):10d}")
import os
for m in ["student", "forward_kl-seed42", "sequence_ce-seed42"]:
    p = f"{out}/answers-{m}.jsonl"
    if os.path.exists(p):
        v = verdicts(p)
        agree = sum(a == b and a is not None for a, b in zip(v, teacher)) / len(v)
        print(f"  {m + (' (untrained)' if m == 'student' else ''):<22} {agree:20.3f} {acc(v):17.3f} {sum(x is None for x in v):10d}")
PY
python3 - "$out" <<'PY'
import glob, json, statistics, sys
out = sys.argv[1]
def ms(xs):
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.4f}"
print(f"\nheld-out teacher responses ({out}/eval-signal.jsonl), mean ± sd over seeds:")
res = {}
for loss in ["forward_kl", "sequence_ce"]:
    rs = [json.load(open(p)) for p in sorted(glob.glob(f"{out}/{loss}-seed*/lm_distill.json"))]
    if not rs:
        continue
    res[loss] = rs
    b = rs[0]["held_out_before"]
    print(f"  {loss}: {len(rs)} seeds ({', '.join(str(r['seed']) for r in rs)}), {rs[0]['steps']} steps; before: CE {b['response_ce']:.4f}, forward KL {b['forward_kl']:.4f}")
    print(f"    after: CE {ms([r['held_out_after']['response_ce'] for r in rs])}  perplexity {ms([r['held_out_after']['response_perplexity'] for r in rs])}  forward KL {ms([r['held_out_after']['forward_kl'] for r in rs])}")
if len(res) == 2:
    by = {loss: {r["seed"]: r["held_out_after"]["response_ce"] for r in rs} for loss, rs in res.items()}
    common = sorted(set(by["forward_kl"]) & set(by["sequence_ce"]))
    d = [by["sequence_ce"][s] - by["forward_kl"][s] for s in common]
    print(f"  CE of sequence_ce minus forward_kl, per seed: {', '.join(f'{x:+.4f}' for x in d)}; forward_kl lower on {sum(x > 0 for x in d)}/{len(d)} seeds")
PY
