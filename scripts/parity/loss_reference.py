"""Reference values for the distillation loss terms (worker/src/distill/loss.rs).

Usage: loss_reference.py IN OUT

IN is a safetensors file written by worker/tests/loss_reference.rs; OUT gets one
float64 scalar per term. Every term is computed here independently of the Rust
formulas, in float64, from torch.nn.functional and boolean selection of the real
(unpadded) positions rather than multiplying by a mask.
"""

import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


def d(x):
    return x.to(torch.float64)


def attention(students, teachers, mask):
    """Mean over mapped pairs of the MSE over real query x real key positions."""
    real = mask.bool()
    pair = real[:, :, None] & real[:, None, :]  # [b, q, k]
    terms = []
    for s, t in zip(students, teachers):
        s, t = d(s), d(t)
        if s.shape[1] != t.shape[1]:
            s, t = s.mean(dim=1, keepdim=True), t.mean(dim=1, keepdim=True)
        # [b, h, q, k] -> [b, q, k, h] -> [n_real_pairs, h]
        s_sel = s.permute(0, 2, 3, 1)[pair]
        t_sel = t.permute(0, 2, 3, 1)[pair]
        terms.append(F.mse_loss(s_sel, t_sel, reduction="mean"))
    return torch.stack(terms).mean()


def hidden(students, teachers, mask):
    """Mean over mapped pairs of the MSE over real tokens and teacher width."""
    real = mask.bool()
    terms = [F.mse_loss(d(s)[real], d(t)[real], reduction="mean") for s, t in zip(students, teachers)]
    return torch.stack(terms).mean()


def layers(x, prefix):
    out = []
    while f"{prefix}.{len(out)}" in x:
        out.append(x[f"{prefix}.{len(out)}"])
    assert out, f"no tensors named {prefix}.N"
    return out


def main(inp, outp):
    x = load_file(inp)
    out = {}

    logits, teacher, labels = d(x["logits"]), d(x["teacher_logits"]), x["labels"].long()
    out["task_ce"] = F.cross_entropy(logits, labels, ignore_index=-100, reduction="mean")

    for i, temp in enumerate(d(x["temperatures"]).tolist()):
        kl = F.kl_div(
            F.log_softmax(logits / temp, dim=-1),
            F.log_softmax(teacher / temp, dim=-1),
            log_target=True,
            reduction="batchmean",
        )
        out[f"kd.{i}"] = kl * temp * temp

    mask = x["mask"]
    out["attention"] = attention(layers(x, "s_att"), layers(x, "t_att"), mask)
    out["attention_heads"] = attention(layers(x, "s_att_heads"), layers(x, "t_att_heads"), mask)

    out["hidden"] = hidden(layers(x, "s_hid"), layers(x, "t_hid"), mask)
    projected = [F.linear(d(h), d(x["proj_w"]), d(x["proj_b"])) for h in layers(x, "s_hid_narrow")]
    out["hidden_proj"] = hidden(projected, layers(x, "t_hid"), mask)

    es, et = d(x["emb_s"]), d(x["emb_t"])
    out["embedding_mse"] = F.mse_loss(es, et, reduction="mean")
    out["embedding_cosine"] = (1.0 - F.cosine_similarity(es, et, dim=-1, eps=1e-8)).mean()

    save_file({k: v.reshape(()).contiguous() for k, v in out.items()}, outp)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
