//! `distill run` and `distill plan`: a job on this machine.
//!
//! `run` goes through the same code path as a cluster job: it starts the
//! coordinator in this process on the embedded store (under
//! `<output>/.coordinator/`, the artifact root being the output directory),
//! one local worker on the device given, submits the job with its outputs
//! in `<output>`, and waits for it. The stages are the cluster's tasks:
//! plan → (teacher fine-tuning) → (teacher-signal shards) → training (+ the
//! labels-only baseline) → evaluation, quantization and report. Every task
//! checkpoints under the output directory, so Ctrl-C stops cleanly and the
//! same command again resumes the same job. `plan` validates the spec and
//! the files and prints what `run` would do, spending no training time.

use anyhow::Context;
use distill_coordinator::server::{serve_with, Config, StoreConfig};
use distill_proto::client::{authed, Endpoints};
use distill_proto::v1 as pb;
use distill_worker::pipeline::render;
use pb::job_service_client::JobServiceClient;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Job spec (TOML; `.json` for JSON), e.g. cluster-configs/sentiment-quickstart.toml.
    pub spec: PathBuf,
    /// Output directory (default: runs/<job name>). It holds the job's
    /// checkpoints, student, report and the local coordinator's state, so
    /// the same command again resumes there.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Also train the same student on labels alone with the same budget,
    /// for comparison (sets evaluation.baseline).
    #[arg(long)]
    pub baseline: bool,
    /// `cpu`, `cuda` or `cuda:N` (default: the spec's cluster.device).
    #[arg(long)]
    pub device: Option<String>,
    /// CPU threads for libtorch (at least 1; default: libtorch's choice),
    /// per local worker.
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub threads: Option<i32>,
    /// Local workers, training data-parallel (default: one per visible GPU
    /// with `--device cuda`, one otherwise). With `cuda` worker i uses GPU
    /// i; on `cpu` they share the cores.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub workers: Option<u32>,
    /// Override training.seed (the job's one seed: data order, fresh
    /// parameters, dropout); scripts/seeds.sh runs a job over several.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Share fine-tuned teachers between runs through this directory
    /// (default: off, every run fine-tunes its own). A run whose teacher
    /// would come out exactly as an earlier run's (same teacher files,
    /// labelled and eval data, teacher budget, seed, device kind) takes it
    /// from there: runs that differ only in the student skip the teacher.
    /// scripts/seeds.sh uses runs/.teachers.
    #[arg(long, env = "DISTILL_TEACHER_CACHE")]
    pub teacher_cache: Option<PathBuf>,
    /// What a failed quality check does once the job has finished (the
    /// student near chance: see report.json `quality`): `fail` exits with
    /// status 3, `warn` prints the failure and exits 0 (smoke runs whose
    /// student is not meant to learn). Outputs are written either way.
    #[arg(long, value_enum, default_value_t = OnFailedQuality::Fail)]
    pub on_failed_quality: OnFailedQuality,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnFailedQuality {
    Fail,
    Warn,
}

fn load(spec: &PathBuf) -> anyhow::Result<distill_spec::JobSpec> {
    distill_spec::load(spec).with_context(|| format!("invalid job spec {}", spec.display()))
}

pub fn run(a: RunArgs) -> anyhow::Result<()> {
    let mut spec = load(&a.spec)?;
    if let Some(seed) = a.seed {
        spec.training.seed = seed;
    }
    if a.baseline {
        spec.evaluation.baseline = true;
    }
    let device_name = match &a.device {
        Some(d) => d.clone(),
        None => serde_json::to_value(spec.cluster.device)?
            .as_str()
            .unwrap_or("cpu")
            .to_string(),
    };
    let device = distill_worker::device::parse_device(&device_name)?;
    let devices = local_devices(&device_name, device, a.workers)?;
    // The job must be able to start on the local workers, and use them
    // all; a spec that already allows that is left as written.
    let n = devices.len() as u32;
    if spec.cluster.min_workers > n || spec.cluster.max_workers < n {
        eprintln!(
            "run: cluster.min_workers/max_workers = {}/{} are for a cluster; this machine runs the job on {n} local worker(s)",
            spec.cluster.min_workers, spec.cluster.max_workers
        );
        spec.cluster.min_workers = spec.cluster.min_workers.min(n);
        spec.cluster.max_workers = spec.cluster.max_workers.max(n);
    }
    let name = spec.name.clone().unwrap_or_else(|| "job".into());
    let out = a
        .output
        .unwrap_or_else(|| PathBuf::from("runs").join(&name));
    std::fs::create_dir_all(&out).with_context(|| format!("cannot create {}", out.display()))?;
    let out = std::path::absolute(&out)?;
    eprintln!("run: job {name} → {}", out.display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let teachers = a
        .teacher_cache
        .as_deref()
        .map(|d| distill_worker::teachers::TeacherCache::parse(&d.to_string_lossy()))
        .unwrap_or(distill_worker::teachers::TeacherCache::Off);
    let outcome = rt.block_on(local_job(spec, &out, &devices, a.threads, teachers))?;
    match outcome {
        Outcome::Stopped => {
            eprintln!(
                "run: stopped; the same command resumes from the checkpoint it saved in {}",
                out.display()
            );
            std::process::exit(130);
        }
        Outcome::Failed(reason) => anyhow::bail!("the job failed: {reason}"),
        Outcome::Succeeded => {}
    }
    let report = distill_worker::report::read(&out.join("report.json"))?;
    println!("{}", render(&report));
    println!(
        "student: {}\nreport: {}",
        report.student_dir.display(),
        out.join("report.json").display()
    );
    if let Some(q) = report.quality.as_ref().filter(|q| !q.passed) {
        eprintln!(
            "run: QUALITY CHECK FAILED (the job finished, its outputs are written, but the student is not usable):"
        );
        for f in &q.failures {
            eprintln!("run:   {f}");
        }
        if a.on_failed_quality == OnFailedQuality::Fail {
            std::process::exit(distill_worker::quality::EXIT_FAILED_QUALITY);
        }
    }
    Ok(())
}

enum Outcome {
    Succeeded,
    Failed(String),
    /// Ctrl-C: the worker gave its task back with a checkpoint.
    Stopped,
}

/// The devices of the local workers: `workers` of them (on `cuda`
/// without an index, GPUs 0..workers), or by default one per visible GPU
/// for `cuda` and one otherwise.
fn local_devices(
    name: &str,
    device: tch::Device,
    workers: Option<u32>,
) -> anyhow::Result<Vec<tch::Device>> {
    let any_gpu = name.trim().eq_ignore_ascii_case("cuda");
    let gpus = tch::Cuda::device_count().max(0) as u32;
    match (device, workers) {
        (tch::Device::Cuda(_), None) if any_gpu => {
            Ok((0..gpus.max(1) as usize).map(tch::Device::Cuda).collect())
        }
        (tch::Device::Cuda(_), Some(n)) if any_gpu => {
            if n > gpus {
                anyhow::bail!("--workers {n}: libtorch sees {gpus} GPU(s); one worker per GPU");
            }
            Ok((0..n as usize).map(tch::Device::Cuda).collect())
        }
        (tch::Device::Cuda(i), Some(n)) if n > 1 => anyhow::bail!(
            "--workers {n} with --device cuda:{i}: give --device cuda to use GPUs 0..{n}"
        ),
        (d, n) => Ok(vec![d; n.unwrap_or(1) as usize]),
    }
}

/// The job through an in-process coordinator and in-process workers.
async fn local_job(
    spec: distill_spec::JobSpec,
    out: &Path,
    devices: &[tch::Device],
    threads: Option<i32>,
    teachers: distill_worker::teachers::TeacherCache,
) -> anyhow::Result<Outcome> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let config = Config {
        artifact_root: out.display().to_string(),
        // One worker on this machine: nothing to speculate against.
        speculation: None,
        ..Config::default()
    };
    let stop_coordinator = Arc::new(tokio::sync::Notify::new());
    let stopped = stop_coordinator.clone();
    let mut coordinator = tokio::spawn(serve_with(
        StoreConfig::Embedded {
            dir: out.join(".coordinator"),
        },
        config,
        listener,
        None,
        async move { stopped.notified().await },
    ));
    let (stop_workers, workers_stop) = tokio::sync::watch::channel(false);
    let many = devices.len() > 1;
    // Worker futures are not Send: they run on this thread's LocalSet,
    // beside the client's.
    let local = tokio::task::LocalSet::new();
    let work = local.run_until(async {
        let workers: Vec<_> = devices
            .iter()
            .enumerate()
            .map(|(i, &device)| {
                let opts = distill_worker::agent::Options {
                    coordinators: vec![endpoint.clone()],
                    token: None,
                    tls: None,
                    device,
                    threads,
                    name: if many {
                        format!("local-{i}")
                    } else {
                        "local".into()
                    },
                    max_backoff: Duration::from_millis(500),
                    collective_host: "127.0.0.1".into(),
                    collective_port: 0,
                    collective_timeout: Duration::from_secs(30),
                    collective_backend: distill_worker::collective::BackendChoice::Auto,
                    teachers: teachers.clone(),
                };
                let mut stop = workers_stop.clone();
                tokio::task::spawn_local(distill_worker::agent::serve(opts, async move {
                    let _ = stop.wait_for(|s| *s).await;
                }))
            })
            .collect();
        let mut client = Endpoints::new(vec![endpoint.clone()]);
        client.deadline = Duration::from_secs(30);
        let outcome = match find_or_submit(&mut client, &spec, out).await {
            Ok(job_id) => wait(&mut client, &job_id).await,
            Err(e) => Err(e),
        };
        let _ = stop_workers.send(true);
        for w in workers {
            w.await??;
        }
        outcome
    });
    // A coordinator that cannot start (its store in use, say) ends the run.
    let outcome = tokio::select! {
        o = work => o,
        r = &mut coordinator => {
            r??;
            anyhow::bail!("the in-process coordinator stopped before the job ended")
        }
    };
    stop_coordinator.notify_one();
    coordinator.await??;
    outcome
}

/// The job this output directory already holds for the same spec (the
/// same command run again resumes it), or a new one. A directory that
/// holds a job of another spec is refused, naming the fields that differ.
async fn find_or_submit(
    client: &mut Endpoints,
    spec: &distill_spec::JobSpec,
    out: &Path,
) -> anyhow::Result<String> {
    let spec_json = spec.to_json();
    let out_s = out.display().to_string();
    let jobs = client
        .call(|ch, token| {
            let req = authed(pb::ListJobsRequest::default(), token);
            async move { JobServiceClient::new(ch).list_jobs(req).await }
        })
        .await?
        .jobs;
    let terminal = |s: i32| {
        matches!(
            pb::JobState::try_from(s),
            Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
        )
    };
    // Checkpoints carry no fingerprint of the spec: a job of another spec
    // here would hand this one its teacher and student checkpoints.
    if let Some(j) = jobs.iter().find(|j| j.spec_json != spec_json) {
        let (old, new) = (
            serde_json::from_str(&j.spec_json).unwrap_or_default(),
            serde_json::from_str(&spec_json).unwrap_or_default(),
        );
        let mut fields = vec![];
        differing("", &old, &new, &mut fields);
        anyhow::bail!(
            "{} holds {} of another spec (it differs in {}): this run would resume from that job's checkpoints; give --output a new directory, or remove {}",
            out.display(),
            j.job_id,
            fields.join(", "),
            out.display()
        );
    }
    if let Some(j) = jobs
        .iter()
        .find(|j| !terminal(j.state) && j.output_dir == out_s)
    {
        eprintln!("run: resuming job {} in {}", j.job_id, out.display());
        return Ok(j.job_id.clone());
    }
    let req = pb::SubmitJobRequest {
        spec: spec_json,
        format: pb::SpecFormat::Json as i32,
        priority: 0,
        request_id: String::new(),
        output_dir: out_s,
    };
    let job = client
        .call(|ch, token| {
            let req = authed(req.clone(), token);
            async move { JobServiceClient::new(ch).submit_job(req).await }
        })
        .await?;
    Ok(job.job.map(|j| j.job_id).unwrap_or_default())
}

/// Polls the job until it ends; the first Ctrl-C stops the worker at its
/// next step (it checkpoints there and gives its task back), a second one
/// quits at once.
async fn wait(client: &mut Endpoints, job_id: &str) -> anyhow::Result<Outcome> {
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    loop {
        tokio::select! {
            _ = &mut ctrl_c => {
                eprintln!(
                    "run: interrupted: stopping at the next training step and saving a checkpoint there (Ctrl-C again quits at once)"
                );
                tokio::spawn(async {
                    if tokio::signal::ctrl_c().await.is_ok() {
                        std::process::exit(130);
                    }
                });
                return Ok(Outcome::Stopped);
            }
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
        let id = job_id.to_string();
        let job = client
            .call(|ch, token| {
                let req = authed(pb::GetJobRequest { job_id: id.clone() }, token);
                async move { JobServiceClient::new(ch).get_job(req).await }
            })
            .await?;
        match pb::JobState::try_from(job.state) {
            Ok(pb::JobState::Succeeded) => return Ok(Outcome::Succeeded),
            Ok(pb::JobState::Failed | pb::JobState::Cancelled) => {
                return Ok(Outcome::Failed(job.reason))
            }
            _ => {}
        }
    }
}

#[derive(clap::Args)]
pub struct PlanArgs {
    /// Job spec (TOML; `.json` for JSON).
    pub spec: PathBuf,
}

pub fn plan(a: PlanArgs) -> anyhow::Result<()> {
    let spec = load(&a.spec)?;
    let plan = distill_worker::plan::plan(&spec)?;
    for w in &plan.warnings {
        eprintln!("plan: warning: {w}");
    }
    println!("{}", serde_json::to_string_pretty(&plan)?);
    Ok(())
}

/// The dotted paths at which two JSON values differ (`training.seed`).
fn differing(at: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let path = if at.is_empty() {
                    k.clone()
                } else {
                    format!("{at}.{k}")
                };
                let null = Value::Null;
                differing(
                    &path,
                    x.get(k).unwrap_or(&null),
                    y.get(k).unwrap_or(&null),
                    out,
                );
            }
        }
        _ if a != b => out.push(if at.is_empty() {
            "everything".into()
        } else {
            at.to_string()
        }),
        _ => {}
    }
}
