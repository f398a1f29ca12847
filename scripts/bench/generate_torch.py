"""Generation benchmark, PyTorch side (DISTILL_DEVICE=cuda:0 on a GPU, DISTILL_DTYPE=bf16): transformers' generate() on the same
prompts as worker/examples/generate_bench.rs (greedy, fp32, a fixed number of
new tokens: min_new_tokens = max_new_tokens), prefill ms at batch 1, decode
tokens/s at batch 1 (4 prompts one by one) and batch 16 (left-padded), and
the measured memory copy bandwidth. One JSON line.
  generate_torch.py MODEL_DIR PROMPTS_JSON NEW_TOKENS THREADS
"""
import json
import sys
import time

import torch
from transformers import AutoModelForCausalLM

model_dir, prompts_path, new, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
import os
dtype = torch.bfloat16 if os.environ.get("DISTILL_DTYPE") == "bf16" else torch.float32
dev = os.environ.get("DISTILL_DEVICE", "cpu")
m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval().to(dev)
sync = (lambda: torch.cuda.synchronize()) if dev.startswith("cuda") else (lambda: None)
prompts = json.load(open(prompts_path))
out = {"impl": "pytorch"}
with torch.no_grad():
    pre = []
    for p in prompts[:8]:
        ids = torch.tensor([p], device=dev)
        sync()
        t0 = time.perf_counter()
        m(input_ids=ids, use_cache=True, logits_to_keep=1)
        sync()
        pre.append(time.perf_counter() - t0)
    pre.sort()
    out["prefill_ms_batch1"] = pre[len(pre) // 2] * 1000
    # batch 1
    t0 = time.perf_counter()
    toks = 0
    for p in prompts[:4]:
        ids = torch.tensor([p], device=dev)
        g = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)
        toks += g.shape[1] - len(p)
    out["tokens_per_s_batch1"] = toks / (time.perf_counter() - t0)
    # batch 16, left padded
    ps = prompts[:16]
    n = max(len(p) for p in ps)
    ids = torch.tensor([[0] * (n - len(p)) + p for p in ps], device=dev)
    mask = torch.tensor([[0] * (n - len(p)) + [1] * len(p) for p in ps], device=dev)
    t0 = time.perf_counter()
    g = m.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    sync()
    out["tokens_per_s_batch16"] = (g.shape[1] - n) * len(ps) / (time.perf_counter() - t0)
    if os.environ.get("DISTILL_IDS"):
        json.dump(g[:, n:].tolist(), open(os.environ["DISTILL_IDS"], "w"))
    # Natural stopping at EOS, up to 4x the new tokens: useful tokens (up to
    # and including each row's first EOS) per second.
    eos = m.generation_config.eos_token_id
    sync()
    t0 = time.perf_counter()
    g = m.generate(ids, attention_mask=mask, max_new_tokens=4 * new, do_sample=False, pad_token_id=0,
                   eos_token_id=eos)
    sync()
    secs = time.perf_counter() - t0
    useful = 0
    for row in g[:, n:].tolist():
        useful += next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
    out["eos_tokens_per_s_batch16"] = useful / secs
    out["eos_tokens"] = useful
# Copy bandwidth: read + write of a 512 MB buffer, best of 5.
a = torch.empty(128 * 1024 * 1024, dtype=torch.float32).fill_(1.0)
b = torch.empty_like(a)
best = 1e9
for _ in range(5):
    t0 = time.perf_counter()
    b.copy_(a)
    best = min(best, time.perf_counter() - t0)
out["copy_gb_per_s"] = 2 * a.numel() * 4 / best / 1e9
print(json.dumps(out))
