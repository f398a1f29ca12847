//! `distill doctor`: what libtorch sees here, as JSON.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    let report = distill_worker::device::report();
    let out = serde_json::json!({
        "distill_version": env!("CARGO_PKG_VERSION"),
        "cuda_available": report.cuda_available,
        "cuda_device_count": report.cuda_device_count,
        "cudnn_available": report.cudnn_available,
        "cpu_threads": report.cpu_threads,
    });
    println!("{}", serde_json::to_string_pretty(&out)?);
    Ok(())
}
