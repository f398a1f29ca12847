//! All-reduce timing through distill's c10d Gloo shim, one rank per
//! process: `allreduce RANK WORLD PORT ITERS SIZE_MIB...`. Rank 0 prints
//! one JSON line per size: seconds per all-reduce (median of ITERS after
//! a warm-up) and bus bandwidth, size × 2(n−1)/n / time, as NCCL's tests
//! define it. The PyTorch peer is scripts/bench/allreduce_torch.py;
//! scripts/bench/allreduce.sh runs both.

use std::time::{Duration, Instant};

use distill_worker::collective::{GlooGroup, Rendezvous};
use tch::{Device, Kind, Tensor};

fn main() -> anyhow::Result<()> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    anyhow::ensure!(
        a.len() >= 5,
        "usage: allreduce RANK WORLD PORT ITERS SIZE_MIB..."
    );
    let (rank, world, port, iters): (u32, u32, u16, usize) =
        (a[0].parse()?, a[1].parse()?, a[2].parse()?, a[3].parse()?);
    tch::set_num_threads(1);
    let g = GlooGroup::join(&Rendezvous {
        host: "127.0.0.1".into(),
        port,
        host_store: true,
        prefix: "bench/gen-1/".into(),
        bind_host: "127.0.0.1".into(),
        rank,
        world,
        timeout: Duration::from_secs(120),
    })?;
    for mib in &a[4..] {
        let mib: usize = mib.parse()?;
        let n = (mib << 20) / 4;
        let mut t = Tensor::ones([n as i64], (Kind::Float, Device::Cpu));
        g.all_reduce_sum(&mut t)?; // warm-up
        let mut times = vec![];
        for _ in 0..iters {
            g.barrier()?;
            let t0 = Instant::now();
            g.all_reduce_sum(&mut t)?;
            times.push(t0.elapsed().as_secs_f64());
        }
        times.sort_by(|x, y| x.total_cmp(y));
        let s = times[times.len() / 2];
        let bytes = (n * 4) as f64;
        let busbw = bytes * 2.0 * (world as f64 - 1.0) / world as f64 / s / 1e9;
        if rank == 0 {
            println!("{{\"impl\":\"distill\",\"mib\":{mib},\"seconds\":{s:.6},\"busbw_gbs\":{busbw:.3}}}");
        }
    }
    Ok(())
}
