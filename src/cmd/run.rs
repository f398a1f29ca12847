//! `distill run` and `distill plan`: a job on this machine.
//!
//! `run` executes the whole pipeline in this process (see
//! `distill_worker::pipeline`); its output directory holds every stage's
//! checkpoints, so running the same command again resumes. `plan` validates
//! the spec and the files and prints what `run` would do, spending no
//! training time.

use anyhow::Context;
use distill_worker::pipeline::{render, run_local, RunOptions};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Job spec (TOML; `.json` for JSON), e.g. cluster-configs/sentiment-minilm.toml.
    pub spec: PathBuf,
    /// Output directory (default: runs/<job name>).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Also train the same student on labels alone with the same budget, for comparison.
    #[arg(long)]
    pub baseline: bool,
    /// `cpu`, `cuda` or `cuda:N` (default: the spec's cluster.device).
    #[arg(long)]
    pub device: Option<String>,
    /// CPU threads for libtorch (at least 1; default: libtorch's choice).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub threads: Option<i32>,
    /// Override training.seed (the job's one seed: data order, fresh
    /// parameters, dropout); scripts/seeds.sh runs a job over several.
    #[arg(long)]
    pub seed: Option<u64>,
}

fn load(spec: &PathBuf) -> anyhow::Result<distill_spec::JobSpec> {
    distill_spec::load(spec).with_context(|| format!("invalid job spec {}", spec.display()))
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let mut spec = load(&a.spec)?;
    if let Some(seed) = a.seed {
        spec.training.seed = seed;
    }
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    let device = match &a.device {
        Some(d) => d.clone(),
        None => serde_json::to_value(spec.cluster.device)?
            .as_str()
            .unwrap_or("cpu")
            .to_string(),
    };
    let device = distill_worker::device::parse_device(&device)?;
    let name = spec.name.clone().unwrap_or_else(|| "job".into());
    let out = a
        .output
        .unwrap_or_else(|| PathBuf::from("runs").join(&name));
    eprintln!("run: job {name} → {}", out.display());
    let stop = on_ctrl_c();
    let report = match run_local(
        &spec,
        &RunOptions {
            out: out.clone(),
            device,
            baseline: a.baseline,
            stop: Some(stop),
        },
    ) {
        Err(distill_worker::Error::Stopped) => {
            eprintln!(
                "run: stopped; the same command resumes from the checkpoint it saved in {}",
                out.display()
            );
            std::process::exit(130);
        }
        r => r?,
    };
    println!("{}", render(&report));
    println!(
        "student: {}\nreport: {}",
        report.student_dir.display(),
        out.join("report.json").display()
    );
    Ok(())
}

/// A flag the first Ctrl-C sets (training stops at its next step and
/// saves a checkpoint there); a second Ctrl-C quits at once.
fn on_ctrl_c() -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = stop.clone();
    std::thread::spawn(move || {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        else {
            return;
        };
        rt.block_on(async {
            if tokio::signal::ctrl_c().await.is_err() {
                return;
            }
            flag.store(true, std::sync::atomic::Ordering::Relaxed);
            eprintln!(
                "run: interrupted: stopping at the next training step and saving a checkpoint there (Ctrl-C again quits at once)"
            );
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        });
    });
    stop
}

#[derive(clap::Args)]
pub struct PlanArgs {
    /// Job spec (TOML; `.json` for JSON).
    pub spec: PathBuf,
}

pub fn plan(a: PlanArgs) -> anyhow::Result<()> {
    let spec = load(&a.spec)?;
    let plan = distill_worker::plan::plan(&spec)?;
    println!("{}", serde_json::to_string_pretty(&plan)?);
    Ok(())
}
