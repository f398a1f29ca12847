"""The PyTorch peer of scripts/bench/quantize.sh: the same student directory
under transformers, in fp32 and under torch.ao.quantization.quantize_dynamic
(INT8, nn.Linear), measured as distill's report measures: accuracy on the
test split, latency p50 at each batch size over the first B test examples
padded to their longest (max(2, iters/10) warm-up passes, then `iters`
timed), and the bytes of the saved state dict. One JSON line per model."""
import argparse, io, json, os, statistics, sys, time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--test", required=True)
    p.add_argument("--labels", required=True, help="comma-separated, in id order")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,32")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    labels = a.labels.split(",")
    rows = [json.loads(l) for l in open(a.test, encoding="utf-8") if l.strip()]
    texts = [r["text"] for r in rows]
    gold = torch.tensor([labels.index(r["label"]) for r in rows])
    tok = AutoTokenizer.from_pretrained(a.model)
    fp32 = AutoModelForSequenceClassification.from_pretrained(a.model).eval()
    int8 = torch.ao.quantization.quantize_dynamic(
        AutoModelForSequenceClassification.from_pretrained(a.model).eval(), {torch.nn.Linear}, dtype=torch.qint8
    )
    for name, m in [("pytorch fp32", fp32), ("pytorch quantize_dynamic int8", int8)]:
        with torch.inference_mode():
            preds = []
            for i in range(0, len(texts), 64):
                enc = tok(texts[i:i + 64], padding=True, truncation=True, max_length=a.max_length, return_tensors="pt")
                preds.append(m(**enc).logits.argmax(-1))
            acc = (torch.cat(preds) == gold).float().mean().item()
            lat = {}
            for b in [int(x) for x in a.batch_sizes.split(",")]:
                batch = [texts[i % len(texts)] for i in range(b)]
                enc = tok(batch, padding=True, truncation=True, max_length=a.max_length, return_tensors="pt")
                for _ in range(max(2, a.iters // 10)):
                    m(**enc)
                ts = []
                for _ in range(a.iters):
                    t0 = time.perf_counter()
                    m(**enc)
                    ts.append((time.perf_counter() - t0) * 1e3)
                lat[str(b)] = statistics.median(ts)
        buf = io.BytesIO()
        torch.save(m.state_dict(), buf)
        print(json.dumps({"model": name, "accuracy": acc, "p50_ms": lat, "bytes": buf.getbuffer().nbytes}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
