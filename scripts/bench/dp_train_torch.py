"""PyTorch DDP peer of worker/examples/dp_train.rs: the same KD training
with torch.nn.parallel.DistributedDataParallel over gloo (its default
bucketing and overlap). Teacher all-MiniLM-L6-v2 + 2-class head, student =
teacher layers 1,3,5; global batch 32 (32/WORLD per rank) of the data's
reviews in a seeded random order, padded to the batch's longest (max 64);
CE + T²·KL (T=2), clip_grad_norm_(1.0), AdamW(5e-5, wd 0.01); one thread
per rank. Rank 0 prints samples per second over STEPS steps after 2 warm-up
steps.
    python dp_train_torch.py RANK WORLD PORT MODEL_DIR DATA.jsonl [STEPS]
"""
import copy, json, sys, time
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AutoTokenizer, BertForSequenceClassification

rank, world, port = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
model_dir, data = sys.argv[4], sys.argv[5]
steps = int(sys.argv[6]) if len(sys.argv) > 6 else 20
torch.set_num_threads(1)
torch.manual_seed(0)
teacher = BertForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()
student = copy.deepcopy(teacher)
student.bert.encoder.layer = torch.nn.ModuleList([student.bert.encoder.layer[i] for i in (1, 3, 5)])
student.config.num_hidden_layers = 3
student.train()
if world > 1:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model = DDP(student)
else:
    model = student
tok = AutoTokenizer.from_pretrained(model_dir)
rows = [json.loads(l) for l in open(data, encoding="utf-8")]
opt = torch.optim.AdamW(student.parameters(), lr=5e-5, weight_decay=0.01)
g = torch.Generator().manual_seed(1)
order = torch.randperm(len(rows), generator=g).tolist()
per = 32 // world
t_start = None
for i in range(steps + 2):
    if i == 2:
        t_start = time.perf_counter()
    batch = [rows[order[(i * 32 + j) % len(rows)]] for j in range(rank * per, (rank + 1) * per)]
    b = tok([r["text"] for r in batch], padding=True, truncation=True, max_length=64, return_tensors="pt")
    gold = torch.tensor([1 if r["label"] == "fresh" else 0 for r in batch])
    opt.zero_grad()
    with torch.no_grad():
        t_logits = teacher(**b).logits
    s_logits = model(**b).logits
    T = 2.0
    kd = F.kl_div(F.log_softmax(s_logits / T, -1), F.log_softmax(t_logits / T, -1), log_target=True, reduction="batchmean") * T * T
    loss = F.cross_entropy(s_logits, gold) + kd
    loss.backward()
    torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
    opt.step()
    loss.item()
secs = time.perf_counter() - t_start
if rank == 0:
    print(json.dumps({"impl": "pytorch-ddp", "world": world, "steps": steps,
                      "samples_per_second": steps * 32 / secs, "seconds": secs}))
if world > 1:
    dist.destroy_process_group()
