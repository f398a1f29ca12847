//! Client commands against a running coordinator: `distill submit`,
//! `distill status`, `distill watch`, `distill cancel` and `distill fetch`. They take the endpoints and token from flags or the
//! environment (`DISTILL_COORDINATOR`, `DISTILL_CLIENT_TOKEN`).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use distill_proto::client::{authed, Endpoints};
use distill_proto::v1 as pb;
use pb::job_service_client::JobServiceClient;

#[derive(clap::Args, Debug)]
pub struct Conn {
    /// Coordinator endpoints, comma separated (`http://host:7070,...`).
    #[arg(
        long,
        value_delimiter = ',',
        required = true,
        env = "DISTILL_COORDINATOR"
    )]
    pub coordinator: Vec<String>,
    /// Bearer token of the job API (the coordinator's --client-token).
    #[arg(long, env = "DISTILL_CLIENT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM CA certificate(s) the coordinator's certificate chains to
    /// (for `https://` endpoints).
    #[arg(long, env = "DISTILL_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (needs --tls-key and --tls-ca).
    #[arg(long, env = "DISTILL_TLS_CERT", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "DISTILL_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name to verify the coordinator's certificate against, instead of the
    /// endpoint's host.
    #[arg(long, requires = "tls_ca")]
    pub tls_domain: Option<String>,
    /// `text` (one line a person reads) or `json` (one object per line).
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    Text,
    Json,
}

impl Conn {
    fn endpoints(&self) -> anyhow::Result<Endpoints> {
        let mut e = Endpoints::new(self.coordinator.clone());
        e.token = self.token.clone();
        e.deadline = Duration::from_secs(30);
        if let Some(ca) = &self.tls_ca {
            let files = distill_worker::agent::TlsFiles {
                ca: ca.clone(),
                identity: self.tls_cert.clone().zip(self.tls_key.clone()),
                domain: self.tls_domain.clone(),
            };
            e.tls = Some(files.load()?);
        }
        Ok(e)
    }
}

/// A job as one line: id, state, stage, shards or steps, rate, ETA.
fn job_line(j: &pb::Job) -> String {
    let p = j.progress.clone().unwrap_or_default();
    let mut s = format!("{} {}", j.job_id, state_name(j.state));
    if !p.stage.is_empty() {
        s += &format!(" ({})", p.stage);
    }
    if p.shards_total > 0 {
        s += &format!(" shards {}/{}", p.shards_committed, p.shards_total);
    }
    if p.steps_total > 0 {
        s += &format!(
            " step {}/{} loss {:.4}",
            p.steps_done, p.steps_total, p.loss
        );
    }
    if p.world_size > 0 {
        s += &format!(" world {} gen {}", p.world_size, p.generation);
    }
    if p.samples_per_second > 0.0 {
        s += &format!(
            " {:.1} samples/s ETA {:.0} s",
            p.samples_per_second, p.eta_seconds
        );
    }
    if !j.reason.is_empty() {
        s += &format!(" — {}", j.reason);
    }
    for o in &j.outputs {
        s += &format!("\n  {o}");
    }
    s
}

fn print_job(j: &pb::Job, output: Output) {
    match output {
        Output::Text => println!("{}", job_line(j)),
        Output::Json => println!("{}", job_json(j)),
    }
}

#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// Job spec (TOML; `.json` for JSON). It is validated here and again by
    /// the coordinator; relative paths in it are resolved by the workers.
    pub spec: PathBuf,
    /// Higher runs first.
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    /// Directory for the job's outputs (checkpoints, student, report)
    /// instead of `<artifact root>/jobs/<job id>/`; it must be storage
    /// every worker shares (made absolute here).
    #[arg(long)]
    pub output_dir: Option<PathBuf>,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The job id `distill submit` printed.
    pub job: String,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(clap::Args, Debug)]
pub struct LogsArgs {
    /// The job whose log to print.
    pub job: String,
    /// Keep printing new lines until the job ends.
    #[arg(long, short)]
    pub follow: bool,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(clap::Args, Debug)]
pub struct FetchArgs {
    /// The job whose outputs to download.
    pub job: String,
    /// Where to write them (created if missing): the job's directory
    /// layout, e.g. `DIR/student/model.safetensors`, `DIR/report.json`.
    pub dir: PathBuf,
    #[command(flatten)]
    pub conn: Conn,
}

#[derive(clap::Args, Debug)]
pub struct CancelArgs {
    /// The job to cancel; its workers stop at their next step and are released.
    pub job: String,
    /// Why (kept on the job).
    #[arg(long, default_value = "cancelled by client")]
    pub reason: String,
    #[command(flatten)]
    pub conn: Conn,
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Submits the spec and prints the job id.
pub fn submit(a: SubmitArgs) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(&a.spec)
        .with_context(|| format!("cannot read {}", a.spec.display()))?;
    distill_spec::load(&a.spec)
        .with_context(|| format!("invalid job spec {}", a.spec.display()))?;
    let format = if a.spec.extension().is_some_and(|e| e == "json") {
        pb::SpecFormat::Json
    } else {
        pb::SpecFormat::Toml
    };
    let req = pb::SubmitJobRequest {
        spec: text,
        format: format as i32,
        priority: a.priority,
        request_id: String::new(),
        output_dir: match &a.output_dir {
            Some(d) => std::path::absolute(d)
                .with_context(|| format!("--output-dir {}", d.display()))?
                .display()
                .to_string(),
            None => String::new(),
        },
    };
    let mut e = a.conn.endpoints()?;
    let job = runtime()?.block_on(e.call(|ch, token| {
        let req = authed(req.clone(), token);
        async move { JobServiceClient::new(ch).submit_job(req).await }
    }))?;
    let id = job.job.map(|j| j.job_id).unwrap_or_default();
    match a.conn.output {
        Output::Text => println!("{id}"),
        Output::Json => println!("{}", serde_json::json!({ "job_id": id })),
    }
    Ok(())
}

fn state_name(state: i32) -> String {
    pb::JobState::try_from(state)
        .map(|s| {
            s.as_str_name()
                .trim_start_matches("JOB_STATE_")
                .to_lowercase()
        })
        .unwrap_or_else(|_| "unknown".into())
}

fn job_json(j: &pb::Job) -> serde_json::Value {
    let p = j.progress.clone().unwrap_or_default();
    serde_json::json!({
        "job_id": j.job_id,
        "state": state_name(j.state),
        "reason": j.reason,
        "stage": p.stage,
        "shards_total": p.shards_total,
        "shards_committed": p.shards_committed,
        "shards_reused": p.shards_reused,
        "steps_done": p.steps_done,
        "steps_total": p.steps_total,
        "loss": p.loss,
        "loss_terms": p.loss_terms,
        "world_size": p.world_size,
        "generation": p.generation,
        "steps_per_second": p.steps_per_second,
        "samples_per_second": p.samples_per_second,
        "eta_seconds": p.eta_seconds,
        "outputs": j.outputs,
    })
}

/// Prints the job as one JSON object.
pub fn status(a: StatusArgs) -> anyhow::Result<()> {
    let req = pb::GetJobRequest { job_id: a.job };
    let mut e = a.conn.endpoints()?;
    let j = runtime()?.block_on(e.call(|ch, token| {
        let req = authed(req.clone(), token);
        async move { JobServiceClient::new(ch).get_job(req).await }
    }))?;
    print_job(&j, a.conn.output);
    Ok(())
}

/// Prints one JSON line per change of the job until it ends; exits
/// non-zero when it failed or was cancelled.
pub fn watch(a: StatusArgs) -> anyhow::Result<()> {
    let req = pb::WatchJobRequest { job_id: a.job };
    let mut e = a.conn.endpoints()?;
    e.deadline = Duration::from_secs(30);
    let rt = runtime()?;
    let last = rt.block_on(async {
        let mut stream = e
            .call(|ch, token| {
                let req = authed(req.clone(), token);
                async move { JobServiceClient::new(ch).watch_job(req).await }
            })
            .await?;
        let mut last = None;
        while let Some(ev) = stream.message().await? {
            if let Some(j) = ev.job {
                print_job(&j, a.conn.output);
                last = Some(j);
            }
        }
        anyhow::Ok(last)
    })?;
    match last {
        Some(j) if j.state == pb::JobState::Succeeded as i32 => Ok(()),
        Some(j) => anyhow::bail!(
            "job {} ended {}: {}",
            j.job_id,
            state_name(j.state),
            j.reason
        ),
        None => anyhow::bail!("the watch ended before the job did"),
    }
}

/// Prints the job's log (what the coordinator saw happen to it), oldest
/// first; with `--follow`, until the job ends.
pub fn logs(a: LogsArgs) -> anyhow::Result<()> {
    let mut e = a.conn.endpoints()?;
    let rt = runtime()?;
    let mut after = String::new();
    loop {
        let req = pb::JobLogsRequest {
            job_id: a.job.clone(),
            after: after.clone(),
            limit: 0,
        };
        let page = rt.block_on(e.call(|ch, token| {
            let req = authed(req.clone(), token);
            async move { JobServiceClient::new(ch).job_logs(req).await }
        }))?;
        for l in &page.lines {
            match a.conn.output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({"at_ms": l.at_ms, "source": l.source, "message": l.message})
                ),
                Output::Text => println!(
                    "{} {}: {}",
                    distill_worker::progress::rfc3339_ms(
                        std::time::UNIX_EPOCH + Duration::from_millis(l.at_ms.max(0) as u64)
                    ),
                    l.source,
                    l.message
                ),
            }
        }
        after = page.next;
        let terminal = matches!(
            pb::JobState::try_from(page.state),
            Ok(pb::JobState::Succeeded | pb::JobState::Failed | pb::JobState::Cancelled)
        );
        if page.lines.is_empty() {
            if !a.follow || terminal {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// `FILE.part`: where a download is written until its checksum holds.
fn part_of(dest: &std::path::Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

/// Downloads the job's outputs into `dir`, checking each file's sha256
/// before it is moved into place; prints what was written (JSON).
pub fn fetch(a: FetchArgs) -> anyhow::Result<()> {
    use sha2::{Digest, Sha256};
    use std::io::Write;
    let req = pb::FetchOutputsRequest {
        job_id: a.job.clone(),
    };
    let mut e = a.conn.endpoints()?;
    let rt = runtime()?;
    let (files, bytes) = rt.block_on(async {
        let mut stream = e
            .call(|ch, token| {
                let req = authed(req.clone(), token);
                async move { JobServiceClient::new(ch).fetch_outputs(req).await }
            })
            .await?;
        let (mut files, mut bytes) = (0u64, 0u64);
        let mut open: Option<(String, std::fs::File, Sha256, PathBuf)> = None;
        while let Some(chunk) = stream.message().await? {
            let rel = std::path::Path::new(&chunk.path);
            if chunk.path.is_empty()
                || rel.is_absolute()
                || rel
                    .components()
                    .any(|c| !matches!(c, std::path::Component::Normal(_)))
            {
                anyhow::bail!("the coordinator sent an unsafe path {:?}", chunk.path);
            }
            if open.as_ref().is_none_or(|(p, ..)| *p != chunk.path) {
                let dest = a.dir.join(rel);
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("cannot create {}", parent.display()))?;
                }
                let part = part_of(&dest);
                let f = std::fs::File::create(&part)
                    .with_context(|| format!("cannot write {}", part.display()))?;
                open = Some((chunk.path.clone(), f, Sha256::new(), dest));
            }
            let (_, f, h, _) = open.as_mut().expect("opened above");
            f.write_all(&chunk.data)?;
            h.update(&chunk.data);
            bytes += chunk.data.len() as u64;
            if !chunk.sha256.is_empty() {
                let (path, f, h, dest) = open.take().expect("opened above");
                f.sync_all()?;
                let got = hex::encode(h.finalize());
                let part = part_of(&dest);
                if got != chunk.sha256 {
                    let _ = std::fs::remove_file(&part);
                    anyhow::bail!(
                        "{path}: sha256 {got} does not match the coordinator's {}",
                        chunk.sha256
                    );
                }
                std::fs::rename(&part, &dest)
                    .with_context(|| format!("cannot move {} into place", dest.display()))?;
                files += 1;
            }
        }
        if let Some((path, ..)) = open {
            anyhow::bail!("the stream ended inside {path}");
        }
        anyhow::Ok((files, bytes))
    })?;
    match a.conn.output {
        Output::Text => println!("{files} files, {bytes} bytes → {}", a.dir.display()),
        Output::Json => println!(
            "{}",
            serde_json::json!({"job_id": a.job, "dir": a.dir, "files": files, "bytes": bytes})
        ),
    }
    Ok(())
}

/// Cancels the job and prints it.
pub fn cancel(a: CancelArgs) -> anyhow::Result<()> {
    let req = pb::CancelJobRequest {
        job_id: a.job,
        reason: a.reason,
    };
    let mut e = a.conn.endpoints()?;
    let j = runtime()?.block_on(e.call(|ch, token| {
        let req = authed(req.clone(), token);
        async move { JobServiceClient::new(ch).cancel_job(req).await }
    }))?;
    print_job(&j, a.conn.output);
    Ok(())
}
