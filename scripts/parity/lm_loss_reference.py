"""Reference values for the language-model distillation losses
(worker/src/distill/lm_loss.rs), computed independently in float64.

Usage: lm_loss_reference.py IN OUT

IN (safetensors): student [n, V], ids [n, k], logp [n, k], targets [n],
temperature and beta as 0-d tensors. OUT: one float64 scalar per loss.
Written with probabilities and boolean selection (not log-sum-exp and
scatter as the Rust side), one row at a time.
"""
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

x = load_file(sys.argv[1])
s = x["student"].double()
ids = x["ids"].long()
logp = x["logp"].double()
t = float(x["temperature"])
beta = float(x["beta"])
n = s.shape[0]

out = {}
# The k + 1 buckets (top-k and the tail) of both, tempered as categoricals.
fkl, rkl, jsd = [], [], []
for i in range(n):
    tp = logp[i].exp()
    tb = torch.cat([tp, (1 - tp.sum()).clamp(min=1e-30).reshape(1)])
    q = torch.softmax(s[i], dim=0)
    keep = torch.zeros_like(q, dtype=torch.bool)
    keep[ids[i]] = True
    sb = torch.cat([q[ids[i]], q[~keep].sum().clamp(min=1e-30).reshape(1)])
    p = torch.softmax(tb.log() / t, dim=0)
    qk = torch.softmax(sb.log() / t, dim=0)
    fkl.append(F.kl_div(qk.log(), p, reduction="sum"))  # KL(p || qk)
    rkl.append(F.kl_div(p.log(), qk, reduction="sum"))  # KL(qk || p)
    m = beta * p + (1 - beta) * qk
    jsd.append(beta * (p * (p / m).log()).sum() + (1 - beta) * (qk * (qk / m).log()).sum())
out["forward_kl"] = torch.stack(fkl).mean() * t * t
out["reverse_kl"] = torch.stack(rkl).mean() * t * t
out["generalized_jsd"] = torch.stack(jsd).mean() * t * t
out["sequence_ce"] = F.cross_entropy(s, x["targets"].long())
save_file({k: v.reshape(()).contiguous() for k, v in out.items()}, sys.argv[2])
