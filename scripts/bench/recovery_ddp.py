"""The PyTorch peer of scripts/bench/recovery.sh: a small data-parallel job
under `torchrun --standalone` (elastic agent, gloo), the same shape as
distill's side (a 1-layer BERT student, hidden 32, batch 12, a checkpoint
every 25 steps, resumed at restart as torchrun's docs recommend).

Each completed step appends `<unix time> <restart count> <step>` to
LOG (rank 0 only), so the driver can time a recovery.
    torchrun --standalone --nproc-per-node=3 --max-restarts=3 \
        recovery_ddp.py LOG CKPT STEPS
"""
import os
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import BertConfig, BertForSequenceClassification


def main():
    log, ckpt, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    torch.manual_seed(5)
    cfg = BertConfig(vocab_size=60, hidden_size=32, num_hidden_layers=1,
                     num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    start = 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    ddp = DDP(model)
    g = torch.Generator().manual_seed(11)
    batch = 12 // world
    for step in range(start, steps):
        ids = torch.randint(5, 60, (batch, 24), generator=g)
        labels = torch.randint(0, 2, (batch,), generator=g)
        loss = ddp(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        done = step + 1
        if rank == 0:
            if done % 25 == 0:
                tmp = ckpt + ".tmp"
                torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                            "step": done}, tmp)
                os.replace(tmp, ckpt)
            with open(log, "a") as f:
                f.write(f"{time.time():.6f} {restarts} {done}\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
