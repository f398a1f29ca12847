"""PyTorch peer of worker/examples/kd_step.rs: the same KD training step.
Teacher all-MiniLM-L6-v2 + 2-class head, student = teacher layers 1,3,5
(BertForSequenceClassification), batch 32 padded to 64, CE + T²·KL (T=2),
backward, clip_grad_norm_(1.0), torch.optim.AdamW(lr 5e-5, wd 0.01).
Prints one JSON line: median seconds per step after 2 warmup steps."""
import copy, json, sys, time
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, BertForSequenceClassification

model_dir, data = sys.argv[1], sys.argv[2]
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 10
threads = int(sys.argv[4]) if len(sys.argv) > 4 else 2
torch.set_num_threads(threads)
torch.manual_seed(0)
teacher = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
student = copy.deepcopy(teacher)
student.bert.encoder.layer = torch.nn.ModuleList([student.bert.encoder.layer[i] for i in (1, 3, 5)])
student.config.num_hidden_layers = 3
student.train()
tok = AutoTokenizer.from_pretrained(model_dir)
rows = [json.loads(l) for l in open(data, encoding="utf-8")][:32]
b = tok([r["text"] for r in rows], padding="max_length", truncation=True, max_length=64, return_tensors="pt")
gold = torch.tensor([1 if r["label"] == "fresh" else 0 for r in rows])
opt = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.01)
times = []
phases = {k: [] for k in ("teacher_forward", "student_forward_loss", "backward", "clip_adamw")}
for i in range(steps + 2):
    t0 = time.perf_counter()
    opt.zero_grad()
    with torch.no_grad():
        t_logits = teacher(**b).logits
    t1 = time.perf_counter()
    s_logits = student(**b).logits
    T = 2.0
    kd = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True, reduction="batchmean") * T * T
    loss = F.cross_entropy(s_logits, gold) + kd
    t2 = time.perf_counter()
    loss.backward()
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
                  "phases": {k: med(v) for k, v in phases.items()}}))
