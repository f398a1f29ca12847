//! The worker's libtorch side: one dedicated OS thread that runs leased
//! tasks, fed over a channel by the async side ([`super`]). Nothing here
//! touches the tokio runtime; the only way in is [`Executor::submit`], the
//! only ways back are the reply channel and the shared [`Control`].
//!
//! What a task writes (the storage contract, under the lease's
//! `artifact_root`):
//!
//! | task | writes | reports |
//! |---|---|---|
//! | teacher signal `[start, end)` | `signal/<key>/{signal.safetensors, manifest.json}` (`crate::signal`; the key is the content address, so a resubmitted job finds it) | the manifest and its sha256; `reused` when it was already there and verified |
//! | train | `jobs/<job>/student-ckpt/` (checkpoints, resumable by any worker), `jobs/<job>/teacher/` (when fine-tuned), `jobs/<job>/student/` (the exported student) | `student/model.safetensors` and its sha256 |
//! | evaluate (+ quantize, gate) | `jobs/<job>/report.json`, `report.md`, plots, `quantized/<format>/` | `report.json` and its sha256 |

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use std::time::Instant;

use distill_proto::v1 as pb;
use distill_spec::{JobSpec, TeacherSignal};
use tch::{Device, Tensor};
use tokio::sync::oneshot;

use crate::artifacts::Artifacts;
use crate::elastic::{Committer, Joined, Membership};
use crate::infer::{infer, InferOptions};
use crate::model::TaskModel;
use crate::pipeline::{self, Hooks, Prepared};
use crate::signal::{self, TeacherId};
use crate::tokenize::Encoded;
use crate::{Error, Result};
use distill_proto::client::{authed, Endpoints};
use pb::worker_service_client::WorkerServiceClient;

/// What the async side and the executor share about the running task.
#[derive(Debug, Default)]
pub struct Control {
    /// Set to stop at the next step or batch boundary.
    pub stop: Arc<AtomicBool>,
    /// Set when the coordinator took the task away (its output is void).
    pub aborted: AtomicBool,
    /// Latest progress, read by the heartbeat.
    pub progress: Mutex<Option<Progress>>,
    /// Set when the training group changed (or the task is taken away):
    /// collectives in flight return, training re-joins.
    pub group_flag: Arc<AtomicBool>,
    /// The training group generation this worker is in (0: none), and
    /// its size.
    pub generation: AtomicU64,
    pub world: std::sync::atomic::AtomicU32,
}

/// What a training task needs to talk to the coordinator about its group
/// from the libtorch thread.
pub struct LinkParts {
    pub handle: tokio::runtime::Handle,
    pub endpoints: Endpoints,
    pub session: String,
    pub job: String,
    pub host: String,
    pub timeout: Duration,
    pub backend: crate::collective::BackendChoice,
}

/// [`Membership`] over the coordinator's `JoinGroup` and
/// `CommitCheckpoint`, called from the libtorch thread by blocking on the
/// worker's runtime.
struct GroupLink<'c> {
    parts: LinkParts,
    control: &'c Control,
    /// A member of the group, not the task's holder.
    member: bool,
}

impl Membership for GroupLink<'_> {
    fn join(&mut self, failed: u64) -> Result<Joined> {
        let req = pb::JoinGroupRequest {
            session_id: self.parts.session.clone(),
            job_id: self.parts.job.clone(),
            failed_generation: failed,
        };
        loop {
            if self.control.stop.load(Ordering::Relaxed) {
                return Err(Error::Stopped);
            }
            let mut ep = self.parts.endpoints.clone();
            let r = self.parts.handle.block_on(ep.call(|ch, token| {
                let req = authed(req.clone(), token);
                async move { WorkerServiceClient::new(ch).join_group(req).await }
            }));
            match r {
                Ok(j) if j.retry_after_ms > 0 => {
                    std::thread::sleep(Duration::from_millis(j.retry_after_ms.min(2000)));
                }
                Ok(j) => {
                    tracing::info!(
                        generation = j.generation,
                        rank = j.rank,
                        world = j.world_size,
                        "joined the training group"
                    );
                    return Ok(Joined {
                        generation: j.generation,
                        rank: j.rank,
                        world: j.world_size,
                        peers: j.peers,
                        checkpoint: (!j.checkpoint_uri.is_empty())
                            .then(|| (PathBuf::from(j.checkpoint_uri), j.checkpoint_step)),
                    });
                }
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    return Err(Error::Invalid(format!(
                        "the coordinator refused the join: {}",
                        s.message()
                    )));
                }
                Err(s) => {
                    tracing::warn!(error = %s, "cannot join the training group; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
        }
    }

    fn committer(&self, generation: u64, total_steps: u64) -> Committer {
        let (handle, endpoints) = (self.parts.handle.clone(), self.parts.endpoints.clone());
        let (session, job) = (self.parts.session.clone(), self.parts.job.clone());
        let endpoints = Mutex::new(endpoints);
        Box::new(move |dir: &Path, step: u64| {
            // The state file's checksum, recorded (and verified) when the
            // checkpoint was written.
            let meta = dir.join("meta.json");
            let text = std::fs::read_to_string(&meta).map_err(|e| Error::io(&meta, e))?;
            let sha = serde_json::from_str::<serde_json::Value>(&text)
                .ok()
                .and_then(|v| v["sha256"].as_str().map(String::from))
                .ok_or_else(|| Error::Invalid(format!("{}: no sha256", meta.display())))?;
            let req = pb::CommitCheckpointRequest {
                session_id: session.clone(),
                job_id: job.clone(),
                generation,
                step,
                checkpoint_uri: dir.display().to_string(),
                sha256: sha,
                total_steps,
            };
            let mut ep = endpoints
                .lock()
                .map_err(|_| Error::Invalid("poisoned".into()))?;
            let r = handle.block_on(ep.call(|ch, token| {
                let req = authed(req.clone(), token);
                async move { WorkerServiceClient::new(ch).commit_checkpoint(req).await }
            }));
            match r {
                Ok(_) => {
                    tracing::info!(step, generation, "checkpoint committed");
                    Ok(())
                }
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {
                    tracing::info!(
                        step,
                        generation,
                        reason = s.message(),
                        "checkpoint commit refused: the group moved on"
                    );
                    Err(Error::Regroup)
                }
                Err(s) => {
                    // The previous committed checkpoint stays the fallback.
                    tracing::warn!(step, error = %s, "cannot commit the checkpoint");
                    Ok(())
                }
            }
        })
    }

    fn flag(&self) -> Arc<AtomicBool> {
        self.control.group_flag.clone()
    }

    fn set_group(&self, generation: u64, world: u32) {
        self.control.generation.store(generation, Ordering::Relaxed);
        self.control.world.store(world, Ordering::Relaxed);
    }

    fn bind_host(&self) -> String {
        self.parts.host.clone()
    }

    fn timeout(&self) -> Duration {
        self.parts.timeout
    }

    fn backend(&self) -> crate::collective::BackendChoice {
        self.parts.backend
    }

    fn job(&self) -> String {
        self.parts.job.clone()
    }

    fn exports(&self) -> bool {
        !self.member
    }
}

/// A running task's progress as the heartbeat reports it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub stage: String,
    pub steps_done: u64,
    pub steps_total: u64,
    pub loss: f64,
    pub steps_per_second: f64,
    pub samples_per_second: f64,
    /// The latest step's loss terms by name.
    pub loss_terms: Vec<(String, f64)>,
}

/// A leased task with its parsed spec.
pub struct Work {
    pub task: pb::Task,
    pub spec: JobSpec,
    pub control: Arc<Control>,
    pub reply: oneshot::Sender<Result<pb::TaskSuccess>>,
    /// For a training task: its link to the coordinator's group calls.
    pub link: Option<LinkParts>,
}

/// The handle of the executor thread.
pub struct Executor {
    tx: std::sync::mpsc::Sender<Work>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Executor {
    /// Starts the thread; libtorch uses `threads` intra-op threads when set.
    pub fn spawn(
        device: Device,
        threads: Option<i32>,
        teachers: crate::teachers::TeacherCache,
    ) -> std::io::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<Work>();
        let thread = std::thread::Builder::new()
            .name("distill-libtorch".into())
            .spawn(move || {
                if let Some(t) = threads {
                    tch::set_num_threads(t);
                }
                let mut cache = None;
                for mut w in rx {
                    let link = w.link.take();
                    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        execute(
                            &mut cache, &w.task, &w.spec, &w.control, device, link, &teachers,
                        )
                    }))
                    .unwrap_or_else(|p| {
                        let what = p
                            .downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "a panic".into());
                        cache = None;
                        Err(Error::Invalid(format!("the task panicked: {what}")))
                    });
                    let _ = w.reply.send(result);
                }
            })?;
        Ok(Self {
            tx,
            thread: Some(thread),
        })
    }

    /// Queues `work`; its result arrives on `work.reply`.
    pub fn submit(&self, work: Work) -> Result<()> {
        self.tx
            .send(work)
            .map_err(|_| Error::Invalid("the libtorch thread is gone".into()))
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        // Closing the channel ends the thread after its current task.
        let (tx, _) = std::sync::mpsc::channel();
        drop(std::mem::replace(&mut self.tx, tx));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What a worker keeps between teacher-signal tasks of one job: the data
/// read and tokenized once, the teacher loaded once.
struct JobCache {
    job_id: String,
    spec_json: String,
    prepared: Prepared,
    examples: Vec<Encoded>,
    teacher: TaskModel,
    id: TeacherId,
}

fn execute(
    cache: &mut Option<JobCache>,
    task: &pb::Task,
    spec: &JobSpec,
    control: &Control,
    device: Device,
    link: Option<LinkParts>,
    teachers: &crate::teachers::TeacherCache,
) -> Result<pb::TaskSuccess> {
    let r = task.r#ref.clone().unwrap_or_default();
    if task.artifact_root.is_empty() {
        return Err(Error::Invalid("lease has no artifact_root".into()));
    }
    let root = PathBuf::from(&task.artifact_root);
    let job_dir = match task.job_dir.as_str() {
        "" => root.join("jobs").join(&r.job_id),
        d => PathBuf::from(d),
    };
    std::fs::create_dir_all(&job_dir).map_err(|e| Error::io(&job_dir, e))?;
    let kind = pb::TaskKind::try_from(task.kind).unwrap_or(pb::TaskKind::Unspecified);
    let teachers = teachers.dir(&root);
    let teachers = teachers.as_deref();
    let started = Instant::now();
    let result = match kind {
        pb::TaskKind::TeacherSignal => teacher_signal(cache, task, spec, &job_dir, device),
        pb::TaskKind::Train => {
            *cache = None; // training needs the memory
            train(
                spec,
                &root,
                &job_dir,
                control,
                device,
                link,
                task.member,
                teachers,
            )
        }
        pb::TaskKind::FineTuneTeacher => {
            *cache = None;
            fine_tune_teacher(spec, &job_dir, control, device, teachers)
        }
        pb::TaskKind::Evaluate => evaluate(spec, &job_dir, control, device),
        pb::TaskKind::Unspecified => Err(Error::Invalid(format!(
            "task {} has an unknown kind {}; this worker is older than the coordinator",
            r.task_id, task.kind
        ))),
    };
    tracing::info!(
        job = r.job_id,
        task = r.task_id,
        attempt = r.attempt,
        kind = kind.as_str_name(),
        seconds = started.elapsed().as_secs_f64(),
        ok = result.is_ok(),
        "task finished"
    );
    result
}

fn teacher_signal(
    cache: &mut Option<JobCache>,
    task: &pb::Task,
    spec: &JobSpec,
    job_dir: &Path,
    device: Device,
) -> Result<pb::TaskSuccess> {
    let r = task.r#ref.clone().unwrap_or_default();
    let fresh = !matches!(cache, Some(c) if c.job_id == r.job_id && c.spec_json == task.spec_json);
    if fresh {
        *cache = None;
        let prepared = pipeline::prepare(spec)?;
        // A teacher fine-tuned in the job was committed by its own task
        // before any shard was created: it is read from the job's
        // directory (never trained here).
        let teacher_dir = pipeline::served_teacher_dir(spec, &prepared, job_dir)?;
        let teacher = pipeline::load_fine_tuned_teacher(spec, &prepared, job_dir, device)?;
        let id = TeacherId::of(&teacher_dir)?;
        let (examples, _) = prepared.training();
        *cache = Some(JobCache {
            job_id: r.job_id.clone(),
            spec_json: task.spec_json.clone(),
            prepared,
            examples,
            teacher,
            id,
        });
    }
    let c = cache.as_ref().expect("filled above");
    let (start, end) = (task.shard_start as usize, task.shard_end as usize);
    if start >= end || end > c.examples.len() {
        return Err(Error::Invalid(format!(
            "shard [{start}, {end}) is outside the job's {} training examples (did the data change after planning?)",
            c.examples.len()
        )));
    }
    let sspec = pipeline::shard_spec(&c.prepared, &c.id, start, end);
    let store = Artifacts::open(&signal_root(&task.artifact_root))?;
    let (mkey, manifest, reused) =
        match signal::read_shard_with_manifest(&store, &sspec, &c.examples)? {
            Some((_, bytes)) => {
                let mkey = signal::shard_object(&sspec.key(&c.examples), "manifest.json");
                (mkey, bytes, true)
            }
            None => {
                let t0 = Instant::now();
                let t = infer(
                    &c.teacher,
                    &c.prepared.tok,
                    &c.examples[start..end],
                    InferOptions::default(),
                    |_, _| {},
                )?;
                let (mkey, bytes) = signal::write_shard(&store, &sspec, &c.examples, &t)?;
                pipeline::record_shard(job_dir, start, t0.elapsed().as_secs_f64())?;
                (mkey, bytes, false)
            }
        };
    eprintln!(
        "teacher signal: examples [{start}, {end}) of {} {}",
        c.examples.len(),
        if reused {
            "reused (already stored)"
        } else {
            "computed"
        }
    );
    Ok(pb::TaskSuccess {
        manifest_sha256: signal::sha256_bytes(&manifest),
        manifest_uri: store.uri(&mkey),
        samples: (end - start) as u64,
        reused,
        outputs: vec![],
    })
}

/// Where a cluster's teacher-signal shards live under its artifact root.
fn signal_root(artifact_root: &str) -> String {
    format!("{}/signal", artifact_root.trim_end_matches('/'))
}

/// Records each step's progress for the heartbeat: the rate over the
/// last 20 steps (or fewer), in steps and in samples (the spec's global
/// batch per step).
fn progress_hook<'c>(
    control: &'c Control,
    spec: &JobSpec,
) -> impl FnMut(&str, &crate::distill::train::StepLog, u64) + 'c {
    let per_step = (spec.training.batch_size * spec.training.grad_accum) as u64;
    let mut window: std::collections::VecDeque<(Instant, u64)> = Default::default();
    move |stage, log, total| {
        let now = Instant::now();
        // A new stage, or a step back (a group re-formed): a new window.
        if window.back().is_some_and(|&(_, s)| s >= log.step) {
            window.clear();
        }
        window.push_back((now, log.step));
        if window.len() > 20 {
            window.pop_front();
        }
        let rate = match (window.front(), window.back()) {
            (Some(&(t0, s0)), Some(&(t1, s1))) if s1 > s0 => {
                (s1 - s0) as f64 / (t1 - t0).as_secs_f64().max(1e-9)
            }
            _ => 0.0,
        };
        let names = ["task", "kd", "attention", "hidden", "embedding"];
        if let Ok(mut p) = control.progress.lock() {
            *p = Some(Progress {
                stage: stage.to_string(),
                steps_done: log.step + 1,
                steps_total: total,
                loss: log.loss,
                steps_per_second: rate,
                samples_per_second: rate * per_step as f64,
                loss_terms: names
                    .iter()
                    .zip(log.terms)
                    .filter_map(|(n, v)| v.map(|v| (n.to_string(), v)))
                    .collect(),
            });
        }
    }
}

/// The job's teacher fine-tuned on its labelled data (offline teacher
/// signal: before the shards; an online job fine-tunes in its training
/// task). Reports the teacher's weights.
fn fine_tune_teacher(
    spec: &JobSpec,
    job_dir: &Path,
    control: &Control,
    device: Device,
    teachers: Option<&Path>,
) -> Result<pb::TaskSuccess> {
    let t0 = Instant::now();
    let p = pipeline::prepare(spec)?;
    let mut progress = progress_hook(control, spec);
    let mut hooks = Hooks {
        stop: Some(control.stop.clone()),
        progress: Some(&mut progress),
    };
    pipeline::teacher(spec, &p, job_dir, device, &mut hooks, teachers)?;
    pipeline::record_stage(job_dir, "teacher", t0.elapsed().as_secs_f64())?;
    let dir = pipeline::served_teacher_dir(spec, &p, job_dir)?;
    let weights = dir.join("model.safetensors");
    Ok(pb::TaskSuccess {
        manifest_sha256: signal::sha256_path(&weights)?,
        manifest_uri: weights.display().to_string(),
        samples: 0,
        reused: false,
        outputs: vec![],
    })
}

fn train(
    spec: &JobSpec,
    root: &Path,
    job_dir: &Path,
    control: &Control,
    device: Device,
    link: Option<LinkParts>,
    member: bool,
    teachers: Option<&Path>,
) -> Result<pb::TaskSuccess> {
    let t0 = Instant::now();
    let p = pipeline::prepare(spec)?;
    if !member {
        pipeline::record_stage(job_dir, "prepare", t0.elapsed().as_secs_f64())?;
    }
    let mut progress = progress_hook(control, spec);
    let mut hooks = Hooks {
        stop: Some(control.stop.clone()),
        progress: Some(&mut progress),
    };
    let online_fine_tune = spec.fine_tunes_in_training();
    let t0 = Instant::now();
    let teacher = if spec.teacher.fine_tune && !online_fine_tune {
        // Fine-tuned (and timed) by the job's first task.
        pipeline::load_fine_tuned_teacher(spec, &p, job_dir, device)?
    } else {
        let t = pipeline::teacher(spec, &p, job_dir, device, &mut hooks, teachers)?;
        if !member {
            pipeline::record_stage(job_dir, "teacher", t0.elapsed().as_secs_f64())?;
        }
        t
    };
    let t0 = Instant::now();
    let signal: Option<Tensor> = match spec.distill.teacher_signal {
        TeacherSignal::Offline => Some(pipeline::stored_signal(
            &p,
            &pipeline::served_teacher_dir(spec, &p, job_dir)?,
            &signal_root(&root.display().to_string()),
            spec.data.shard_size as usize,
        )?),
        TeacherSignal::Online => None,
    };
    // Data-parallel over the job's group, unless the teacher is fine-tuned
    // in this task (every member would write it).
    let mut link = link.filter(|_| !online_fine_tune).map(|parts| GroupLink {
        parts,
        control,
        member,
    });
    pipeline::distill_student_in(
        spec,
        &p,
        &teacher,
        signal,
        job_dir,
        device,
        &mut hooks,
        link.as_mut().map(|l| l as &mut dyn Membership),
    )?;
    if member {
        // The holder exports, trains the baseline and reports.
        return Ok(pb::TaskSuccess::default());
    }
    pipeline::record_stage(job_dir, "distillation", t0.elapsed().as_secs_f64())?;
    if spec.evaluation.baseline && p.task == crate::model::Task::Classification {
        let t0 = Instant::now();
        pipeline::baseline(spec, &p, &teacher, job_dir, device, &mut hooks)?;
        pipeline::record_stage(job_dir, "labels-only baseline", t0.elapsed().as_secs_f64())?;
    }
    let student = job_dir.join("student");
    let weights = student.join("model.safetensors");
    Ok(pb::TaskSuccess {
        manifest_sha256: signal::sha256_path(&weights)?,
        manifest_uri: weights.display().to_string(),
        samples: 0,
        reused: false,
        outputs: vec![student.display().to_string()],
    })
}

fn evaluate(
    spec: &JobSpec,
    job_dir: &Path,
    control: &Control,
    device: Device,
) -> Result<pb::TaskSuccess> {
    let started = Instant::now();
    if let Ok(mut p) = control.progress.lock() {
        *p = Some(Progress {
            stage: "evaluating".into(),
            ..Progress::default()
        });
    }
    let p = pipeline::prepare(spec)?;
    // Fine-tuned by then: only loaded.
    let teacher = pipeline::teacher(spec, &p, job_dir, device, &mut Hooks::default(), None)?;
    let student_dir = job_dir.join("student");
    let student = TaskModel::load(
        &student_dir,
        p.task,
        (!p.labels.is_empty()).then(|| p.labels.clone()),
        device,
    )?;
    if control.stop.load(Ordering::Relaxed) {
        return Err(Error::Stopped);
    }
    let stages = pipeline::recorded_stages(job_dir);
    // The report's total: the stages recorded before, and this one.
    let before: f64 = stages.iter().map(|(_, s)| s).sum();
    let since = started
        .checked_sub(Duration::from_secs_f64(before))
        .unwrap_or(started);
    let baseline = if spec.evaluation.baseline {
        pipeline::stored_baseline(job_dir)?
    } else {
        None
    };
    let r = pipeline::evaluate(
        spec, &p, &teacher, &student, baseline, job_dir, since, &stages,
    )?;
    let report = job_dir.join("report.json");
    let mut outputs = vec![
        report.display().to_string(),
        job_dir.join("report.md").display().to_string(),
    ];
    outputs.extend(
        r.plots
            .iter()
            .map(|p| job_dir.join(p).display().to_string()),
    );
    outputs.extend(r.chosen_dir.iter().map(|d| d.display().to_string()));
    Ok(pb::TaskSuccess {
        manifest_sha256: signal::sha256_path(&report)?,
        manifest_uri: report.display().to_string(),
        samples: 0,
        reused: false,
        outputs,
    })
}

/// Whether a retry (here or on another worker) could fix `e`.
pub fn retryable(e: &Error) -> bool {
    matches!(e, Error::Io { .. } | Error::Torch(_))
}
