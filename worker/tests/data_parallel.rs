//! Data-parallel training on c10d Gloo (`Trainer::data_parallel`): two
//! ranks, each with half of every micro-batch, end with the same weights as
//! one process on the whole batch, within fp32 reduction order, and with
//! identical weights on both ranks. The ranks are two threads of this test
//! process, each with its own model and Gloo group over a TCPStore on
//! loopback (the real engine; the process tests in the root crate use real
//! processes). Dropout is off in that comparison: its masks differ per row
//! split by design. With dropout on, two such runs give bitwise the same
//! weights (each rank thread draws its masks from its own generator).

mod common;

use common::*;
use distill_worker::collective::Group;
use distill_worker::distill::schedule::{Decay, TermWeight};
use distill_worker::distill::train::{StepLog, TrainConfig, TrainData, Trainer};
use distill_worker::model::student::{derive_config, init_from_teacher, StudentShape};
use distill_worker::model::{Task, TaskModel};
use distill_worker::tokenize::TextTokenizer;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tch::{Device, Tensor};

fn config(accum: usize) -> TrainConfig {
    config_with(accum, false)
}

/// `all_terms`: the attention and hidden terms too, whose averages are
/// over tokens and token pairs, not rows: a rank's share of them is its
/// share of the micro-batch's tokens (the ranks' rows differ in length).
fn config_with(accum: usize, all_terms: bool) -> TrainConfig {
    let inter = if all_terms { 1.0 } else { 0.0 };
    TrainConfig {
        total_steps: 12,
        batch_size: 8,
        grad_accum: accum,
        learning_rate: 1e-3,
        warmup_steps: 2,
        decay: Decay::Linear,
        weight_decay: 0.01,
        grad_clip: 1.0,
        seed: 7,
        eval_every: 0,
        checkpoint_every: 0,
        // Terms that are means over examples: task and KD. (Not "auto": the
        // student starts as a copy of the teacher, KD is ~1e-6 and its
        // auto weight ~1e5 would magnify rounding in the comparison; the
        // ranks' own agreement under "auto" is the process test's.)
        weights: [
            TermWeight::Fixed(1.0),
            TermWeight::Fixed(1.0),
            TermWeight::Fixed(inter),
            TermWeight::Fixed(inter),
            TermWeight::Fixed(0.0),
        ],
        temperature: (4.0, 1.0),
        layer_map: vec![1],
        max_bad_steps: 3,
        precision: None,
    }
}

fn make_teacher(root: &Path) -> PathBuf {
    random_model(&root.join("teacher"), Random { seed: 9, ..SMALL })
}

fn data(tok: &TextTokenizer) -> TrainData {
    let texts: Vec<String> = (0..40)
        .map(|i| {
            (0..(2 + i % 9))
                .map(|j| format!("w{}", 5 + (i * 13 + j * 5) % 50))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    TrainData {
        examples: tok.encode(&refs, None).unwrap(),
        labels: (0..40).map(|i| (i % 2) as i64).collect(),
        teacher_output: None,
    }
}

/// The teacher, its tokenizer and a fresh student (the same init
/// everywhere).
fn setup(model_dir: &Path, dropout: bool) -> (TaskModel, TextTokenizer, TaskModel) {
    setup_shaped(model_dir, dropout, (16, 2, 32))
}

/// [`setup`] with a student of `(hidden, heads, intermediate)`, one layer.
fn setup_shaped(
    model_dir: &Path,
    dropout: bool,
    (hidden, heads, intermediate): (i64, i64, i64),
) -> (TaskModel, TextTokenizer, TaskModel) {
    let teacher = TaskModel::load(model_dir, Task::Classification, None, Device::Cpu).unwrap();
    let tok = TextTokenizer::load(model_dir, teacher.config(), 16).unwrap();
    let mut cfg = derive_config(
        teacher.config(),
        &StudentShape::Explicit {
            layers: 1,
            hidden,
            heads,
            intermediate,
        },
    )
    .unwrap();
    if !dropout {
        cfg.hidden_dropout_prob = 0.0;
        cfg.attention_probs_dropout_prob = 0.0;
    }
    let mut s = TaskModel::new(
        &cfg,
        Task::Classification,
        teacher.labels.clone(),
        Device::Cpu,
    )
    .unwrap();
    init_from_teacher(&mut s, &teacher, &[1]).unwrap();
    (teacher, tok, s)
}

/// Trains a fresh student as rank `group.rank` (or alone), on the task
/// and KD terms or on every term; returns its weights and step logs.
fn train_with(
    model_dir: &Path,
    ckpt: &Path,
    accum: usize,
    all_terms: bool,
    dropout: bool,
    group: Option<Group>,
) -> (Vec<(String, Tensor)>, Vec<StepLog>) {
    let (teacher, tok, mut s) = setup(model_dir, dropout);
    let d = data(&tok);
    let mut logs = vec![];
    {
        let mut tr = Trainer::new(
            &mut s,
            Some(&teacher),
            None,
            &tok,
            config_with(accum, all_terms),
            ckpt.to_path_buf(),
        )
        .unwrap();
        if let Some(g) = group {
            tr.data_parallel(g).unwrap();
        }
        tr.train(&d, None, |l| logs.push(l.clone())).unwrap();
    }
    (s.named_tensors(), logs)
}

/// Joins `rank` of a two-rank Gloo group on loopback under `prefix`.
fn join_pair(port: u16, prefix: &str, rank: u32) -> Group {
    Group::join(&rendezvous(port, prefix, rank, Duration::from_secs(60))).unwrap()
}

fn two_ranks(
    model_dir: &Path,
    root: &Path,
    accum: usize,
    all_terms: bool,
    dropout: bool,
) -> Vec<(Vec<(String, Tensor)>, Vec<StepLog>)> {
    let port = free_port();
    let handles: Vec<_> = (0..2u32)
        .map(|rank| {
            let (model_dir, ckpt) = (
                model_dir.to_path_buf(),
                root.join(format!("rank{rank}-{accum}-{all_terms}")),
            );
            std::thread::spawn(move || {
                let g = join_pair(port, &format!("dp-{accum}-{all_terms}/gen-1/"), rank);
                let (w, l) = train_with(&model_dir, &ckpt, accum, all_terms, dropout, Some(g));
                // Tensors go back across the thread boundary as plain data.
                let w: Vec<(String, Vec<f32>, Vec<i64>)> = w
                    .into_iter()
                    .map(|(n, t)| (n, Vec::<f32>::try_from(t.reshape([-1])).unwrap(), t.size()))
                    .collect();
                (w, l)
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| {
            let (w, l) = h.join().unwrap();
            let w = w
                .into_iter()
                .map(|(n, v, s)| (n, Tensor::from_slice(&v).reshape(s)))
                .collect();
            (w, l)
        })
        .collect()
}

#[test]
fn two_ranks_with_half_batches_match_one_process_with_the_whole_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = make_teacher(tmp.path());
    // Rows go to ranks by length (`split_by_length`): the ranks' rows
    // differ in number and in length, and each term is weighted by the
    // rank's exact share of what it averages over.
    for (accum, all_terms) in [(1, false), (2, false), (1, true)] {
        let (single, single_logs) = train_with(
            &model_dir,
            &tmp.path().join(format!("single-{accum}-{all_terms}")),
            accum,
            all_terms,
            false,
            None,
        );
        let ranks = two_ranks(&model_dir, tmp.path(), accum, all_terms, false);
        let (r0, r0_logs) = &ranks[0];
        let (r1, _) = &ranks[1];
        let mut worst: f64 = 0.0;
        let mut moved = 0.0f64;
        for (((n, a), (_, b)), (_, c)) in single.iter().zip(r0).zip(r1) {
            // The ranks never drift apart: bitwise the same weights.
            assert!(b.equal(c), "{n}: rank 0 and rank 1 differ");
            worst = worst.max(max_abs_diff(a, b));
            moved = moved.max(a.abs().max().double_value(&[]));
        }
        eprintln!(
            "grad_accum {accum} all terms {all_terms}: max |single − 2 ranks| = {worst:.3e} over {} tensors",
            single.len()
        );
        // 12 AdamW steps at lr 1e-3: each step moves a weight by up to 1e-3,
        // so a reduction-order difference shows as ≪ 1e-3 (measured: 4e-7).
        assert!(
            worst < 1e-5,
            "grad_accum {accum}: weights differ by {worst}"
        );
        // The logged loss is the global batch's loss on every rank.
        for (a, b) in single_logs.iter().zip(r0_logs) {
            assert!(
                (a.loss - b.loss).abs() < 1e-5 * a.loss.abs().max(1.0),
                "step {}: loss {} vs {}",
                a.step,
                a.loss,
                b.loss
            );
        }
        assert!(moved > 0.0);
    }
}

/// Dropout on (hidden, attention probabilities, the head), two ranks as
/// threads of this process: two runs give bitwise the same weights. Each
/// rank draws its masks from its own generator; with the masks from
/// libtorch's one process-wide generator, which both ranks reseed each
/// step, a rank's masks depended on how the threads interleaved. With
/// every term the attention probabilities are an output (explicit
/// softmax, then dropout); with task and KD only, attention goes through
/// the scaled-dot-product path (`rng::attention_dropout`).
#[test]
fn two_ranks_as_threads_with_dropout_give_the_same_weights_twice() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = make_teacher(tmp.path());
    for all_terms in [true, false] {
        let runs: Vec<_> = (0..2)
            .map(|run| {
                let root = tmp.path().join(format!("run{run}-{all_terms}"));
                two_ranks(&model_dir, &root, 1, all_terms, true)
            })
            .collect();
        let plain = two_ranks(
            &model_dir,
            &tmp.path().join(format!("plain-{all_terms}")),
            1,
            all_terms,
            false,
        );
        let mut differs_from_no_dropout = false;
        for (((n, a), (_, b)), (_, c)) in runs[0][0].0.iter().zip(&runs[1][0].0).zip(&plain[0].0) {
            assert!(
                a.equal(b),
                "all terms {all_terms}: {n}: two runs with dropout differ (by {:.3e})",
                max_abs_diff(a, b)
            );
            differs_from_no_dropout |= !a.equal(c);
        }
        for (r, (w, _)) in runs[0].iter().enumerate().skip(1) {
            for ((n, a), (_, b)) in runs[0][0].0.iter().zip(w) {
                assert!(
                    a.equal(b),
                    "all terms {all_terms}: {n}: rank 0 and rank {r} differ"
                );
            }
        }
        // The masks were drawn: the weights are not those of training without dropout.
        assert!(
            differs_from_no_dropout,
            "all terms {all_terms}: dropout changed nothing"
        );
    }
}

/// Weights as plain data, to cross a thread boundary.
type Plain = Vec<(String, Vec<f32>)>;

fn plain(ts: Vec<(String, Tensor)>) -> Plain {
    ts.into_iter()
        .map(|(n, t)| (n, Vec::<f32>::try_from(t.reshape([-1])).unwrap()))
        .collect()
}

/// A group re-formed with a new member: rank 0 has trained 4 steps alone,
/// rank 1 starts fresh. `sync_state` finds rank 0 furthest on, sends its
/// whole state (weights, AdamW moments, step, balancer) to rank 1 only,
/// and from there the two ranks train in lockstep to bitwise-equal
/// weights.
#[test]
fn a_member_that_joins_late_receives_the_state_and_stays_in_lockstep() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = make_teacher(tmp.path());
    let port = free_port();
    let handles: Vec<_> = (0..2u32)
        .map(|rank| {
            let (model_dir, ckpt) = (model_dir.clone(), tmp.path().join(format!("late{rank}")));
            std::thread::spawn(move || -> (Plain, (u32, u64, u32), u64, [u8; 32]) {
                let (teacher, tok, mut s) = setup(&model_dir, false);
                let d = data(&tok);
                let mut tr =
                    Trainer::new(&mut s, Some(&teacher), None, &tok, config(1), ckpt).unwrap();
                if rank == 0 {
                    tr.train_until(4, &d, None, |_| {}).unwrap();
                }
                let before = tr.step;
                let g = join_pair(port, "late/gen-2/", rank);
                tr.data_parallel(g).unwrap();
                let synced = tr.sync_state().unwrap();
                let digest = tr.state_digest().unwrap();
                assert_eq!(tr.step, 4, "rank {rank} continues from step 4");
                tr.train(&d, None, |_| {}).unwrap();
                drop(tr);
                (plain(s.named_tensors()), synced, before, digest)
            })
        })
        .collect();
    let out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(out[0].2, 4);
    assert_eq!(out[1].2, 0);
    for (rank, o) in out.iter().enumerate() {
        assert_eq!(
            o.1,
            (0, 4, 1),
            "rank {rank}: source 0 at step 4, one receiver"
        );
    }
    assert_eq!(out[0].3, out[1].3, "state digests equal after the sync");
    for ((n, a), (_, b)) in out[0].0.iter().zip(&out[1].0) {
        assert!(a == b, "{n}: ranks differ after training on together");
    }
}

/// A coordinator stand-in that answers every join with a group of two
/// whose other member never comes (a member that finished and stays
/// assigned to the job), and the given committed checkpoint.
struct NobodyElse {
    checkpoint: (PathBuf, u64),
    joins: u32,
    flag: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl distill_worker::elastic::Membership for NobodyElse {
    fn join(&mut self, _failed: u64) -> distill_worker::Result<distill_worker::elastic::Joined> {
        self.joins += 1;
        if self.joins > 2 {
            // Without the rule, the rank tries to meet the absent peer
            // again and again: end the test instead of hanging.
            return Err(distill_worker::Error::Invalid(format!(
                "joined {} times: the rank waits for a peer that never comes",
                self.joins
            )));
        }
        // Rank 1: rank 0 hosts the rendezvous, and nobody listens there.
        let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = dead.local_addr().unwrap().to_string();
        drop(dead);
        Ok(distill_worker::elastic::Joined {
            generation: u64::from(self.joins) + 4,
            rank: 1,
            world: 2,
            peers: vec![peer.clone(), peer],
            checkpoint: Some(self.checkpoint.clone()),
        })
    }
    fn committer(&self, _generation: u64, _total: u64) -> distill_worker::elastic::Committer {
        Box::new(|_, _| panic!("nothing is trained, so nothing is committed"))
    }
    fn flag(&self) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
        self.flag.clone()
    }
    fn set_group(&self, _generation: u64, _world: u32) {}
    fn bind_host(&self) -> String {
        "127.0.0.1".into()
    }
    fn timeout(&self) -> Duration {
        Duration::from_secs(2)
    }
    fn job(&self) -> String {
        "done".into()
    }
}

/// A holder that takes the training task over after the members finished
/// (the old holder was frozen and evicted) finds the last step committed:
/// it must not wait for a group — the finished members stay assigned to
/// the job and would never meet it — but finish at once, holding the
/// committed state, to export.
#[test]
fn a_rank_joining_after_the_last_step_was_committed_forms_no_group() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = make_teacher(tmp.path());
    let ckpt = tmp.path().join("ckpt");
    let mut cfg = config(1);
    cfg.checkpoint_every = cfg.total_steps;
    let (teacher, tok, mut s) = setup(&model_dir, false);
    let d = data(&tok);
    let done = {
        let mut tr = Trainer::new(
            &mut s,
            Some(&teacher),
            None,
            &tok,
            cfg.clone(),
            ckpt.clone(),
        )
        .unwrap();
        tr.train(&d, None, |_| {}).unwrap();
        tr.step
    };
    assert_eq!(done, cfg.total_steps);
    let trained = plain(s.named_tensors());
    let last = ckpt.join(format!("ckpt-{done:08}"));
    assert!(last.join("meta.json").exists(), "{}", last.display());

    // A fresh process of the new holder.
    let (teacher, tok, mut fresh) = setup(&model_dir, false);
    let mut m = NobodyElse {
        checkpoint: (last, done),
        joins: 0,
        flag: Default::default(),
    };
    let finished = {
        let mut tr = Trainer::new(
            &mut fresh,
            Some(&teacher),
            None,
            &tok,
            cfg,
            tmp.path().join("ckpt2"),
        )
        .unwrap();
        let f = distill_worker::elastic::train(&mut tr, &d, None, |_| {}, &mut m).unwrap();
        assert_eq!(tr.step, done, "holds the committed step");
        assert_eq!(tr.rank_world(), (0, 1), "in no group");
        f
    };
    assert_eq!(finished, distill_worker::elastic::Finished::AtCheckpoint);
    assert_eq!(m.joins, 1, "joined once");
    let restored = plain(fresh.named_tensors());
    for ((n, a), (_, b)) in trained.iter().zip(&restored) {
        assert!(a == b, "{n}: the committed state, restored");
    }
}

/// The all-reduce after backward (NCCL's path, and Gloo's with
/// `sum_after_backward`) has the same layout on every rank whichever
/// gradients a rank has: a rank without one sends zeros and a flag. Here
/// rank 1 lacks the classifier bias's gradient (the test freezes it there,
/// the one way to make ranks differ with this model; distill itself never
/// freezes a parameter). Both ranks train to bitwise-equal weights, and
/// the bias moves on rank 1 too (rank 0's gradient reached it). Leaving the
/// missing gradient out of the buffer, as before, pairs unequal buffers and
/// the all-reduce fails.
#[test]
fn a_rank_without_a_gradient_still_pairs_equal_all_reduces() {
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = make_teacher(tmp.path());
    let port = free_port();
    let frozen = "classifier.bias";
    let handles: Vec<_> = (0..2u32)
        .map(|rank| {
            let (model_dir, ckpt) = (model_dir.clone(), tmp.path().join(format!("frozen{rank}")));
            std::thread::spawn(move || -> (Plain, Vec<f32>) {
                let (teacher, tok, mut s) = setup(&model_dir, false);
                let vars = s.vs.variables();
                let bias = vars.get(frozen).expect("the student has a classifier bias");
                let before = Vec::<f32>::try_from(bias.detach()).unwrap();
                if rank == 1 {
                    let _ = bias.shallow_clone().set_requires_grad(false);
                }
                let d = data(&tok);
                let mut tr =
                    Trainer::new(&mut s, Some(&teacher), None, &tok, config(1), ckpt).unwrap();
                tr.sum_after_backward();
                let g = join_pair(port, "frozen/gen-1/", rank);
                tr.data_parallel(g).unwrap();
                tr.train(&d, None, |_| {})
                    .unwrap_or_else(|e| panic!("rank {rank}: {e}"));
                drop(tr);
                (plain(s.named_tensors()), before)
            })
        })
        .collect();
    let out: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    for ((n, a), (_, b)) in out[0].0.iter().zip(&out[1].0) {
        assert_eq!(a, b, "{n}: rank 0 and rank 1 differ");
    }
    let (_, after) = out[1]
        .0
        .iter()
        .find(|(n, _)| n.ends_with(frozen))
        .expect("the exported classifier bias");
    assert_eq!(out[0].1, out[1].1, "both ranks start alike");
    assert_ne!(
        after, &out[1].1,
        "rank 1's bias moved with rank 0's gradient"
    );
}

/// Issue 41: under "auto" weights the trainer measures each term's own
/// gradient norm at probe steps (`schedule::PROBE_EVERY`) and caps the
/// feature terms' force at the strongest output term's. Alone, every term
/// gets measured and the cap holds at the end; on two ranks the norms are
/// summed over the group, so both ranks keep the same balancer and stay in
/// lockstep (bitwise equal weights).
#[test]
fn auto_weights_measure_gradients_and_cap_the_feature_terms_alike_on_every_rank() {
    use distill_worker::distill::schedule::{Balancer, Term, AUTO_MAX, PROBE_EVERY};
    let tmp = tempfile::tempdir().unwrap();
    let model_dir = make_teacher(tmp.path());
    let mut cfg = config_with(1, true);
    cfg.weights = [TermWeight::Auto; 5];
    cfg.weights[Term::Embedding as usize] = TermWeight::Fixed(0.0);
    cfg.total_steps = 2 * PROBE_EVERY + 1;
    // A student of the teacher's width (32): "auto" feature terms are off
    // for a narrower one.
    let train = |ckpt: PathBuf, group: Option<Group>| {
        let (teacher, tok, mut s) = setup_shaped(&model_dir, false, (32, 4, 64));
        let d = data(&tok);
        let mut tr = Trainer::new(&mut s, Some(&teacher), None, &tok, cfg.clone(), ckpt).unwrap();
        if let Some(g) = group {
            tr.data_parallel(g).unwrap();
        }
        tr.train(&d, None, |_| {}).unwrap();
        let b = tr.balancer.clone();
        drop(tr);
        let w: Vec<(String, Vec<f32>)> = s
            .named_tensors()
            .into_iter()
            .map(|(n, t)| (n, Vec::<f32>::try_from(t.reshape([-1])).unwrap()))
            .collect();
        (b, w)
    };
    let (alone, _) = train(tmp.path().join("alone"), None);
    let force = |b: &Balancer, t: Term| b.multiplier(t, &cfg.weights) * b.grad[t as usize].unwrap();
    for t in [Term::Task, Term::Kd, Term::Attention, Term::Hidden] {
        assert!(
            alone.grad[t as usize].is_some_and(|g| g > 0.0),
            "{t:?} measured: {alone:?}"
        );
        assert!(alone.multiplier(t, &cfg.weights) <= AUTO_MAX, "{alone:?}");
    }
    let strongest = force(&alone, Term::Task).max(force(&alone, Term::Kd));
    for t in [Term::Attention, Term::Hidden] {
        assert!(
            force(&alone, t) <= strongest * (1.0 + 1e-9),
            "{t:?}: {alone:?}"
        );
    }

    let port = free_port();
    let out: Vec<(Balancer, Vec<(String, Vec<f32>)>)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2u32)
            .map(|rank| {
                let (ckpt, train) = (tmp.path().join(format!("auto-rank{rank}")), &train);
                s.spawn(move || train(ckpt, Some(join_pair(port, "auto/gen-1/", rank))))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(out[0].0, out[1].0, "both ranks hold the same balancer");
    assert!(out[0].0.grad[Term::Attention as usize].is_some());
    for ((n, a), (_, b)) in out[0].1.iter().zip(&out[1].1) {
        assert!(a == b, "{n}: ranks differ");
    }
}
