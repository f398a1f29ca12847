//! All-reduce timing through distill's c10d Gloo shim, one rank per
//! process: `allreduce RANK WORLD PORT ITERS SIZE_MIB...`. Rank 0 prints
//! one JSON line per size: seconds per all-reduce (median of ITERS after
//! a warm-up) and bus bandwidth, size × 2(n−1)/n / time, as NCCL's tests
//! define it. The PyTorch peer is scripts/bench/allreduce_torch.py;
//! scripts/bench/allreduce.sh runs both.
//!
//! `DISTILL_BACKEND=nccl DISTILL_DEVICE=cuda:0` runs it on NCCL over CUDA
//! tensors instead (a build with the `nccl` feature; one GPU per rank).
//! Every size's result is checked: rank r contributes r + 1 everywhere, so
//! each element must sum to world(world + 1)/2.

use std::time::{Duration, Instant};

use distill_worker::collective::{Backend, Group, Rendezvous};
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
    let device = match std::env::var("DISTILL_DEVICE").as_deref() {
        Ok("cpu") | Err(_) => Device::Cpu,
        Ok(d) => Device::Cuda(d.strip_prefix("cuda:").unwrap_or("0").parse()?),
    };
    let backend = match (std::env::var("DISTILL_BACKEND").as_deref(), device) {
        (Ok("nccl"), Device::Cuda(i)) => Backend::Nccl { device: i },
        (Ok("nccl"), _) => anyhow::bail!("DISTILL_BACKEND=nccl needs DISTILL_DEVICE=cuda:N"),
        _ => Backend::Gloo,
    };
    let t0 = Instant::now();
    let g = Group::join(&Rendezvous {
        host: "127.0.0.1".into(),
        port,
        host_store: true,
        prefix: "bench/gen-1/".into(),
        bind_host: "127.0.0.1".into(),
        rank,
        world,
        timeout: Duration::from_secs(120),
        backend,
    })?;
    if rank == 0 {
        eprintln!(
            "{} group of {world} formed on {device:?} in {:.3} s",
            backend.name(),
            t0.elapsed().as_secs_f64()
        );
    }
    let expect = (world * (world + 1) / 2) as f64;
    for mib in &a[4..] {
        let mib: usize = mib.parse()?;
        let n = (mib << 20) / 4;
        let mut t = Tensor::full([n as i64], (rank + 1) as f64, (Kind::Float, device));
        g.all_reduce_sum(&mut t)?; // warm-up, checked
        let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
        anyhow::ensure!(
            lo == expect && hi == expect,
            "{mib} MiB all-reduce: elements in [{lo}, {hi}], expected {expect}"
        );
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
            println!("{{\"impl\":\"distill\",\"backend\":\"{}\",\"mib\":{mib},\"checked\":true,\"seconds\":{s:.6},\"algbw_gbs\":{:.3},\"busbw_gbs\":{busbw:.3}}}", backend.name(), bytes / s / 1e9);
        }
    }
    Ok(())
}
