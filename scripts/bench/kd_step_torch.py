"""PyTorch peer of worker/examples/kd_step.rs: the same KD training step.
Teacher all-MiniLM-L6-v2 + 2-class head, student = teacher layers 1,3,5
(BertForSequenceClassification), batch 32 padded to 64, CE + T²·KL (T=2),
backward, clip_grad_norm_(1.0), torch.optim.AdamW(lr 5e-5, wd 0.01).
Prints one JSON line: median seconds per step after 2 warmup steps.
Optional 5th/6th arguments: device (cpu, cuda[:N]) and precision (fp32, bf16:
forward passes under torch.autocast, as distill's trainer does)."""
import copy, json, sys, time
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertForSequenceClassification

model_dir, data = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 10
threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
device = sys.argv[5] if len(sys.argv) > 5 else "cpu"
precision = sys.argv[6] if len(sys.argv) > 6 else "fp32"
import contextlib
amp = (lambda: torch.autocast(device.split(":")[0], dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
sync = (lambda: torch.cuda.synchronize()) if device.startswith("cuda") else (lambda: None)
torch.set_num_threads(threads)
torch.manual_seed(0)
teacher = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval().to(device)
student = copy.deepcopy(teacher)
student.bert.encoder.layer = torch.nn.ModuleList([student.bert.encoder.layer[i] for i in (1, 3, 5)])
student.config.num_hidden_layers = 3
student.train()
tok = AutoTokenizer.from_pretrained(model_dir)
rows = [json.loads(l) for l in open(data, encoding="utf-8")][:32]
b = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=64, return_tensors="pt").to(device)
gold = torch.tensor([1 if r["label"] == "fresh" else 0 for r in rows], device=device)
opt = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.01)
times = []
phases = {k: [] for k in ("teacher_forward", "student_forward_loss", "backward", "clip_adamw")}
for i in range(steps + 2):
    t0 = time.perf_counter()
    opt.zero_grad()
    with torch.no_grad(), amp():
        t_logits = teacher(**b).logits.float()
    sync()
    t1 = time.perf_counter()
    with amp():
        s_logits = student(**b).logits.float()
    T = 2.0
    kd = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True, reduction="batchmean") * T * T
    loss = F.cross_entropy(s_logits, gold) + kd
    sync()
    t2 = time.perf_counter()
    loss.backward()
    sync()
    t3 = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    loss.item()
    t4 = time.perf_counter()
    if i >= 2:
        times.append(t4 - t0)
        for k, (a, c) in zip(phases, ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
            phases[k].append(c - a)
med = lambda v: sorted(v)[len(v) // 2]
print(json.dumps({"impl": "pytorch", "median_step_seconds": med(times), "steps": steps, "threads": threads,
                  "device": device, "precision": precision,
                  "phases": {k: med(v) for k, v in phases.items()}}))
