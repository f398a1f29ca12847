#!/usr/bin/env bash
# Quality over seeds: runs a job once per seed (1..N, `distill run --seed`,
# with the labels-only baseline) into runs/<name>-seed<K>/ and prints, for
# each model, the mean ± sample standard deviation of its test metric, the
# retention (student / teacher), the gain of the distilled student over
# labels-only, and on how many seeds the distilled student won. Re-running
# resumes or reuses finished runs. JOBS=N runs N seeds at once (on a GPU,
# say, with --device cuda --threads 2); DISTILL_BIN and PYTHON override the
# binary and the Python used to read the job's name. Fine-tuned teachers are
# shared through runs/.teachers (`distill run --teacher-cache`), so jobs
# that differ only in the student fine-tune each seed's teacher once;
# TEACHER_CACHE=off gives every run its own. BASELINE=off skips the
# labels-only student (for a job whose baseline equals another job's, such as
# an augmented job's: the baseline trains on the labelled rows only).
# FIRST=K starts at seed K instead of 1 (seeds K..N: more seeds for a job
# whose first ones another checkout ran); the summary covers K..N.
# Report figures come from here, not from single runs.
#   scripts/seeds.sh JOB.toml [N=3] [extra distill run args...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
job=${1:?usage: scripts/seeds.sh JOB.toml [N] [distill run args...]}
n=${2:-3}
shift $(( $# >= 2 ? 2 : 1 ))
bin=${DISTILL_BIN:-target/release/distill}
[ -x "$bin" ] || cargo build --release --bin distill
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
jobs=${JOBS:-1}
teachers=${TEACHER_CACHE:-runs/.teachers}
baseline=(--baseline)
[ "${BASELINE:-on}" = off ] && baseline=()
name=$("$py" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb")).get("name", "job"))' "$job")
mkdir -p runs
reports=()
pids=()
for seed in $(seq "${FIRST:-1}" "$n"); do
  out=runs/$name-seed$seed
  if [ ! -e "$out/report.json" ]; then
    echo "seeds: $job seed $seed → $out" >&2
    "$bin" --log-format plain run "$job" --seed "$seed" ${baseline[@]+"${baseline[@]}"} --output "$out" --teacher-cache "$teachers" "$@" > "$out.log" 2>&1 &
    pids+=("$!:$seed")
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
  fi
  reports+=("$out/report.json")
done
for p in ${pids[@]+"${pids[@]}"}; do
  # A run finished before this wait may be reaped already (bash forgets
  # it once `jobs` reported it): its report says whether it succeeded.
  wait "${p%%:*}" 2>/dev/null || true
  [ -e "runs/$name-seed${p##*:}/report.json" ] || { echo "seeds: seed ${p##*:} failed, see runs/$name-seed${p##*:}.log" >&2; exit 1; }
done
python3 - "${reports[@]}" <<'PY'
import json, statistics, sys
rs = [json.load(open(p)) for p in sys.argv[1:]]
def ms(xs):
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.4f} ± {sd:.4f}"
name = rs[0]["metric_name"]
rows = [("teacher", [r["teacher"]["metric"] for r in rs]),
        ("student (distilled)", [r["student"]["metric"] for r in rs])]
if all(r.get("baseline") for r in rs):
    rows.append(("student (labels only)", [r["baseline"]["metric"] for r in rs]))
print(f"\n{len(rs)} seeds, test {name}, mean ± sd")
for label, xs in rows:
    print(f"  {label:24s} {ms(xs)}   per seed: {', '.join(f'{x:.4f}' for x in xs)}")
ret = [100 * r["retention"] for r in rs]
print(f"  {'retention %':24s} {statistics.mean(ret):.2f} ± {statistics.stdev(ret) if len(ret) > 1 else 0:.2f}")
if len(rows) == 3:
    gain = [100 * (s - b) for s, b in zip(rows[1][1], rows[2][1])]
    wins = sum(g > 0 for g in gain)
    print(f"  {'gain over labels-only':24s} {statistics.mean(gain):+.2f} ± {statistics.stdev(gain) if len(gain) > 1 else 0:.2f} points, distilled ahead on {wins}/{len(gain)} seeds")
f1 = [r["student"].get("macro_f1") for r in rs]
if all(x is not None for x in f1):
    print(f"  {'student macro-F1':24s} {ms(f1)}")
PY
