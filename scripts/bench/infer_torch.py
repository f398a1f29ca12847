"""PyTorch/transformers peer of `distill infer` for the inference benchmark.

Same model directory, same texts, same batch size, same thread count, same
padding scheme (fixed to max_length in input order, or dynamic with batches
bucketed by length), mean pooling + normalize. Prints one JSON line with
seconds (tokenization + forward, model load excluded) and sentences/s.
"""
import argparse
import json
import time

import torch
from transformers import AutoModel, AutoTokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--padding", choices=["fixed", "dynamic"], default="dynamic")
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModel.from_pretrained(a.model).eval()
    texts = [json.loads(l)["text"] for l in open(a.data, encoding="utf-8") if l.strip()]
    t0 = time.perf_counter()
    with torch.inference_mode():
        enc = tok(texts, truncation=True, max_length=a.max_length)
        ids = enc["input_ids"]
        order = list(range(len(texts)))
        if a.padding == "dynamic":
            order.sort(key=lambda i: len(ids[i]))
        out = [None] * len(texts)
        for s in range(0, len(order), a.batch_size):
            idx = order[s : s + a.batch_size]
            feats = [{"input_ids": ids[i]} for i in idx]
            pad = "max_length" if a.padding == "fixed" else "longest"
            b = tok.pad(feats, padding=pad, max_length=a.max_length, return_tensors="pt")
            h = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1).clamp(min=1e-9), dim=1)
            for r, i in enumerate(idx):
                out[i] = e[r]
    secs = time.perf_counter() - t0
    print(json.dumps({"examples": len(texts), "seconds": secs, "examples_per_second": len(texts) / secs}))


if __name__ == "__main__":
    main()
