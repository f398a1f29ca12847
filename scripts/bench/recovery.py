"""Recovery after a SIGKILL: distill's elastic training against
`torchrun --standalone` (elastic agent, gloo DDP), TRIALS trials each, on
the same small job shape (a 1-layer BERT student, hidden 32, batch 12,
checkpoints every 25 steps), three workers, one of them SIGKILLed after
50 steps. Per trial: whether training went on within the deadline, the
seconds from the kill to the first step completed after it, and the steps
redone. Run by scripts/bench/recovery.sh.

distill's side: the `distill coordinator` binary on its embedded store
(heartbeat 200 ms, session timeout 1.5 s: the coordinator declares the
dead worker gone then) and three `distill worker` processes. The seconds
are measured from the kill to the survivors' log line of the first step of
the new group.
"""
import datetime
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
BIN = os.path.join(ROOT, "target/release/distill")
PY = os.path.join(ROOT, ".venv/bin/python")
DEADLINE = 120.0


def wait(cond, secs, what):
    end = time.time() + secs
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    return None


def tracing_time(line):
    ts = line.split()[0].rstrip("Z")
    return datetime.datetime.fromisoformat(ts).replace(
        tzinfo=datetime.timezone.utc).timestamp()


def make_job(d):
    subprocess.run([PY, os.path.join(ROOT, "scripts/parity/reference.py"), "make-random",
                    f"{d}/teacher", "--seed", "3", "--layers", "2", "--hidden", "32",
                    "--heads", "4", "--intermediate", "64", "--vocab", "60", "--labels", "2"],
                   check=True, capture_output=True)
    for name, n, off in [("train", 600, 0), ("test", 40, 10000)]:
        with open(f"{d}/{name}.jsonl", "w") as f:
            for i in range(n):
                k = i + off
                words = " ".join(f"w{5 + (k * 11 + j * 7) % 50}" for j in range(4 + k % 12))
                f.write(json.dumps({"text": words, "label": f"class_{k % 2}"}) + "\n")
    spec = f"""name = "recovery-bench"
task = "text_classification"
[teacher]
path = "{d}/teacher"
[data]
train = "{d}/train.jsonl"
test = "{d}/test.jsonl"
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
steps = 100000
eval_every = 1000000
checkpoint_every = 25
[quantization]
formats = ["bf16"]
[cluster]
min_workers = 3
max_workers = 3
"""
    with open(f"{d}/job.toml", "w") as f:
        f.write(spec)


def distill_trial(d):
    env = dict(os.environ, DISTILL_LOG="info")
    procs = []
    try:
        coord = subprocess.Popen(
            [BIN, "coordinator", "--state-dir", f"{d}/state", "--listen", "127.0.0.1:0",
             "--heartbeat-interval-ms", "200", "--session-timeout-ms", "1500",
             "--speculation-factor", "0", "--artifacts", f"{d}/art"],
            stdout=subprocess.PIPE, stderr=open(f"{d}/coord.log", "w"), env=env, text=True)
        procs.append(coord)
        url = "http://" + json.loads(coord.stdout.readline())["listening"]
        logs = [f"{d}/w{i}.log" for i in range(3)]
        ws = [subprocess.Popen([BIN, "worker", "--coordinator", url, "--threads", "1",
                                "--name", f"w{i}", "--collective-timeout-ms", "60000"],
                               stdout=subprocess.DEVNULL, stderr=open(logs[i], "w"), env=env)
              for i in range(3)]
        procs += ws
        job = subprocess.run([BIN, "submit", f"{d}/job.toml", "--coordinator", url],
                             check=True, capture_output=True, text=True).stdout.strip()

        def steps():
            out = subprocess.run([BIN, "status", job, "--coordinator", url, "--output", "json"],
                                 capture_output=True, text=True).stdout
            return json.loads(out)["steps_done"] if out else 0
        if not wait(lambda: steps() >= 50, 120, "50 steps"):
            return None
        ws[0].send_signal(signal.SIGKILL)
        t0 = time.time()

        def recovered():
            for log in logs[1:]:
                for line in open(log):
                    if "recovered: first step of the new group done" in line:
                        return line
        line = wait(recovered, DEADLINE, "recovery")
        if not line:
            return {"recovered": False}
        redone = int(re.search(r"steps_redone=(\d+)", line).group(1))
        return {"recovered": True, "seconds": tracing_time(line) - t0, "redone": redone}
    finally:
        for p in procs:
            p.kill()
            p.wait()


def workers(log):
    """The pids of torchrun's worker processes writing `log` (not the agent)."""
    out = subprocess.run(["pgrep", "-f", "--", f"recovery_ddp.py {log}"],
                         capture_output=True, text=True).stdout
    pids = []
    for p in out.split():
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read()
        except OSError:
            continue
        if b"torch.distributed.run" not in cmd:
            pids.append(int(p))
    return pids


def torchrun_trial(d):
    log, ckpt = f"{d}/steps.log", f"{d}/ckpt.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    agent = subprocess.Popen(
        [PY, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
         "--max-restarts=3", os.path.join(ROOT, "scripts/bench/recovery_ddp.py"),
         log, ckpt, "100000"],
        stdout=open(f"{d}/torchrun.out", "w"), stderr=subprocess.STDOUT, env=env,
        start_new_session=True)
    try:
        def rows():
            try:
                return [l.split() for l in open(log)]
            except FileNotFoundError:
                return []
        if not wait(lambda: len(rows()) >= 50, 120, "50 steps"):
            return None
        kids = workers(log)
        if len(kids) != 3:
            return None
        last_before = int(rows()[-1][2])
        os.kill(int(kids[-1]), signal.SIGKILL)
        t0 = time.time()
        first = wait(lambda: next((r for r in rows() if r[1] != "0"), None), DEADLINE,
                     "a step after the restart")
        if not first:
            return {"recovered": False}
        redone = max(0, last_before - (int(first[2]) - 1))
        return {"recovered": True, "seconds": float(first[0]) - t0, "redone": redone}
    finally:
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
        # The agent starts its workers in sessions of their own.
        for pid in workers(log):
            os.kill(pid, signal.SIGKILL)


def summary(name, trials):
    ok = [t for t in trials if t and t["recovered"]]
    secs = [t["seconds"] for t in ok]
    redone = [t["redone"] for t in ok]
    line = f"{name:>10}: recovered {len(ok)}/{len(trials)}"
    if ok:
        line += (f", seconds kill -> first step: median {statistics.median(secs):.2f} "
                 f"(min {min(secs):.2f}, max {max(secs):.2f}), steps redone: median "
                 f"{statistics.median(redone):g} (max {max(redone)})")
    print(line)


def main():
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    results = {"distill": [], "torchrun": []}
    with tempfile.TemporaryDirectory() as base:
        make_job(base)
        for i in range(trials):
            for name, f in [("distill", distill_trial), ("torchrun", torchrun_trial)]:
                d = tempfile.mkdtemp(dir=base)
                for x in ("teacher", "train.jsonl", "test.jsonl", "job.toml"):
                    os.symlink(f"{base}/{x}", f"{d}/{x}")
                r = f(d)
                results[name].append(r)
                print(json.dumps({"impl": name, "trial": i + 1, **(r or {"recovered": None})}),
                      flush=True)
    summary("distill", results["distill"])
    summary("torchrun", results["torchrun"])


if __name__ == "__main__":
    main()
