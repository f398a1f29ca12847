#!/usr/bin/env bash
# The GPU checks, in one run (about 5 minutes on one H100/H200), on a
# machine with PyTorch (CUDA) and the files scripts/gpu/prepare.sh puts in
# target/gpu/. Each part logs to $OUT/<part>.log (gpu-out/ when OUT is
# unset) and a line to $OUT/summary.txt; a failed part does not stop the
# others.
#   1 cuda:     `distill --version` sees CUDA; nvidia-smi.
#   2 nccl:     a ProcessGroupNCCL made through distill's shim, all-reduce
#               of CUDA tensors checked against the sum, 1/16/64 MiB, timed
#               beside torch.distributed NCCL (world 1: one GPU here);
#               two NCCL ranks on one GPU must fail with NCCL's message,
#               not hang; gloo over CUDA tensors (staged), 2 ranks, checked.
#   3 kd_step:  a KD training step of a MiniLM-L6-shaped teacher (random
#               weights) and its 3-layer student, distill against PyTorch,
#               fp32 and bf16.
#   4 cluster:  coordinator + two workers on the GPU, data-parallel over
#               gloo (NCCL needs one GPU per rank); one worker is killed
#               mid-run and the other finishes the job.
#   5 decoder:  a SmolLM2-shaped Llama (random weights, made here with
#               transformers; SmolLM2's tokenizer from the fixture): CUDA
#               generation, fp32 and bf16, against transformers' generate()
#               on the same GPU (tokens/s at batch 1 and 16, prefill; the
#               fp32 greedy ids must match up to the first EOS), then
#               `distill generate --device cuda --logprobs 8` as a teacher
#               signal and `distill lm-distill --device cuda --precision
#               bf16` (a bf16 KD step) on a half-size student: the loss
#               must fall.
# Usage: DEVICE=cuda:0 bash scripts/gpu/check.sh [PARTS...]   (default: all)
set -uo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
out=${OUT:-$root/gpu-out}
mkdir -p "$out"
g=$root/target/gpu
device=${DEVICE:-cuda:0}
py=${PYTHON:-/opt/torch/.venv/bin/python3}
[ -x "$py" ] || py=$root/.venv/bin/python
site=$("$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
LD_LIBRARY_PATH="$site/torch/lib:$(ls -d "$site"/nvidia/*/lib 2>/dev/null | tr '\n' ':')${LD_LIBRARY_PATH:-}"
export LD_LIBRARY_PATH HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error PYTHONUNBUFFERED=1
parts=${*:-cuda nccl kd_step cluster decoder}
say() { echo "$*" | tee -a "$out/summary.txt"; }
port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

part_cuda() {
  nvidia-smi -L || true
  "$g/distill" --version
}

part_nccl() {
  local ok=0 p
  for impl in distill torch; do
    p=$(port)
    if [ $impl = distill ]; then
      DISTILL_BACKEND=nccl DISTILL_DEVICE=$device timeout 120 "$g/allreduce" 0 1 "$p" 20 1 16 64 || ok=1
    else
      DISTILL_BACKEND=nccl DISTILL_DEVICE=$device timeout 120 "$py" "$g/allreduce_torch.py" 0 1 "$p" 20 1 16 64 || ok=1
    fi
  done
  echo "--- two NCCL ranks on one GPU (expected: NCCL refuses, quickly)"
  p=$(port)
  local t0=$SECONDS
  DISTILL_BACKEND=nccl DISTILL_DEVICE=$device timeout 120 "$g/allreduce" 1 2 "$p" 3 1 > "$out/nccl2.rank1" 2>&1 &
  DISTILL_BACKEND=nccl DISTILL_DEVICE=$device timeout 120 "$g/allreduce" 0 2 "$p" 3 1 > "$out/nccl2.rank0" 2>&1
  local rc=$?; wait
  head -3 "$out/nccl2.rank0" "$out/nccl2.rank1"
  echo "two NCCL ranks on one GPU: exit $rc after $((SECONDS - t0)) s"
  echo "--- gloo over CUDA tensors, 2 ranks"
  p=$(port)
  DISTILL_DEVICE=$device timeout 120 "$g/allreduce" 1 2 "$p" 5 1 16 > /dev/null &
  DISTILL_DEVICE=$device timeout 120 "$g/allreduce" 0 2 "$p" 5 1 16 || ok=1
  wait || ok=1
  return $ok
}

part_kd_step() {
  local m=/tmp/distill-minilm
  "$py" - "$g/fixture/minilm" "$m" <<'PY' || return 1
import shutil, sys, torch
from transformers import BertConfig, BertModel
src, dst = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
BertModel(BertConfig.from_json_file(f"{src}/config.json")).save_pretrained(dst, safe_serialization=True)
for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
    shutil.copy(f"{src}/{f}", f"{dst}/{f}")
PY
  local ok=0
  for prec in fp32 bf16; do
    for r in 1 2 3; do
      timeout 200 "$g/kd_step" $m "$g/fixture/reviews.jsonl" 20 8 "$device" $prec || ok=1
      timeout 200 "$py" "$g/kd_step_torch.py" $m "$g/fixture/reviews.jsonl" 20 8 "$device" $prec 2>/dev/null || ok=1
    done
  done
  return $ok
}

part_cluster() {
  local w=/tmp/distill-cluster cp job
  rm -rf $w && mkdir -p $w
  cp=$(port)
  local f=$g/fixture
  cat > $w/job.toml <<TOML
name = "gpu-check"
task = "text_classification"
[teacher]
path = "$f/teacher"
[data]
train = "$f/train.jsonl"
test = "$f/test.jsonl"
labels = ["class_0", "class_1"]
max_length = 32
[student]
layers = 1
hidden_size = 32
num_heads = 2
intermediate_size = 64
init = "teacher"
[distill]
teacher_signal = "online"
[training]
batch_size = 12
steps = 400
eval_every = 1000
checkpoint_every = 25
seed = 5
[quantization]
formats = ["bf16"]
[cluster]
min_workers = 2
max_workers = 2
device = "cuda"
TOML
  "$g/distill" --log-format plain coordinator --listen 127.0.0.1:$cp --state-dir $w/state \
    --artifacts $w/artifacts --heartbeat-interval-ms 300 --session-timeout-ms 1500 > $w/coordinator.log 2>&1 &
  local cpid=$!
  local pids=()
  for i in 1 2; do
    "$g/distill" --log-format plain worker --coordinator http://127.0.0.1:$cp --devices "$device" \
      --name gpu-$i --collective-backend gloo --collective-timeout-ms 20000 > $w/worker-$i.log 2>&1 &
    pids+=($!)
  done
  sleep 1
  job=$("$g/distill" submit --coordinator http://127.0.0.1:$cp $w/job.toml) || { kill $cpid "${pids[@]}"; return 1; }
  echo "job $job"
  local state="" steps=0 killed=0 t0=$SECONDS
  while [ $((SECONDS - t0)) -lt 240 ]; do
    local s
    s=$("$g/distill" status --coordinator http://127.0.0.1:$cp --output json "$job" 2>/dev/null) || true
    state=$(echo "$s" | "$py" -c 'import json,sys; j=json.load(sys.stdin); print(j.get("state",""), j.get("steps_done",0), j.get("world_size",0))' 2>/dev/null)
    set -- $state
    if [ $killed = 0 ] && [ "${2:-0}" -ge 150 ]; then
      echo "step ${2}: world ${3:-?}; SIGKILL worker 2"
      kill -9 "${pids[1]}"; killed=1
    fi
    case "${1:-}" in succeeded|failed|cancelled) break ;; esac
    sleep 0.5
  done
  echo "final: $state after $((SECONDS - t0)) s"
  grep -h -E "group formed|recovered|training alone|collective failed|ERROR" $w/worker-*.log | cut -c1-400 | head -20
  "$g/distill" status --coordinator http://127.0.0.1:$cp --output json "$job" > $out/cluster-status.json 2>&1
  cp $w/worker-1.log $out/cluster-worker-1.log; cp $w/coordinator.log $out/cluster-coordinator.log
  kill $cpid "${pids[@]}" 2>/dev/null; wait 2>/dev/null
  [ "${1:-}" = succeeded ] && [ $killed = 1 ]
}

part_decoder() {
  local d=/tmp/distill-smollm2 ok=0
  "$py" - "$g/fixture/smollm2" "$d" <<'PY' || return 1
import json, shutil, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
src, dst = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
cfg = LlamaConfig(**json.load(open(f"{src}/config.json")))
m = LlamaForCausalLM(cfg)
# Random weights give a near-uniform next-token distribution (its top-8 holds
# ~0.02 % of the mass: nothing to distil); a larger final norm makes it peaked.
with torch.no_grad():
    m.model.norm.weight.mul_(30.0)
m.save_pretrained(dst, safe_serialization=True)
for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
    shutil.copy(f"{src}/{f}", f"{dst}/{f}")
PY
  for dt in fp32 bf16; do
    DISTILL_DTYPE=$dt DISTILL_DEVICE=$device DISTILL_IDS=$out/decoder-ids-distill-$dt.json timeout 300 "$g/generate_bench" $d "$g/fixture/smollm2-prompts.json" 32 8 || ok=1
    DISTILL_DTYPE=$dt DISTILL_DEVICE=$device DISTILL_IDS=$out/decoder-ids-torch-$dt.json timeout 300 "$py" "$g/generate_torch.py" $d "$g/fixture/smollm2-prompts.json" 32 8 2>/dev/null || ok=1
  done
  "$py" - "$out/decoder-ids-distill-fp32.json" "$out/decoder-ids-torch-fp32.json" <<'PY' || ok=1
import json, sys
a, b = (json.load(open(p)) for p in sys.argv[1:3])
def cut(r):
    return r[: r.index(2) + 1] if 2 in r else r
same = sum(cut(x) == cut(y) for x, y in zip(a, b))
print(f"greedy fp32 on cuda: {same}/{len(a)} prompts give transformers' ids (up to the first EOS)")
sys.exit(0 if same == len(a) else 1)
PY
  local w=/tmp/distill-lm && rm -rf $w && mkdir -p $w
  head -48 "$g/fixture/smollm2-chats.jsonl" > $w/train.jsonl
  tail -16 "$g/fixture/smollm2-chats.jsonl" > $w/eval.jsonl
  for s in train eval; do
    timeout 300 "$g/distill" --log-format plain generate $d $w/$s.jsonl --output $w/$s-signal.jsonl \
      --device "$device" --max-new-tokens 32 --temperature 1.0 --seed 1 --logprobs 8 || ok=1
  done
  timeout 120 "$g/distill" student --teacher $d --output $w/student --compression-ratio 0.5 || ok=1
  timeout 600 "$g/distill" --log-format plain lm-distill --student $w/student --signal $w/train-signal.jsonl \
    --eval $w/eval-signal.jsonl --output $w/out --device "$device" --precision bf16 --steps 60 --batch-size 8 --learning-rate 3e-4 || ok=1
  "$py" - $w/out/lm_distill.json <<'PY' || ok=1
import json, sys
r = json.load(open(sys.argv[1]))
b, a = r["held_out_before"], r["held_out_after"]
print(f"bf16 lm-distill on {r['device']}: {r['steps']} steps in {r['seconds']:.1f}s; held-out forward KL {b['forward_kl']:.4f} -> {a['forward_kl']:.4f}, CE {b['response_ce']:.4f} -> {a['response_ce']:.4f}")
sys.exit(0 if a["forward_kl"] < b["forward_kl"] else 1)
PY
  return $ok
}

: > "$out/summary.txt"
for p in $parts; do
  t0=$SECONDS
  echo "=== $p" | tee "$out/$p.log"
  if "part_$p" >> "$out/$p.log" 2>&1; then r=ok; else r=FAILED; fi
  say "$p: $r ($((SECONDS - t0)) s)"
done
cat "$out/summary.txt"
