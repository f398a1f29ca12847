"""All-reduce timing with torch.distributed (gloo), one rank per process:
allreduce_torch.py RANK WORLD PORT ITERS SIZE_MIB... — the same protocol
and output as worker/examples/allreduce.rs (median of ITERS after a
warm-up; bus bandwidth = size x 2(n-1)/n / time). DISTILL_BACKEND=nccl
DISTILL_DEVICE=cuda:0 runs it on NCCL over CUDA tensors, timed to the
completion on the device, as distill's collective returns."""
import datetime
import os
import json
import sys
import time

import torch
import torch.distributed as dist

rank, world, port, iters = (int(x) for x in sys.argv[1:5])
torch.set_num_threads(1)
backend = os.environ.get("DISTILL_BACKEND", "gloo")
device = os.environ.get("DISTILL_DEVICE", "cpu")
sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
if device.startswith("cuda"):
    torch.cuda.set_device(device)
dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=world, timeout=datetime.timedelta(seconds=120))
for mib in (int(x) for x in sys.argv[5:]):
    n = (mib << 20) // 4
    t = torch.ones(n, dtype=torch.float32, device=device)
    dist.all_reduce(t)
    sync()
    times = []
    for _ in range(iters):
        dist.barrier()
        sync()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    s = times[len(times) // 2]
    busbw = n * 4 * 2 * (world - 1) / world / s / 1e9
    if rank == 0:
        print(json.dumps({"impl": "pytorch", "backend": backend, "mib": mib, "seconds": round(s, 6),
                          "algbw_gbs": round(n * 4 / s / 1e9, 3), "busbw_gbs": round(busbw, 3)}))
dist.destroy_process_group()
