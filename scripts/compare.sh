#!/usr/bin/env bash
# Paired comparison of two jobs over seeds: B against A, seed by seed.
# Reads runs/<name>-seed<K>/report.json of both jobs (scripts/seeds.sh makes
# them; this script runs nothing) and prints each seed's student metric, the
# difference B − A with its mean ± sd over seeds, on how many seeds B won,
# and whether the mean difference is more than twice its standard error.
# The seeds pair the runs: with scripts/seeds.sh both jobs of a seed share
# that seed's teacher (runs/.teachers) and data order, so the difference
# measures the change, not the seed. A job run with BASELINE=off borrows
# the other job's labels-only student for its gain. FIRST=K pairs seeds
# K..N instead of 1..N.
#   scripts/compare.sh A.toml B.toml [N=3]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
a=${1:?usage: scripts/compare.sh A.toml B.toml [N]}
b=${2:?usage: scripts/compare.sh A.toml B.toml [N]}
n=${3:-3}
py=${PYTHON:-.venv/bin/python}
[ -x "$py" ] || py=python3
"$py" - "$a" "$b" "$n" "${FIRST:-1}" <<'PY'
import json, math, os, statistics, sys, tomllib

def name(path):
    with open(path, "rb") as f:
        return tomllib.load(f).get("name", "job")

a_job, b_job, last, first = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
seeds = range(first, last + 1)
n = len(seeds)
jobs = [(a_job, name(a_job)), (b_job, name(b_job))]
reports = {}
missing = []
for job, nm in jobs:
    for k in seeds:
        p = f"runs/{nm}-seed{k}/report.json"
        if os.path.exists(p):
            reports[(nm, k)] = json.load(open(p))
        else:
            missing.append(f"{p} ({f'FIRST={first} ' if first > 1 else ''}scripts/seeds.sh {job} {last})")
if missing:
    sys.exit("compare: missing reports:\n  " + "\n  ".join(missing))
(_, an), (_, bn) = jobs
metric = reports[(an, first)]["metric_name"]

def ms(xs):
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return statistics.mean(xs), sd

def row(label, xs, fmt="{:.4f}"):
    m, sd = ms(xs)
    print(f"  {label:30s} {fmt.format(m)} ± {fmt.replace('+', '').format(sd)}   per seed: {', '.join(fmt.format(x) for x in xs)}")

print(f"\n{n} seeds ({first}..{last}), test {metric}: B = {bn} against A = {an}")
for label, nm in (("A", an), ("B", bn)):
    t = [reports[(nm, k)]["teacher"]["metric"] for k in seeds]
    row(f"teacher {label}", t)
same_teacher = all(reports[(an, k)]["teacher"]["metric"] == reports[(bn, k)]["teacher"]["metric"] for k in seeds)
print(f"  {'':30s} {'each seed shares its teacher' if same_teacher else 'the teachers differ: the difference includes the teacher'}")
sa = [reports[(an, k)]["student"]["metric"] for k in seeds]
sb = [reports[(bn, k)]["student"]["metric"] for k in seeds]
row("student A", sa)
row("student B", sb)
diff = [100 * (y - x) for x, y in zip(sa, sb)]
m, sd = ms(diff)
se = sd / math.sqrt(n) if n > 1 else float("inf")
wins = sum(d > 0 for d in diff)
print(f"  {'B − A (points)':30s} {m:+.2f} ± {sd:.2f}   per seed: {', '.join(f'{d:+.2f}' for d in diff)}")
verdict = "more than" if n > 1 and abs(m) > 2 * se else "within"
print(f"  {'':30s} B ahead on {wins}/{n} seeds; the mean is {verdict} twice its standard error ({se:.2f})")
for label, nm in (("A", an), ("B", bn)):
    ret = [100 * reports[(nm, k)]["retention"] for k in seeds]
    row(f"retention % {label}", ret, "{:.2f}")
    base = []
    for k in seeds:
        r = reports[(nm, k)].get("baseline") or reports[(an if nm == bn else bn, k)].get("baseline")
        if not r:
            break
        base.append(100 * (reports[(nm, k)]["student"]["metric"] - r["metric"]))
    if len(base) == n:
        row(f"gain over labels-only {label}", base, "{:+.2f}")
PY
