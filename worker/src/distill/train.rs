//! The training loop: online distillation (teacher forward on the same batch)
//! or plain supervised training (no teacher: teacher fine-tuning and the
//! labels-only baseline), with exact resume.
//!
//! Determinism: the sample order of epoch `e` is a Fisher–Yates shuffle
//! seeded by `(seed, e)`; step `s` consumes stream positions
//! `[s·B·A, (s+1)·B·A)` (B batch, A accumulation), so the data cursor *is*
//! the step. libtorch's RNG (dropout) is reseeded from `(seed, step)` at the
//! start of every step. A checkpoint holds the student, the projections, the
//! AdamW moments and step count, and the balancer; with those, N steps +
//! resume + M steps gives bitwise the same weights as N+M steps on CPU.
//!
//! A non-finite loss or gradient skips the step; `max_bad_steps` in a row
//! roll back to the last checkpoint with a logged reason.

use super::adamw::{accumulate, clip_grad_norm, grad_norm, gradients, AdamW};
use super::checkpoint::{self, CheckpointMeta};
use super::loss;
use super::schedule::{
    auto_features_for_width, is_probe_step, learning_rate, temperature, Balancer, Decay, Term,
    TermWeight, TERMS,
};
use crate::autocast::{self, Reduced};
use crate::collective::{Group, Reducer};
use crate::infer::{infer, InferOptions};
use crate::model::{ModelOutput, Outputs, Task, TaskModel};
use crate::tokenize::{Encoded, Padding, TextTokenizer};
use crate::{Error, Result};
use std::path::PathBuf;
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

#[derive(Debug, Clone)]
pub struct TrainConfig {
    pub total_steps: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub learning_rate: f64,
    pub warmup_steps: u64,
    pub decay: Decay,
    pub weight_decay: f64,
    pub grad_clip: f64,
    pub seed: u64,
    /// 0 = never.
    pub eval_every: u64,
    /// 0 = only at the end.
    pub checkpoint_every: u64,
    /// Weights by `Term as usize`. Ignored (treated as 0) when there is no teacher,
    /// except the task term.
    pub weights: [TermWeight; 5],
    pub temperature: (f64, f64),
    /// Student layer i ↔ teacher layer `layer_map[i]`.
    pub layer_map: Vec<i64>,
    pub max_bad_steps: u32,
    /// Mixed precision for the forward passes (`None`: fp32 throughout).
    pub precision: Option<Reduced>,
}

/// Rows `[from, n)` of the training data drawn as a second stream: every
/// micro-batch takes `batch_size` rows of `[0, from)` in their epoch order
/// and `per_micro` of `[from, n)` in theirs (its own shuffle, seeded from
/// the same seed), so a step's rows are still a function of the step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SideRows {
    pub from: usize,
    pub per_micro: usize,
}

/// What seeds the side stream's shuffles apart from the main one's.
const SIDE_SEED: u64 = 0x5349_4445_524f_5753;

/// The side rows of micro-batch `micro` of step `step` (`accum`
/// micro-batches a step) over `n_all` rows: `side.per_micro` consecutive
/// positions of the side stream, whose epoch `e` is the rows
/// `[side.from, n_all)` in the order `epoch_order(.., seed ^ SIDE_SEED, e)`.
/// Empty when there are no side rows.
pub fn side_rows(
    seed: u64,
    side: SideRows,
    n_all: usize,
    step: u64,
    accum: usize,
    micro: usize,
) -> Vec<usize> {
    let m = n_all.saturating_sub(side.from) as u64;
    if m == 0 {
        return vec![];
    }
    let per = side.per_micro as u64;
    let first = (step * accum as u64 + micro as u64) * per;
    let mut order: Option<(u64, Vec<usize>)> = None;
    (first..first + per)
        .map(|pos| {
            let epoch = pos / m;
            if order.as_ref().map(|(e, _)| *e) != Some(epoch) {
                order = Some((epoch, epoch_order(m as usize, seed ^ SIDE_SEED, epoch)));
            }
            side.from + order.as_ref().unwrap().1[(pos % m) as usize]
        })
        .collect()
}

/// Tokenized examples with label ids (`loss::IGNORE_LABEL` = unlabelled).
pub struct TrainData {
    pub examples: Vec<Encoded>,
    pub labels: Vec<i64>,
    /// Offline teacher signal: row `i` is the teacher's logits (or
    /// embedding) for example `i`. Output-level terms (KD, embedding) use it
    /// instead of running the teacher; intermediate terms need the teacher online.
    pub teacher_output: Option<Tensor>,
}

/// One step's record, for logs and tests.
#[derive(Debug, Clone)]
pub struct StepLog {
    pub step: u64,
    pub loss: f64,
    pub terms: [Option<f64>; 5],
    pub lr: f64,
    pub temperature: f64,
    pub skipped: bool,
}

pub struct Trainer<'a> {
    pub student: &'a mut TaskModel,
    teacher: Option<&'a TaskModel>,
    aux: nn::VarStore,
    proj_hidden: Option<nn::Linear>,
    proj_embedding: Option<nn::Linear>,
    params: Vec<(String, Tensor)>,
    pub opt: AdamW,
    pub balancer: Balancer,
    pub step: u64,
    pub best_metric: Option<f64>,
    pub best_step: Option<u64>,
    pub cfg: TrainConfig,
    pub checkpoint_dir: PathBuf,
    /// Written into each checkpoint; a checkpoint with another is refused.
    fingerprint: Option<String>,
    tok: &'a TextTokenizer,
    order_cache: Option<(u64, Vec<usize>)>,
    /// `[data.augment] per_batch` (see [`Trainer::set_side`]).
    side: Option<SideRows>,
    /// Output-level teacher signal is precomputed (see `TrainData::teacher_output`).
    offline: bool,
    /// When set, training checkpoints and stops at the next step boundary
    /// ([`Error::Stopped`]).
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Sums the gradients of every parameter but the word embedding while
    /// backward runs (Gloo groups on CPU tensors), with the indices in
    /// `params` of what it hooks, in its order. Dropped before `dp`.
    reducer: Option<(Reducer, Vec<usize>)>,
    /// Whether `data_parallel` makes a reducer where it can (see
    /// `sum_after_backward`).
    overlap: bool,
    /// Data-parallel membership (`data_parallel`): this rank trains on its
    /// slice of every micro-batch and gradients are summed over the group.
    dp: Option<Group>,
    /// When set, training stops at the next step boundary with
    /// [`Error::Regroup`] (the coordinator changed the training group).
    regroup: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Called after each checkpoint is written.
    #[allow(clippy::type_complexity)]
    on_checkpoint: Option<Box<dyn Fn(&std::path::Path, u64) -> Result<()> + 'a>>,
    /// Index in `params` of the word-embedding table, whose gradient is
    /// reduced on the rows the global batch touches only.
    word_param: Option<usize>,
    /// Indices in `params` of what the all-reduce after backward carries
    /// (every parameter the reducer does not hook), in order: the same
    /// on every rank, each with a "had a gradient" flag, so a rank without
    /// a gradient for one sends zeros rather than a shorter buffer.
    tail: Vec<usize>,
}

/// Splits a micro-batch (`all`, example indices) among `world` ranks:
/// each rank takes a contiguous run of the rows sorted by length, longest
/// first, so that a rank pads its rows to little more than their own
/// length; the runs are chosen to minimise the largest padded cost (rows ×
/// longest row), the rank that decides a step's time. Ranks get at least
/// one row each while there are enough. A pure function of its inputs:
/// every rank computes the same split.
pub fn split_by_length(
    all: &[usize],
    len: impl Fn(usize) -> usize,
    world: usize,
) -> Vec<Vec<usize>> {
    let mut sorted: Vec<(usize, usize)> = all.iter().enumerate().map(|(j, &i)| (j, i)).collect();
    // Longest first; ties in batch order.
    sorted.sort_by_key(|&(j, i)| (std::cmp::Reverse(len(i)), j));
    let n = sorted.len();
    let lens: Vec<usize> = sorted.iter().map(|&(_, i)| len(i)).collect();
    // Rows for the first `k` ranks; any further rank gets none.
    let k = world.max(1).min(n);
    // best[j][e]: the least largest cost of cutting sorted[..e] into j
    // non-empty runs; cut[j][e]: where the last of them starts.
    let inf = usize::MAX;
    let mut best = vec![vec![inf; n + 1]; k + 1];
    let mut cut = vec![vec![0usize; n + 1]; k + 1];
    best[0][0] = 0;
    for j in 1..=k {
        for e in j..=n {
            for b in (j - 1)..e {
                if best[j - 1][b] == inf {
                    continue;
                }
                let c = best[j - 1][b].max((e - b) * lens[b]);
                if c < best[j][e] {
                    best[j][e] = c;
                    cut[j][e] = b;
                }
            }
        }
    }
    let mut parts = vec![vec![]; world.max(1)];
    let mut e = n;
    for j in (1..=k).rev() {
        let b = cut[j][e];
        let mut run: Vec<(usize, usize)> = sorted[b..e].to_vec();
        run.sort_unstable();
        parts[j - 1] = run.into_iter().map(|(_, i)| i).collect();
        e = b;
    }
    parts
}

/// A rank's exact share of each loss term over the micro-batch `all`, by
/// what the term averages over (see `loss.rs`): labelled rows (task),
/// rows (KD, embedding), real tokens (hidden), real query × key pairs
/// (attention). Weighting each term by it makes the group's sum the whole
/// micro-batch's term, however unevenly rows, labels and lengths split.
pub fn term_shares(mine: &[usize], all: &[usize], data: &TrainData) -> [f64; 5] {
    let measure = |idx: &[usize]| {
        let mut m = [0f64; 4];
        for &i in idx {
            let l = data.examples[i].ids.len() as f64;
            m[0] += (data.labels[i] != loss::IGNORE_LABEL) as u8 as f64;
            m[1] += 1.0;
            m[2] += l;
            m[3] += l * l;
        }
        m
    };
    let (a, b) = (measure(mine), measure(all));
    let share = |k: usize| if b[k] > 0.0 { a[k] / b[k] } else { 0.0 };
    let mut s = [0f64; 5];
    s[Term::Task as usize] = share(0);
    s[Term::Kd as usize] = share(1);
    s[Term::Embedding as usize] = share(1);
    s[Term::Hidden as usize] = share(2);
    s[Term::Attention as usize] = share(3);
    s
}

/// Gradient buckets of at most this many fp32 elements (16 MiB) per
/// all-reduce. Part of the collective protocol
/// (`distill_proto::COLLECTIVE_PROTOCOL`): every rank must cut the same.
const BUCKET: i64 = 4 << 20;

/// Buckets of the overlapping [`Reducer`]: about this many fp32 elements
/// (4 MiB) each. Part of the collective protocol, like `BUCKET`.
const OVERLAP_BUCKET: i64 = 1 << 20;

fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The deterministic sample order of one epoch.
pub fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut s = seed ^ epoch.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    for i in (1..n).rev() {
        let j = (splitmix(&mut s) % (i as u64 + 1)) as usize;
        order.swap(i, j);
    }
    order
}

impl<'a> Trainer<'a> {
    /// `teacher`: the online teacher, if any. `offline_width`: the width of a
    /// precomputed teacher signal (`TrainData::teacher_output`), if used instead.
    pub fn new(
        student: &'a mut TaskModel,
        teacher: Option<&'a TaskModel>,
        offline_width: Option<i64>,
        tok: &'a TextTokenizer,
        mut cfg: TrainConfig,
        checkpoint_dir: PathBuf,
    ) -> Result<Self> {
        if cfg.batch_size == 0 || cfg.grad_accum == 0 {
            return Err(Error::Invalid(
                "batch_size and grad_accum must be positive".into(),
            ));
        }
        if let Some(t) = teacher {
            if t.task != student.task {
                return Err(Error::Invalid(
                    "teacher and student must have the same task".into(),
                ));
            }
            if cfg.layer_map.len() as i64 != student.config().num_hidden_layers {
                return Err(Error::Invalid(format!(
                    "layer map has {} entries for {} student layers",
                    cfg.layer_map.len(),
                    student.config().num_hidden_layers
                )));
            }
            if cfg
                .layer_map
                .iter()
                .any(|&l| l < 0 || l >= t.config().num_hidden_layers)
            {
                return Err(Error::Invalid(
                    "layer map points outside the teacher's layers".into(),
                ));
            }
        }
        let aux = nn::VarStore::new(student.device());
        let offline = teacher.is_none() && offline_width.is_some();
        let hs = student.config().hidden_size;
        let ht = teacher
            .map(|t| t.config().hidden_size)
            .or(offline_width)
            .unwrap_or(hs);
        if let Some(t) = teacher {
            let (weights, off) = auto_features_for_width(cfg.weights, hs, t.config().hidden_size);
            if !off.is_empty() {
                tracing::info!(
                    student_hidden = hs,
                    teacher_hidden = t.config().hidden_size,
                    terms = ?off.iter().map(|t| t.name()).collect::<Vec<_>>(),
                    "\"auto\" feature terms off: the student is narrower than the teacher (set a number to keep them)"
                );
            }
            cfg.weights = weights;
        }
        let on = |t: Term| cfg.weights[t as usize] != TermWeight::Fixed(0.0);
        // Each projection from a generator of its own, seeded by the job
        // seed and its name (libtorch's default linear init): never from
        // the process-wide generator, which the other ranks of a
        // `distill run --workers N` reseed and draw from at the same time.
        let seeded_linear = |name: &str| -> Result<nn::Linear> {
            let mut lin = nn::linear(aux.root() / name, hs, ht, Default::default());
            crate::rng::init_linear(
                &mut lin,
                crate::model::name_seed(cfg.seed, &format!("aux.{name}")),
            )?;
            Ok(lin)
        };
        let proj_hidden = (teacher.is_some() && on(Term::Hidden) && hs != ht)
            .then(|| seeded_linear("proj_hidden"))
            .transpose()?;
        let proj_embedding = ((teacher.is_some() || offline)
            && on(Term::Embedding)
            && student.task == Task::Embedding
            && hs != ht)
            .then(|| seeded_linear("proj_embedding"))
            .transpose()?;
        let mut params: Vec<(String, Tensor)> = student
            .vs
            .variables()
            .into_iter()
            .map(|(n, t)| (format!("student.{n}"), t))
            .collect();
        params.extend(
            aux.variables()
                .into_iter()
                .map(|(n, t)| (format!("aux.{n}"), t)),
        );
        params.sort_by(|a, b| a.0.cmp(&b.0));
        let opt = AdamW::new(&params, cfg.weight_decay);
        Ok(Trainer {
            student,
            teacher,
            aux,
            proj_hidden,
            proj_embedding,
            params,
            opt,
            balancer: Balancer::default(),
            step: 0,
            best_metric: None,
            best_step: None,
            cfg,
            checkpoint_dir,
            fingerprint: None,
            tok,
            order_cache: None,
            side: None,
            offline,
            stop: None,
            reducer: None,
            overlap: true,
            dp: None,
            regroup: None,
            on_checkpoint: None,
            word_param: None,
            tail: vec![],
        })
    }

    /// Trains as one rank of `group`: every micro-batch of the global
    /// order is split by length (`split_by_length`), each rank's loss
    /// terms are weighted by its exact share of what they average over,
    /// and the gradients, the logged loss terms and the non-finite check
    /// are summed over the group every step. On a Gloo group with CPU
    /// tensors the gradients are summed while backward runs (a
    /// [`Reducer`]: buckets of `OVERLAP_BUCKET` elements issued from
    /// gradient hooks), then the rest in one more all-reduce; otherwise
    /// all of it after backward, in buckets of 16 MiB. Every rank
    /// then holds the same sum, so clipping on the global norm, the NaN
    /// skip, the "auto" balancer and the optimizer step are identical on
    /// every rank and the ranks never drift. The global batch is the same
    /// for any world size; `batch_size` must be at least the world size.
    ///
    /// The word-embedding gradient is reduced only on the rows that the
    /// global batch's tokens touch (every rank computes that set from the
    /// deterministic global order, with no communication): the rest of the
    /// table's gradient is zero on every rank. For a MiniLM-shaped student
    /// that is 68 % of the gradient bytes cut to a few percent of them.
    ///
    /// Losses that are means over examples (task CE on labelled rows, KD,
    /// embedding) give the single-process gradient exactly up to fp32
    /// reduction order; the attention and hidden-state terms are means over
    /// each rank's tokens, as in PyTorch DDP. Only rank 0 evaluates and
    /// writes checkpoints.
    pub fn data_parallel(&mut self, group: Group) -> Result<()> {
        if self.cfg.batch_size < group.world as usize {
            return Err(Error::Invalid(format!(
                "training.batch_size: {} is smaller than the {} ranks it is split over",
                self.cfg.batch_size, group.world
            )));
        }
        self.word_param = self
            .params
            .iter()
            .position(|(n, _)| n == "student.embeddings.word_embeddings.weight");
        self.reducer = None;
        if self.overlap
            && group.backend == crate::collective::Backend::Gloo
            && self.device() == tch::Device::Cpu
        {
            // The gradients that backward computes last (the first layers')
            // come last: `params` is sorted by name, and the names of later
            // layers sort after earlier ones'.
            let hooked: Vec<usize> = (0..self.params.len())
                .rev()
                .filter(|&i| Some(i) != self.word_param && self.params[i].1.requires_grad())
                .collect();
            let ts: Vec<&Tensor> = hooked.iter().map(|&i| &self.params[i].1).collect();
            let reducer = Reducer::new(&group, &ts, OVERLAP_BUCKET)?;
            self.reducer = Some((reducer, hooked));
        }
        let hooked = self.reducer.as_ref().map_or(&[][..], |(_, h)| h.as_slice());
        self.tail = (0..self.params.len())
            .filter(|i| !hooked.contains(i))
            .collect();
        self.dp = Some(group);
        Ok(())
    }

    /// For benchmarks: the next `data_parallel` sums every gradient after
    /// backward, as on NCCL, instead of while backward runs. Every rank of
    /// the group must make the same choice (it changes the collectives a
    /// step issues); the cluster and `distill run` never call this.
    pub fn sum_after_backward(&mut self) {
        self.overlap = false;
    }

    /// The device the student trains on.
    pub fn device(&self) -> tch::Device {
        self.student.device()
    }

    /// `(rank, world)`: `(0, 1)` unless data-parallel.
    pub fn rank_world(&self) -> (usize, usize) {
        self.dp
            .as_ref()
            .map_or((0, 1), |g| (g.rank as usize, g.world as usize))
    }

    /// Leaves the data-parallel group (if any) and returns it.
    pub fn leave_group(&mut self) -> Option<Group> {
        // The reducer first: the group then holds the last reference to
        // its process group, and a failed one is freed off this thread.
        self.reducer = None;
        self.dp.take()
    }

    /// Stop with [`Error::Regroup`] at the next step boundary once `flag`
    /// is set.
    pub fn regroup_on(&mut self, flag: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>) {
        self.regroup = flag;
    }

    /// Every tensor of the training state, by checkpoint name: the
    /// parameters (student and projections) and AdamW's moments.
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut tensors: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, t)| (n.clone(), t.shallow_clone()))
            .collect();
        tensors.extend(
            self.opt
                .m
                .iter()
                .map(|(n, t)| (format!("adam_m.{n}"), t.shallow_clone())),
        );
        tensors.extend(
            self.opt
                .v
                .iter()
                .map(|(n, t)| (format!("adam_v.{n}"), t.shallow_clone())),
        );
        tensors
    }

    /// sha256 of the whole training state: every state tensor's bytes in
    /// name order, then the step, AdamW's count, the balancer and the best
    /// metric. Equal digests mean bitwise-equal states.
    pub fn state_digest(&self) -> Result<[u8; 32]> {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (name, t) in self.state_tensors() {
            h.update(name.as_bytes());
            let t = t.to_device(tch::Device::Cpu).contiguous();
            let mut buf = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
            t.copy_data_u8(&mut buf, t.numel());
            h.update(&buf);
        }
        h.update(serde_json::to_vec(&self.meta()).map_err(|e| Error::Invalid(e.to_string()))?);
        Ok(h.finalize().into())
    }

    /// Makes every rank of the group hold the same training state, after a
    /// group (re-)formed: the ranks exchange their step and state digest;
    /// the source is the lowest rank among those furthest on. Ranks whose
    /// digest differs from the source's (a new member, or one that missed
    /// the last step) receive the source's state by broadcast. Returns
    /// `(source rank, its step, ranks that received the state)`.
    pub fn sync_state(&mut self) -> Result<(u32, u64, u32)> {
        let Some(g) = self.dp.as_ref() else {
            return Ok((0, self.step, 0));
        };
        let (rank, world) = (g.rank as usize, g.world as usize);
        let _ng = tch::no_grad_guard();
        let mut steps = Tensor::zeros([world as i64], (Kind::Int64, tch::Device::Cpu));
        let _ = steps.get(rank as i64).fill_(self.step as i64);
        g.all_reduce_sum(&mut steps)?;
        let steps = Vec::<i64>::try_from(&steps).map_err(|e| Error::Collective(e.to_string()))?;
        let best = *steps.iter().max().unwrap_or(&0);
        let src = steps.iter().position(|&s| s == best).unwrap_or(0) as u32;
        let mine = self.state_digest()?;
        let mut digest = Tensor::from_slice(&mine);
        g.broadcast(&mut digest, src)?;
        let differs =
            Vec::<u8>::try_from(&digest).map_err(|e| Error::Collective(e.to_string()))? != mine;
        let mut count = Tensor::from_slice(&[differs as i64]);
        g.all_reduce_sum(&mut count)?;
        let receivers = count.int64_value(&[0]) as u32;
        if receivers == 0 {
            return Ok((src, best as u64, 0));
        }
        // Everyone takes part in the broadcast (it is a collective); the
        // ranks that were equal receive what they already had.
        for (_, t) in self.state_tensors() {
            let mut cpu = t.to_device(tch::Device::Cpu).contiguous();
            g.broadcast(&mut cpu, src)?;
            if differs {
                t.shallow_clone().copy_(&cpu);
            }
        }
        let meta = serde_json::to_vec(&self.meta()).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut len = Tensor::from_slice(&[meta.len() as i64]);
        g.broadcast(&mut len, src)?;
        let mut bytes = Tensor::zeros([len.int64_value(&[0])], (Kind::Uint8, tch::Device::Cpu));
        if rank as u32 == src {
            bytes = Tensor::from_slice(&meta);
        }
        g.broadcast(&mut bytes, src)?;
        if differs {
            let bytes =
                Vec::<u8>::try_from(&bytes).map_err(|e| Error::Collective(e.to_string()))?;
            let meta: CheckpointMeta = serde_json::from_slice(&bytes)
                .map_err(|e| Error::Collective(format!("state from rank {src}: {e}")))?;
            self.apply_meta(meta);
        }
        Ok((src, best as u64, receivers))
    }

    fn apply_meta(&mut self, meta: CheckpointMeta) {
        self.step = meta.step;
        self.opt.t = meta.adam_t;
        self.balancer = meta.balancer;
        self.best_metric = meta.best_metric;
        self.best_step = meta.best_step;
        self.order_cache = None;
    }

    /// The sorted token ids of the examples `idx` (and the padding id).
    fn touched_rows(&self, idx: &[usize], data: &TrainData) -> Tensor {
        let mut ids: Vec<i64> = idx
            .iter()
            .flat_map(|&i| data.examples[i].ids.iter().copied())
            .collect();
        ids.push(self.tok.pad_id);
        ids.sort_unstable();
        ids.dedup();
        Tensor::from_slice(&ids).to_device(self.student.device())
    }

    /// Sums the gradients, the loss and the term values over the group.
    /// With a reducer, what it hooked was summed during backward (and is
    /// waited for here). The rest (`tail`) goes in one more all-reduce,
    /// with one "this rank had a gradient" flag per parameter, hooked or
    /// not, so that every rank agrees which of them have one. The layout
    /// does not depend on which gradients a rank has: a missing one is
    /// sent as zeros, and its flag says so.
    fn all_reduce(
        &mut self,
        grads: &mut [Tensor],
        loss: &mut f64,
        terms: &mut [Option<f64>; 5],
        grad_norms: &mut [Option<f64>; 5],
        rows: &Tensor,
        expected: &[bool],
    ) -> Result<()> {
        let _g = tch::no_grad_guard();
        let group = self.dp.as_ref().expect("all_reduce needs a group");
        let device = self.student.device();
        // The hooked parameters' gradients are the reducer's (their
        // entries in `grads` are undefined until filled in below).
        let hooked = match self.reducer.as_mut() {
            Some((reducer, hooked)) => {
                let (sums, defined) = reducer.finish(group)?;
                // A parameter tensor replaced rather than updated in place
                // would carry no hook, and its gradient would be lost.
                if let Some(k) =
                    (0..defined.len()).find(|&k| expected.get(k) == Some(&true) && !defined[k])
                {
                    return Err(Error::Invalid(format!(
                        "the gradient of {} never reached its all-reduce hook",
                        self.params[hooked[k]].0
                    )));
                }
                Some((sums.shallow_clone(), defined))
            }
            None => None,
        };
        // The length of parameter i's part: the touched rows of the word
        // embedding, all of any other.
        let part_len = |i: usize| {
            let p = &self.params[i].1;
            if Some(i) == self.word_param {
                rows.size()[0] * p.size()[1]
            } else {
                p.numel() as i64
            }
        };
        let mut parts = vec![];
        for &i in &self.tail {
            let g = &grads[i];
            parts.push(if !g.defined() {
                Tensor::zeros([part_len(i)], (Kind::Float, device))
            } else if Some(i) == self.word_param {
                g.index_select(0, rows).reshape([-1]).to_kind(Kind::Float)
            } else {
                g.reshape([-1]).to_kind(Kind::Float)
            });
        }
        let mut scalars = vec![*loss as f32];
        scalars.extend(terms.iter().map(|t| t.unwrap_or(0.0) as f32));
        // Gradient norms: each rank's norm of its share-weighted term, summed
        // (an upper bound on the global batch's norm; the same on every rank,
        // so every rank's balancer stays identical). Flagged by a count.
        scalars.extend(grad_norms.iter().map(|g| g.unwrap_or(0.0) as f32));
        scalars.extend(grad_norms.iter().map(|g| g.is_some() as u8 as f32));
        if let Some((_, defined)) = &hooked {
            scalars.extend(defined.iter().map(|&d| d as u8 as f32));
        }
        scalars.extend(self.tail.iter().map(|&i| grads[i].defined() as u8 as f32));
        let n_scalars = scalars.len() as i64;
        parts.push(Tensor::from_slice(&scalars).to_device(device));
        let flat = Tensor::cat(&parts, 0);
        let n = flat.size()[0];
        let mut off = 0;
        while off < n {
            let len = BUCKET.min(n - off);
            let mut bucket = flat.narrow(0, off, len);
            group.all_reduce_sum(&mut bucket)?;
            off += len;
        }
        let sums = Vec::<f32>::try_from(
            flat.narrow(0, n - n_scalars, n_scalars)
                .to_device(tch::Device::Cpu),
        )
        .map_err(|e| Error::Collective(e.to_string()))?;
        *loss = sums[0] as f64;
        // The scalars' layout: loss, 5 terms, 5 norms, 5 norm flags, then
        // the per-parameter flags.
        const TERMS_AT: usize = 1;
        const NORMS_AT: usize = TERMS_AT + 5;
        const NORM_FLAGS_AT: usize = NORMS_AT + 5;
        const FIXED: usize = NORM_FLAGS_AT + 5;
        for (t, v) in terms.iter_mut().zip(&sums[TERMS_AT..TERMS_AT + 5]) {
            if t.is_some() {
                *t = Some(*v as f64);
            }
        }
        for (k, g) in grad_norms.iter_mut().enumerate() {
            *g = (sums[NORM_FLAGS_AT + k] > 0.0).then_some(sums[NORMS_AT + k] as f64);
        }
        let n_hooked = hooked.as_ref().map_or(0, |(_, d)| d.len());
        let tail_flags = &sums[FIXED + n_hooked..];
        let mut off = 0;
        for (k, &i) in self.tail.iter().enumerate() {
            let len = part_len(i);
            let reduced = flat.narrow(0, off, len);
            off += len;
            if tail_flags[k] <= 0.0 {
                // No rank had a gradient: it stays undefined.
                grads[i] = Tensor::new();
                continue;
            }
            let p = &self.params[i].1;
            if Some(i) == self.word_param {
                let h = p.size()[1];
                let reduced = reduced.view([-1, h]).to_kind(p.kind());
                // This rank's gradient is zero outside the rows its own
                // examples touch, a subset of the group's `rows`: in place,
                // into zeros where this rank had none.
                if !grads[i].defined() {
                    grads[i] = p.zeros_like();
                }
                let _ = grads[i].index_copy_(0, rows, &reduced);
            } else {
                grads[i] = reduced.view(p.size().as_slice()).to_kind(p.kind());
            }
        }
        if let (Some((reduced, _)), Some((_, hooked))) = (hooked, self.reducer.as_ref()) {
            // Each hooked parameter's slot, in the reducer's order.
            let mut at = 0;
            for (k, &i) in hooked.iter().enumerate() {
                let p = &self.params[i].1;
                let len = p.numel() as i64;
                grads[i] = if sums[FIXED + k] > 0.0 {
                    reduced
                        .narrow(0, at, len)
                        .view(p.size().as_slice())
                        .to_kind(p.kind())
                } else {
                    Tensor::new()
                };
                at += len;
            }
        }
        Ok(())
    }

    fn active(&self, t: Term) -> bool {
        match t {
            Term::Task => {
                self.cfg.weights[0] != TermWeight::Fixed(0.0)
                    && self.student.task == Task::Classification
            }
            Term::Kd => {
                (self.teacher.is_some() || self.offline)
                    && self.student.task == Task::Classification
                    && self.cfg.weights[1] != TermWeight::Fixed(0.0)
            }
            Term::Embedding => {
                (self.teacher.is_some() || self.offline)
                    && self.student.task == Task::Embedding
                    && self.cfg.weights[4] != TermWeight::Fixed(0.0)
            }
            Term::Attention | Term::Hidden => {
                self.teacher.is_some() && self.cfg.weights[t as usize] != TermWeight::Fixed(0.0)
            }
        }
    }

    fn sample(&mut self, stream_pos: u64, n: usize) -> usize {
        let epoch = stream_pos / n as u64;
        if self.order_cache.as_ref().map(|(e, _)| *e) != Some(epoch) {
            self.order_cache = Some((epoch, epoch_order(n, self.cfg.seed, epoch)));
        }
        self.order_cache.as_ref().unwrap().1[(stream_pos % n as u64) as usize]
    }

    /// Whether this run measures the terms' gradient norms at probe steps:
    /// only the "auto" feature terms' cap uses them.
    fn probes(&self) -> bool {
        [Term::Attention, Term::Hidden]
            .into_iter()
            .any(|t| self.active(t) && self.cfg.weights[t as usize] == TermWeight::Auto)
    }

    /// The weighted loss of one micro-batch, each term's unweighted value,
    /// and with `probe` the L2 norm of each term's own gradient (one extra
    /// backward pass per active term, through the same graph).
    ///
    /// With `shares` (a rank of a group), each term is multiplied by this
    /// rank's share of it (see [`term_shares`]), values and norms included.
    fn micro_loss(
        &self,
        idx: &[usize],
        data: &TrainData,
        temp: f64,
        shares: Option<&[f64; 5]>,
        probe: bool,
    ) -> Result<(Tensor, [Option<f64>; 5], [Option<f64>; 5])> {
        let refs: Vec<&Encoded> = idx.iter().map(|&i| &data.examples[i]).collect();
        let device = self.student.device();
        let batch = self.tok.batch(&refs, Padding::Dynamic, device);
        let labels = Tensor::from_slice(&idx.iter().map(|&i| data.labels[i]).collect::<Vec<_>>())
            .to_device(device);
        let outputs = Outputs {
            hidden_states: self.active(Term::Hidden),
            attentions: self.active(Term::Attention),
        };
        // Forward passes under autocast when asked; losses in fp32.
        let (s, t) = autocast::maybe(device, self.cfg.precision, || {
            let s = self.student.forward_t(&batch, outputs, true);
            let t = self
                .teacher
                .map(|t| tch::no_grad(|| t.forward_t(&batch, outputs, false)));
            (s, t)
        })?;
        let (s, t) = (s.into_float(), t.map(ModelOutput::into_float));
        let t_out = match (&data.teacher_output, &t) {
            (Some(all), _) if self.offline => {
                let rows = Tensor::from_slice(&idx.iter().map(|&i| i as i64).collect::<Vec<_>>());
                Some(all.index_select(0, &rows).to_device(device))
            }
            (_, Some(t)) => Some(t.output.shallow_clone()),
            _ => None,
        };
        let mut terms: [Option<Tensor>; 5] = Default::default();
        if self.active(Term::Task) {
            terms[0] = Some(loss::task_ce(&s.output, &labels));
        }
        if let Some(t_out) = &t_out {
            if self.active(Term::Kd) {
                terms[1] = Some(loss::kd_kl(&s.output, t_out, temp));
            }
            if self.active(Term::Embedding) {
                let se = match &self.proj_embedding {
                    Some(p) => p.forward(&s.output),
                    None => s.output.shallow_clone(),
                };
                terms[4] =
                    Some(loss::embedding_mse(&se, t_out) + loss::embedding_cosine(&se, t_out));
            }
        }
        if let Some(t) = &t {
            let map = &self.cfg.layer_map;
            if self.active(Term::Attention) {
                let ta: Vec<Tensor> = map
                    .iter()
                    .map(|&l| t.encoder.attentions[l as usize].shallow_clone())
                    .collect();
                terms[2] = Some(loss::attention_mse(
                    &s.encoder.attentions,
                    &ta,
                    &batch.attention_mask,
                ));
            }
            if self.active(Term::Hidden) {
                let mut sh = vec![];
                let mut th = vec![t.encoder.hidden_states[0].shallow_clone()];
                for &l in map {
                    th.push(t.encoder.hidden_states[l as usize + 1].shallow_clone());
                }
                for h in &s.encoder.hidden_states {
                    sh.push(match &self.proj_hidden {
                        Some(p) => p.forward(h),
                        None => h.shallow_clone(),
                    });
                }
                terms[3] = Some(loss::hidden_mse(&sh, &th, &batch.attention_mask));
            }
        }
        let mut norms = [None; 5];
        if probe {
            let live: Vec<&Tensor> = self
                .params
                .iter()
                .map(|(_, p)| p)
                .filter(|p| p.requires_grad())
                .collect();
            for term in TERMS {
                let Some(v) = &terms[term as usize] else {
                    continue;
                };
                if !v.requires_grad() {
                    continue; // e.g. the task term of a batch without labels
                }
                let share = shares.map_or(1.0, |s| s[term as usize]);
                let g = Tensor::run_backward(&[v], &live, true, false);
                norms[term as usize] = Some(grad_norm(&g) * share);
            }
        }
        let mut total = Tensor::zeros([], (Kind::Float, device));
        let mut values = [None; 5];
        for term in TERMS {
            if let Some(v) = &terms[term as usize] {
                let w =
                    self.balancer
                        .weight(term, &self.cfg.weights, self.step, self.cfg.total_steps);
                // (× 1.0 alone: bitwise as before.)
                let share = shares.map_or(1.0, |s| s[term as usize]);
                values[term as usize] = Some(v.double_value(&[]) * share);
                total = total + v * (w * share);
            }
        }
        Ok((total, values, norms))
    }

    /// Train until `total_steps`, resuming from `self.step`. `on_step` sees
    /// every step; `evaluate` (if given) is called every `eval_every` steps
    /// and returns the metric to maximise (best is kept in `best.safetensors`).
    pub fn train(
        &mut self,
        data: &TrainData,
        evaluate: Option<&mut dyn FnMut(&TaskModel) -> Result<f64>>,
        on_step: impl FnMut(&StepLog),
    ) -> Result<()> {
        self.train_until(self.cfg.total_steps, data, evaluate, on_step)
    }

    /// Like `train`, but stop after step `until` (schedules still span
    /// `total_steps`); a checkpoint is written when stopping early.
    pub fn train_until(
        &mut self,
        until: u64,
        data: &TrainData,
        mut evaluate: Option<&mut dyn FnMut(&TaskModel) -> Result<f64>>,
        mut on_step: impl FnMut(&StepLog),
    ) -> Result<()> {
        let until = until.min(self.cfg.total_steps);
        let n_all = data.examples.len();
        // With a side stream the epoch order runs over the rows before it.
        let (n, side) = match self.side {
            Some(s) if s.from < n_all && s.per_micro > 0 => (s.from, Some(s)),
            _ => (n_all, None),
        };
        if n == 0 {
            return Err(Error::Invalid("no training examples".into()));
        }
        let per_step = (self.cfg.batch_size * self.cfg.grad_accum) as u64;
        let mut bad = 0u32;
        while self.step < until {
            if self
                .stop
                .as_ref()
                .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
            {
                if self.rank_world().0 == 0 {
                    self.save()?;
                }
                return Err(Error::Stopped);
            }
            if self
                .regroup
                .as_ref()
                .is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed))
            {
                return Err(Error::Regroup);
            }
            let step = self.step;
            let step_seed = self.cfg.seed.wrapping_mul(1_000_003).wrapping_add(step);
            // Dropout masks on CUDA come from libtorch's generators. On the
            // CPU they come from this thread's own generator (ranks that
            // are threads of one process must not share one), seeded as
            // `manual_seed` seeds the default one, so the masks are the
            // ones the default generator gave before it.
            tch::manual_seed(step_seed as i64);
            let _dropout = (self.device() == tch::Device::Cpu)
                .then(|| crate::rng::seeded_dropout(step_seed))
                .transpose()?;
            let lr = learning_rate(
                step,
                self.cfg.total_steps,
                self.cfg.warmup_steps,
                self.cfg.learning_rate,
                self.cfg.decay,
            );
            let temp = temperature(
                step,
                self.cfg.total_steps,
                self.cfg.temperature.0,
                self.cfg.temperature.1,
            );
            // Undefined until a micro-batch contributes (then taken as is).
            let mut grads: Vec<Tensor> = self.params.iter().map(|_| Tensor::new()).collect();
            let mut loss_sum = 0.0;
            let mut term_sum = [None::<f64>; 5];
            // Each term's own gradient norm, measured on the first
            // micro-batch of a probe step (see `schedule`).
            let probes = self.probes();
            let mut grad_norms = [None::<f64>; 5];
            let (rank, world) = self.rank_world();
            let mut global = vec![];
            // Per hooked parameter: whether the reducer must have had a
            // gradient (or an earlier micro-batch's) for it.
            let mut expected: Vec<bool> = vec![];
            for micro in 0..self.cfg.grad_accum {
                let base = step * per_step + (micro * self.cfg.batch_size) as u64;
                let mut all: Vec<usize> = (0..self.cfg.batch_size as u64)
                    .map(|j| self.sample(base + j, n))
                    .collect();
                if let Some(sr) = side {
                    all.extend(side_rows(
                        self.cfg.seed,
                        sr,
                        n_all,
                        step,
                        self.cfg.grad_accum,
                        micro,
                    ));
                }
                let ga = self.cfg.grad_accum as f64;
                // One process takes the whole micro-batch and divides by the
                // accumulation exactly as before data-parallel existed
                // (bitwise the same runs). A rank takes its length-balanced
                // part, each term weighted by the rank's exact share of
                // what that term averages over: the terms summed over the
                // group are the whole micro-batch's.
                let (idx, shares) = if world == 1 {
                    (all, None)
                } else {
                    global.extend_from_slice(&all);
                    let mut parts = split_by_length(&all, |i| data.examples[i].ids.len(), world);
                    let shares = term_shares(&parts[rank], &all, data);
                    (parts.swap_remove(rank), Some(shares))
                };
                let probe = micro == 0 && probes && is_probe_step(step);
                let (l, values, norms) =
                    self.micro_loss(&idx, data, temp, shares.as_ref(), probe)?;
                if probe {
                    grad_norms = norms;
                }
                let scale = |x: f64| x / ga;
                let scaled = l.shallow_clone() / ga;
                // The last micro-batch's backward sums the hooked gradients
                // (with what the earlier ones accumulated) as it goes.
                let last = micro + 1 == self.cfg.grad_accum;
                if let (true, Some((reducer, hooked))) = (last, self.reducer.as_mut()) {
                    let prior: Vec<Option<&Tensor>> = hooked
                        .iter()
                        .map(|&i| Some(&grads[i]).filter(|g| g.defined()))
                        .collect();
                    reducer.arm(&prior)?;
                }
                let mut g = gradients(&scaled, &self.params);
                if let (true, Some((_, hooked))) = (last, self.reducer.as_ref()) {
                    // In the reducer's sum instead (it holds the priors);
                    // what it must have seen.
                    expected = hooked
                        .iter()
                        .map(|&i| g[i].defined() || grads[i].defined())
                        .collect();
                    for &i in hooked {
                        g[i] = Tensor::new();
                        grads[i] = Tensor::new();
                    }
                }
                accumulate(&mut grads, g);
                loss_sum += scale(l.double_value(&[]));
                for (acc, v) in term_sum.iter_mut().zip(values) {
                    if let Some(v) = v {
                        *acc = Some(acc.unwrap_or(0.0) + scale(v));
                    }
                }
            }
            if self.dp.is_some() {
                let rows = self.touched_rows(&global, data);
                self.all_reduce(
                    &mut grads,
                    &mut loss_sum,
                    &mut term_sum,
                    &mut grad_norms,
                    &rows,
                    &expected,
                )?;
            }
            let norm = clip_grad_norm(&mut grads, self.cfg.grad_clip);
            let skipped = !loss_sum.is_finite() || !norm.is_finite();
            on_step(&StepLog {
                step,
                loss: loss_sum,
                terms: term_sum,
                lr,
                temperature: temp,
                skipped,
            });
            if skipped {
                drop(grads);
                bad += 1;
                tracing::warn!(
                    step,
                    loss = loss_sum,
                    grad_norm = norm,
                    "non-finite loss or gradient: step skipped"
                );
                if bad >= self.cfg.max_bad_steps {
                    tracing::warn!(
                        step,
                        bad,
                        "too many non-finite steps in a row: rolling back to the last checkpoint"
                    );
                    if !self.resume()? {
                        return Err(Error::Invalid(format!(
                            "training diverged at step {step} ({bad} non-finite steps in a row) and there is no checkpoint to roll back to"
                        )));
                    }
                    bad = 0;
                }
                // Weights and optimizer may have rolled back, but the data
                // cursor moves on past the bad batches: they are not retried
                // forever.
                self.step = step + 1;
                continue;
            }
            bad = 0;
            self.opt.step(&self.params, &grads, lr);
            for term in TERMS {
                if let Some(v) = term_sum[term as usize] {
                    self.balancer.observe(term, v);
                }
                if let Some(g) = grad_norms[term as usize] {
                    self.balancer.observe_grad(term, g);
                }
            }
            if probes && is_probe_step(step) {
                let w = |t: Term| self.balancer.multiplier(t, &self.cfg.weights);
                tracing::debug!(
                    step,
                    grad_task = ?grad_norms[0],
                    grad_kd = ?grad_norms[1],
                    grad_attention = ?grad_norms[2],
                    grad_hidden = ?grad_norms[3],
                    a_task = w(Term::Task),
                    a_kd = w(Term::Kd),
                    a_attention = w(Term::Attention),
                    a_hidden = w(Term::Hidden),
                    "balancer: per-term gradient norms and multipliers"
                );
            }
            self.step += 1;
            let at_end = self.step == until;
            let leader = self.rank_world().0 == 0;
            // Every rank evaluates its (identical) weights, so every rank
            // makes the same best-keeping decision; rank 0 writes the file.
            if let Some(eval) = evaluate.as_deref_mut() {
                if (self.cfg.eval_every > 0 && self.step % self.cfg.eval_every == 0) || at_end {
                    let metric = eval(self.student)?;
                    tracing::info!(step = self.step, metric, "evaluation");
                    if self.best_metric.is_none_or(|b| metric > b) {
                        self.best_metric = Some(metric);
                        self.best_step = Some(self.step);
                        if leader {
                            checkpoint::save_best(&self.checkpoint_dir, self.step, self.student)?;
                        }
                    }
                }
            }
            if leader
                && ((self.cfg.checkpoint_every > 0 && self.step % self.cfg.checkpoint_every == 0)
                    || at_end)
            {
                self.save()?;
            }
        }
        Ok(())
    }

    fn meta(&self) -> CheckpointMeta {
        CheckpointMeta {
            step: self.step,
            adam_t: self.opt.t,
            balancer: self.balancer.clone(),
            best_metric: self.best_metric,
            best_step: self.best_step,
            sha256: String::new(),
            fingerprint: self.fingerprint.clone(),
        }
    }

    /// Marks every checkpoint this trainer writes with `f`, the job
    /// configuration's fingerprint, and refuses to resume from one marked
    /// with another: a directory reused by a job of another configuration
    /// would otherwise resume its weights silently.
    /// `[data.augment] per_batch`: the rows from `SideRows::from` on (the
    /// augmented copies) leave the epoch order, and every micro-batch adds
    /// `per_micro` of them to its `batch_size` rows. `None` (the default):
    /// one order over all rows. Not part of [`TrainConfig`], whose fields
    /// key the fine-tuned teacher cache.
    pub fn set_side(&mut self, side: Option<SideRows>) {
        self.side = side;
    }

    pub fn set_fingerprint(&mut self, f: Option<String>) {
        self.fingerprint = f;
    }

    fn check_fingerprint(&self, meta: &CheckpointMeta, dir: &std::path::Path) -> Result<()> {
        match (&meta.fingerprint, &self.fingerprint) {
            (Some(theirs), Some(ours)) if theirs != ours => Err(Error::Invalid(format!(
                "the checkpoint of step {} in {} was written by a job of another configuration (fingerprint {theirs}, this job's {ours}): resuming it would mix the two; give the job its own output directory, or delete {}",
                meta.step,
                dir.display(),
                dir.display()
            ))),
            _ => Ok(()),
        }
    }

    /// Write a checkpoint of the current state (atomic; then published as latest).
    pub fn save(&self) -> Result<PathBuf> {
        let dir = checkpoint::save(&self.checkpoint_dir, self.meta(), &self.state_tensors())?;
        if let Some(hook) = &self.on_checkpoint {
            hook(&dir, self.step)?;
        }
        Ok(dir)
    }

    /// Called with each checkpoint written (its directory and step), after
    /// it is published locally: the cluster path commits it to the
    /// coordinator there.
    pub fn on_checkpoint(&mut self, hook: Box<dyn Fn(&std::path::Path, u64) -> Result<()> + 'a>) {
        self.on_checkpoint = Some(hook);
    }

    /// Stop (after a checkpoint) at the next step boundary once `flag` is set.
    pub fn stop_on(&mut self, flag: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>) {
        self.stop = flag;
    }

    /// Restore the latest committed checkpoint, if any. Returns whether one was found.
    pub fn resume(&mut self) -> Result<bool> {
        let Some((meta, tensors)) = checkpoint::load_latest(&self.checkpoint_dir)? else {
            return Ok(false);
        };
        self.check_fingerprint(&meta, &self.checkpoint_dir)?;
        self.restore(meta, tensors)?;
        Ok(true)
    }

    /// Restore the checkpoint in directory `ck` (a committed one).
    pub fn resume_from(&mut self, ck: &std::path::Path) -> Result<()> {
        let (meta, tensors) = checkpoint::load_dir(ck)?;
        self.check_fingerprint(&meta, ck)?;
        self.restore(meta, tensors)
    }

    fn restore(
        &mut self,
        meta: CheckpointMeta,
        tensors: std::collections::BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let find = |name: &str| -> Result<&Tensor> {
            tensors.get(name).ok_or_else(|| {
                Error::Invalid(format!(
                    "checkpoint in {} lacks tensor {name}",
                    self.checkpoint_dir.display()
                ))
            })
        };
        tch::no_grad(|| -> Result<()> {
            for (i, (name, p)) in self.params.iter().enumerate() {
                let mut p = p.shallow_clone();
                p.copy_(find(name)?);
                self.opt.m[i].1.copy_(find(&format!("adam_m.{name}"))?);
                self.opt.v[i].1.copy_(find(&format!("adam_v.{name}"))?);
            }
            Ok(())
        })?;
        self.apply_meta(meta);
        tracing::info!(step = self.step, dir = %self.checkpoint_dir.display(), "resumed from checkpoint");
        Ok(())
    }

    pub fn aux_vars(&self) -> &nn::VarStore {
        &self.aux
    }

    /// Load the best evaluated weights (if any evaluation ran) into the student.
    pub fn restore_best(&mut self) -> Result<bool> {
        let Some(step) = self.best_step else {
            return Ok(false);
        };
        let path = checkpoint::best_path(&self.checkpoint_dir, step);
        let tensors = crate::model::weights::read_tensors(std::slice::from_ref(&path))?;
        crate::model::weights::load_into(
            &mut self.student.vs,
            &tensors,
            &["classifier."],
            &[],
            &path,
        )?;
        Ok(true)
    }
}

/// Accuracy of a classifier on tokenized examples with label ids.
pub fn accuracy(
    model: &TaskModel,
    tok: &TextTokenizer,
    examples: &[Encoded],
    labels: &[i64],
) -> Result<f64> {
    let logits = infer(
        model,
        tok,
        examples,
        InferOptions {
            batch_size: 64,
            ..Default::default()
        },
        |_, _| {},
    )?;
    let pred = logits.argmax(-1, false);
    let gold = Tensor::from_slice(labels);
    let correct = pred.eq_tensor(&gold).sum(Kind::Int64).int64_value(&[]);
    Ok(correct as f64 / labels.len().max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::{side_rows, split_by_length, SideRows};

    /// Lengths from a fixed pseudo-random stream (no RNG crate needed).
    /// The side stream: `per_micro` rows of `[from, n)` a micro-batch, the
    /// positions consecutive across micro-batches and steps, every side row
    /// once per side epoch, each epoch in another order, and the same rows
    /// for the same step whenever asked (what resume relies on).
    #[test]
    fn side_rows_cover_each_copy_once_an_epoch_as_a_function_of_the_step() {
        let side = SideRows {
            from: 10,
            per_micro: 3,
        };
        let (n, accum) = (22, 2); // 12 side rows: two steps of 2 × 3 an epoch
        let rows = |step| {
            let mut r = side_rows(7, side, n, step, accum, 0);
            r.extend(side_rows(7, side, n, step, accum, 1));
            r
        };
        let epoch = |e: u64| {
            let mut r = rows(2 * e);
            r.extend(rows(2 * e + 1));
            r
        };
        for e in 0..3 {
            let mut r = epoch(e);
            assert!(r.iter().all(|&i| (10..22).contains(&i)), "{r:?}");
            r.sort();
            assert_eq!(r, (10..22).collect::<Vec<_>>(), "epoch {e}");
        }
        assert_ne!(epoch(0), epoch(1), "each side epoch is shuffled anew");
        assert_eq!(rows(5), rows(5));
        assert_eq!(side_rows(7, side, n, 0, accum, 0).len(), 3);
        assert_ne!(rows(0), {
            let mut r = side_rows(8, side, n, 0, accum, 0);
            r.extend(side_rows(8, side, n, 0, accum, 1));
            r
        });
        // An epoch boundary inside a micro-batch: 5 side rows, 3 a micro-batch.
        let small = side_rows(7, side, 15, 0, 1, 1);
        assert!(small.iter().all(|&i| (10..15).contains(&i)), "{small:?}");
        // No side rows at all: nothing to add.
        assert!(side_rows(7, side, 10, 0, 1, 0).is_empty());
    }

    fn lengths(n: usize, seed: u64) -> Vec<usize> {
        let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                4 + (x >> 33) as usize % 60
            })
            .collect()
    }

    fn cost(part: &[usize], len: &[usize]) -> usize {
        part.len() * part.iter().map(|&i| len[i]).max().unwrap_or(0)
    }

    #[test]
    fn the_split_covers_the_batch_in_runs_of_length_and_beats_round_robin() {
        for (n, world, seed) in [
            (32, 2, 1),
            (32, 3, 2),
            (12, 4, 3),
            (7, 2, 4),
            (5, 8, 5),
            (64, 2, 6),
        ] {
            let len = lengths(100, seed);
            // Indices may repeat (an epoch boundary inside a batch).
            let all: Vec<usize> = (0..n).map(|j| (j * 37 + seed as usize) % 100).collect();
            let parts = split_by_length(&all, |i| len[i], world);
            assert_eq!(
                parts,
                split_by_length(&all, |i| len[i], world),
                "deterministic"
            );
            assert_eq!(parts.len(), world);
            let mut got: Vec<usize> = parts.concat();
            let mut want = all.clone();
            got.sort_unstable();
            want.sort_unstable();
            assert_eq!(got, want, "every row once: n {n} world {world}");
            for (r, p) in parts.iter().enumerate() {
                assert_eq!(p.is_empty(), r >= n, "rank {r} of {world}, {n} rows");
            }
            // Runs of the length order: rank r's rows are no shorter than
            // rank r+1's.
            for w in parts.windows(2) {
                if let (Some(lo), Some(hi)) = (
                    w[0].iter().map(|&i| len[i]).min(),
                    w[1].iter().map(|&i| len[i]).max(),
                ) {
                    assert!(lo >= hi, "{w:?}");
                }
            }
            let worst = parts.iter().map(|p| cost(p, &len)).max().unwrap();
            let round_robin: Vec<Vec<usize>> = (0..world)
                .map(|r| all.iter().skip(r).step_by(world).copied().collect())
                .collect();
            let rr = round_robin.iter().map(|p| cost(p, &len)).max().unwrap();
            assert!(
                worst <= rr,
                "n {n} world {world}: {worst} > round robin {rr}"
            );
        }
    }
}
