"""Reference values for the language-model distillation losses
(worker/src/distill/lm_loss.rs), computed independently in float64.

Usage: lm_loss_reference.py IN OUT

IN (safetensors): student [n, V], ids [n, k], logp [n, k], targets [n],
temperature and beta as 0-d tensors. OUT: one float64 scalar per loss.
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
# Forward KL: teacher top-k renormalised at T; student over the full vocab.
fkl, rkl, jsd = [], [], []
for i in range(n):
    p = torch.softmax(logp[i] / t, dim=0)
    q_full = torch.softmax(s[i] / t, dim=0)
    q_at = q_full[ids[i]]
    fkl.append((p * (p.log() - q_at.log())).sum())
    # On the top-k support, both renormalised.
    qk = torch.softmax(s[i, ids[i]] / t, dim=0)
    rkl.append(F.kl_div(p.log(), qk, reduction="sum"))  # KL(qk || p)
    m = beta * p + (1 - beta) * qk
    jsd.append(beta * (p * (p / m).log()).sum() + (1 - beta) * (qk * (qk / m).log()).sum())
out["forward_kl"] = torch.stack(fkl).mean() * t * t
out["reverse_kl"] = torch.stack(rkl).mean() * t * t
out["generalized_jsd"] = torch.stack(jsd).mean() * t * t
out["sequence_ce"] = F.cross_entropy(s, x["targets"].long())
save_file({k: v.reshape(()).contiguous() for k, v in out.items()}, sys.argv[2])
