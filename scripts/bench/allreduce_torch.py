"""All-reduce timing with torch.distributed (gloo), one rank per process:
allreduce_torch.py RANK WORLD PORT ITERS SIZE_MIB... — the same protocol
and output as worker/examples/allreduce.rs (median of ITERS after a
warm-up; bus bandwidth = size x 2(n-1)/n / time)."""
import datetime
import json
import sys
import time

import torch
import torch.distributed as dist

rank, world, port, iters = (int(x) for x in sys.argv[1:5])
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                        world_size=world, timeout=datetime.timedelta(seconds=120))
for mib in (int(x) for x in sys.argv[5:]):
    n = (mib << 20) // 4
    t = torch.ones(n, dtype=torch.float32)
    dist.all_reduce(t)
    times = []
    for _ in range(iters):
        dist.barrier()
        t0 = time.perf_counter()
        dist.all_reduce(t)
        times.append(time.perf_counter() - t0)
    times.sort()
    s = times[len(times) // 2]
    busbw = n * 4 * 2 * (world - 1) / world / s / 1e9
    if rank == 0:
        print(json.dumps({"impl": "pytorch", "mib": mib, "seconds": round(s, 6), "busbw_gbs": round(busbw, 3)}))
dist.destroy_process_group()
