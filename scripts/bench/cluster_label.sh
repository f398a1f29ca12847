#!/usr/bin/env bash
# Pseudo-labelling throughput on the cluster path: the real MiniLM-L6
# teacher over the rotten-tomatoes training texts (sentence embeddings),
# through `distill coordinator` (embedded store) and `distill worker`
# processes, each worker pinned to one core with one libtorch thread:
#   - 1 worker (core 0), then 2 workers (cores 0 and 1);
#   - beside them, in the same run, `distill infer` on core 0, 1 thread,
#     over the same texts (the single-process peer).
# Prints examples/s for each, the scaling efficiency (2-worker rate over
# twice the 1-worker rate), the 1-worker rate over `distill infer`'s, and
# the coordinator's CPU time as a share of the labelling wall time.
# Wall time runs from submission to the last shard finished (the latest
# "task finished" of a teacher-signal task in the workers' logs), so it
# includes planning, data reading and each worker's teacher load.
#   scripts/bench/cluster_label.sh [SHARD_SIZE] [LIMIT]
# LIMIT takes the first LIMIT training texts (default: all 10,248).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
shard=${1:-128}
limit=${2:-0}
bin=$root/target/release/distill
[ -x "$bin" ] || cargo build --release --bin distill
command -v taskset >/dev/null || { echo "needs taskset (util-linux)"; exit 1; }
work=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$work"' EXIT
data=$root/.cache/data/rotten_tomatoes/train.jsonl
if [ "$limit" -gt 0 ]; then head -n "$limit" "$data" > "$work/train.jsonl"; data=$work/train.jsonl; fi
n=$(grep -c . "$data")
cat > "$work/job.toml" <<TOML
name = "bench-label"
task = "sentence_embedding"
[teacher]
path = "$root/.cache/data/models/all-MiniLM-L6-v2"
[data]
train = "$data"
test = "$root/.cache/data/rotten_tomatoes/test.jsonl"
max_length = 128
shard_size = $shard
[student]
preset = "L3-H384"
[distill]
embedding = 1.0
kd = 0.0
task = 0.0
teacher_signal = "offline"
[training]
steps = 1
[cluster]
max_workers = 2
TOML

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
now() { date +%s.%N; }

# One labelling run with $1 workers; prints "workers eps wall coord_share".
label() {
  local k=$1 dir=$work/run$1
  mkdir -p "$dir"
  "$bin" coordinator --state-dir "$dir/state" --listen 127.0.0.1:0 --artifacts "$dir/art" \
    --heartbeat-interval-ms 500 --session-timeout-ms 5000 > "$dir/addr" 2> "$dir/coord.log" &
  local cpid=$!
  for _ in $(seq 100); do grep -q listening "$dir/addr" 2>/dev/null && break; sleep 0.1; done
  local url="http://$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["listening"])' "$dir/addr")"
  local wp=()
  for c in $(seq 0 $((k - 1))); do
    taskset -c "$c" "$bin" worker --coordinator "$url" --threads 1 --name "core$c" 2> "$dir/w$c.log" &
    wp+=($!)
  done
  sleep 1
  local c0 t0 t1 c1 id s
  c0=$(cpu_ticks $cpid)
  t0=$(now)
  id=$(taskset -c 0 "$bin" submit "$work/job.toml" --coordinator "$url")
  # Completion from the workers' logs (a grep), not from `distill status`:
  # that is a process loading libtorch (~0.4 s of CPU) and polling it
  # would steal the workers' cores.
  local shards=$(( (n + shard - 1) / shard ))
  while [ "$(cat "$dir"/w*.log | grep TASK_KIND_TEACHER_SIGNAL | grep ok=true | grep -o 'task="shard-[0-9]*"' | sort -u | wc -l)" -lt "$shards" ]; do
    if grep -q "task failed" "$dir"/w*.log; then echo "a task failed:" >&2; grep "task failed" "$dir"/w*.log >&2; exit 1; fi
    sleep 1
  done
  c1=$(cpu_ticks $cpid)
  s=$("$bin" status "$id" --coordinator "$url")
  echo "$s" | grep -q "\"shards_committed\":$shards," || { echo "not all shards committed: $s" >&2; exit 1; }
  t1=$(python3 - "$dir" <<'PY'
import datetime, glob, re, sys
last = None
for f in glob.glob(sys.argv[1] + "/w*.log"):
    for line in open(f):
        if "task finished" in line and "TASK_KIND_TEACHER_SIGNAL" in line and "ok=true" in line:
            ts = datetime.datetime.fromisoformat(line.split()[0].replace("Z", "+00:00"))
            last = ts if last is None or ts > last else last
print(last.timestamp())
PY
)
  kill "${wp[@]}" $cpid 2>/dev/null || true
  wait "${wp[@]}" $cpid 2>/dev/null || true
  python3 - "$k" "$n" "$t0" "$t1" "$c0" "$c1" "$(getconf CLK_TCK)" <<'PY'
import sys
k, n, t0, t1, c0, c1, hz = sys.argv[1:]
wall = float(t1) - float(t0)
# The coordinator's CPU until the end of polling, over the labelling wall.
coord = (int(c1) - int(c0)) / int(hz)
print(k, int(n) / wall, wall, coord / wall)
PY
}

echo "texts: $n, shard size: $shard"
one=$(label 1); echo "1 worker : $one"
two=$(label 2); echo "2 workers: $two"
t0=$(now)
taskset -c 0 "$bin" infer --model .cache/data/models/all-MiniLM-L6-v2 --data "$data" \
  --output "$work/infer.safetensors" --threads 1 --max-length 128 > /dev/null 2>&1
t1=$(now)
# The hardware's own two-core scaling: two `distill infer` processes at
# once, pinned to cores 0 and 1, each over half of the texts.
half=$(( (n + 1) / 2 ))
head -n "$half" "$data" > "$work/half0.jsonl"
tail -n +"$((half + 1))" "$data" > "$work/half1.jsonl"
t2=$(now)
for c in 0 1; do
  taskset -c "$c" "$bin" infer --model .cache/data/models/all-MiniLM-L6-v2 --data "$work/half$c.jsonl" \
    --output "$work/half$c.safetensors" --threads 1 --max-length 128 > /dev/null 2>&1 &
done
wait
t3=$(now)
python3 - "$one" "$two" "$n" "$t0" "$t1" "$t2" "$t3" <<'PY'
import sys
one, two, n, t0, t1 = sys.argv[1].split(), sys.argv[2].split(), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
t2, t3 = float(sys.argv[6]), float(sys.argv[7])
e1, e2 = float(one[1]), float(two[1])
infer = n / (t1 - t0)
print(f"distill infer (1 core): {infer:.1f} examples/s ({t1 - t0:.1f} s, process start to exit)")
print(f"1 worker : {e1:.1f} examples/s ({float(one[2]):.1f} s), coordinator CPU {100 * float(one[3]):.2f}% of wall")
print(f"2 workers: {e2:.1f} examples/s ({float(two[2]):.1f} s), coordinator CPU {100 * float(two[3]):.2f}% of wall")
print(f"scaling efficiency (2 workers / (2 x 1 worker)): {e2 / (2 * e1):.3f}  (target >= 0.9)")
print(f"1 worker / distill infer: {e1 / infer:.3f}  (target: within 5%)")
pair = n / (t3 - t2)
print(f"2 x distill infer at once (cores 0, 1, half the texts each): {pair:.1f} examples/s; the hardware's 2-core efficiency: {pair / (2 * infer):.3f}")
print(f"2 workers / 2 x distill infer: {e2 / pair:.3f}")
PY
