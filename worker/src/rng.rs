//! Random draws from a generator of the caller's own (`csrc/rng.cpp`), not
//! from libtorch's process-wide default generator.
//!
//! Why: `distill run --workers N` runs its ranks as threads of one
//! process, and every `tch::manual_seed` + draw on one thread races with
//! the others' (the draw may come after another thread's reseed, or take
//! values meant for it). A [`CpuGenerator`] is the same Mersenne Twister
//! as the default CPU generator, seeded the same way: a fresh
//! `CpuGenerator::new(s)` gives exactly the values that `manual_seed(s)`
//! followed by the same draws gave when nothing else drew, so moving a
//! draw onto it changes no single-process result.
//!
//! Dropout: while a [`DropoutScope`] lives on a thread (the trainer opens
//! one per step on the CPU), [`dropout`] and [`attention_dropout`] on that
//! thread draw from its own generator, seeded with the step's seed. Each
//! rank thread thus draws its own masks, and one process gives the masks
//! `manual_seed(step seed)` gave before (the test below checks bitwise).
//! Outside a scope, and on CUDA, dropout is libtorch's own.

use crate::{Error, Result};
use std::cell::RefCell;
use std::marker::PhantomData;
use std::os::raw::{c_char, c_int, c_void};
use tch::{Device, Tensor};

extern "C" {
    fn distill_gen_new(seed: u64, err: *mut c_char, errlen: c_int) -> *mut c_void;
    fn distill_gen_free(gen: *mut c_void);
    fn distill_gen_uniform(
        gen: *mut c_void,
        sizes: *const i64,
        ndim: c_int,
        lo: f64,
        hi: f64,
        err: *mut c_char,
        errlen: c_int,
    ) -> *mut torch_sys::C_tensor;
    fn distill_gen_dropout(
        gen: *mut c_void,
        x: *const torch_sys::C_tensor,
        p: f64,
        err: *mut c_char,
        errlen: c_int,
    ) -> *mut torch_sys::C_tensor;
    #[allow(clippy::too_many_arguments)]
    fn distill_gen_attention_dropout(
        gen: *mut c_void,
        q: *const torch_sys::C_tensor,
        k: *const torch_sys::C_tensor,
        v: *const torch_sys::C_tensor,
        mask: *const torch_sys::C_tensor,
        p: f64,
        scale: f64,
        err: *mut c_char,
        errlen: c_int,
    ) -> *mut torch_sys::C_tensor;
}

const ERRLEN: usize = 512;

/// A CPU generator owned by one caller (not shared between threads).
pub struct CpuGenerator(*mut c_void);

// Moved between threads only as a whole; `&mut self` serialises its use.
unsafe impl Send for CpuGenerator {}

impl CpuGenerator {
    /// A generator in the state the default CPU generator has after
    /// `manual_seed(seed)`.
    pub fn new(seed: u64) -> Result<Self> {
        let mut err = vec![0u8; ERRLEN];
        // SAFETY: a plain C call; the shim catches every exception.
        let raw =
            unsafe { distill_gen_new(seed, err.as_mut_ptr() as *mut c_char, ERRLEN as c_int) };
        if raw.is_null() {
            return Err(Error::shim(&err, "random generator"));
        }
        Ok(Self(raw))
    }

    /// A new fp32 CPU tensor of shape `size` drawn from U(lo, hi), as
    /// `Tensor::uniform_` draws it.
    pub fn uniform(&mut self, size: &[i64], lo: f64, hi: f64) -> Result<Tensor> {
        let mut err = vec![0u8; ERRLEN];
        // SAFETY: `size` outlives the call; the shim returns a heap-allocated
        // `at::Tensor` (owned by `shim_result`), or null with the message in `err`.
        let raw = unsafe {
            distill_gen_uniform(
                self.0,
                size.as_ptr(),
                size.len() as c_int,
                lo,
                hi,
                err.as_mut_ptr() as *mut c_char,
                ERRLEN as c_int,
            )
        };
        crate::error::shim_result(raw, &err, "uniform draw")
    }

    /// `x.dropout(p, true)` with the mask drawn from this generator
    /// (`0 < p < 1`).
    fn dropout(&mut self, x: &Tensor, p: f64) -> Result<Tensor> {
        let mut err = vec![0u8; ERRLEN];
        // SAFETY: `x` outlives the call; the result is owned by `shim_result`.
        let raw = unsafe {
            distill_gen_dropout(
                self.0,
                x.as_ptr(),
                p,
                err.as_mut_ptr() as *mut c_char,
                ERRLEN as c_int,
            )
        };
        crate::error::shim_result(raw, &err, "dropout")
    }

    fn attention_dropout(
        &mut self,
        [q, k, v, mask]: [&Tensor; 4],
        p: f64,
        scale: f64,
    ) -> Result<Tensor> {
        let mut err = vec![0u8; ERRLEN];
        // SAFETY: the tensors outlive the call; the result is owned by `shim_result`.
        let raw = unsafe {
            distill_gen_attention_dropout(
                self.0,
                q.as_ptr(),
                k.as_ptr(),
                v.as_ptr(),
                mask.as_ptr(),
                p,
                scale,
                err.as_mut_ptr() as *mut c_char,
                ERRLEN as c_int,
            )
        };
        crate::error::shim_result(raw, &err, "attention dropout")
    }
}

thread_local! {
    /// This thread's dropout generator while a [`DropoutScope`] is open.
    static DROPOUT: RefCell<Option<CpuGenerator>> = const { RefCell::new(None) };
}

/// While alive, CPU dropout on this thread ([`dropout`],
/// [`attention_dropout`]) draws from a generator of its own seeded with
/// the scope's seed; dropped, dropout goes back to what it was before (an
/// enclosing scope's generator, or libtorch's). Not `Send`: it belongs to
/// the thread that opened it.
pub struct DropoutScope {
    outer: Option<CpuGenerator>,
    _thread: PhantomData<*const ()>,
}

/// Opens a [`DropoutScope`] seeded with `seed` on this thread.
pub fn seeded_dropout(seed: u64) -> Result<DropoutScope> {
    let g = CpuGenerator::new(seed)?;
    let outer = DROPOUT.with(|d| d.borrow_mut().replace(g));
    Ok(DropoutScope {
        outer,
        _thread: PhantomData,
    })
}

impl Drop for DropoutScope {
    fn drop(&mut self) {
        let outer = self.outer.take();
        DROPOUT.with(|d| *d.borrow_mut() = outer);
    }
}

fn with_scope<T>(x: &Tensor, f: impl FnOnce(&mut CpuGenerator) -> Result<T>) -> Option<T> {
    // libtorch draws nothing for an empty tensor (and its kernels might).
    if x.device() != Device::Cpu || x.numel() == 0 {
        return None;
    }
    DROPOUT.with(|d| {
        d.borrow_mut().as_mut().map(|g| {
            // A shim failure here is libtorch refusing an op on valid
            // tensors, which tch's own ops report by panicking too.
            f(g).unwrap_or_else(|e| panic!("{e}"))
        })
    })
}

/// `xs.dropout(p, train)`, drawn from this thread's [`DropoutScope`] when
/// one is open and `xs` is on the CPU.
pub fn dropout(xs: &Tensor, p: f64, train: bool) -> Tensor {
    if !train || p <= 0.0 || p >= 1.0 {
        return xs.dropout(p, train);
    }
    with_scope(xs, |g| g.dropout(xs, p)).unwrap_or_else(|| xs.dropout(p, train))
}

/// Attention with dropout `p` on its probabilities, drawn from this
/// thread's [`DropoutScope`]: bitwise what
/// `Tensor::scaled_dot_product_attention(q, k, v, Some(mask), p, false,
/// scale, false)` gives from the default generator in the same state (on
/// the CPU that call runs its math kernel, whose steps `csrc/rng.cpp`
/// repeats). `None` when no scope is open, `q` is not on the CPU or empty,
/// or the call is one that kernel treats otherwise (a boolean mask; outside
/// autocast, a mask of another dtype than `q`'s; a scale that is not
/// positive): the caller then calls SDPA.
pub fn attention_dropout(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    p: f64,
    scale: f64,
) -> Option<Tensor> {
    // Under CPU autocast every floating input is cast to its dtype first.
    let same_kind = mask.kind() == q.kind() || crate::autocast::is_enabled(Device::Cpu);
    if p <= 0.0 || p >= 1.0 || scale <= 0.0 || !mask.is_floating_point() || !same_kind {
        return None;
    }
    with_scope(q, |g| g.attention_dropout([q, k, v, mask], p, scale))
}

impl Drop for CpuGenerator {
    fn drop(&mut self) {
        // SAFETY: made by `distill_gen_new`, freed once.
        unsafe { distill_gen_free(self.0) }
    }
}

/// Re-initialises `lin` as `nn::linear` with the default config does
/// (tch 0.24: the bias U(±1/√in) drawn first, then the weight
/// Kaiming-uniform with ReLU gain, U(±√2·√3/√in)), from a generator seeded
/// with `seed`: the values `manual_seed(seed)` then `nn::linear` gave,
/// whatever other threads draw meanwhile.
pub fn init_linear(lin: &mut tch::nn::Linear, seed: u64) -> Result<()> {
    let size = lin.ws.size();
    let (out, inp) = (size[0], size[1]);
    let mut g = CpuGenerator::new(seed)?;
    let bias_bound = 1.0 / (inp as f64).sqrt();
    let bias = lin
        .bs
        .as_ref()
        .map(|_| g.uniform(&[out], -bias_bound, bias_bound))
        .transpose()?;
    let std = 2f64.sqrt() / (inp as f64).sqrt();
    let bound = 3f64.sqrt() * std;
    let weight = g.uniform(&[out, inp], -bound, bound)?;
    tch::no_grad(|| {
        lin.ws.copy_(&weight);
        if let (Some(bs), Some(b)) = (lin.bs.as_mut(), bias) {
            bs.copy_(&b);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn;

    /// Held by each test here for its whole run: each computes its
    /// reference from the default generator and runs a thread that
    /// reseeds it, so two of them at once would spoil each other's
    /// reference (no other test of this crate's library draws from it).
    static DEFAULT_GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// A thread that reseeds and draws from the default generator until
    /// dropped (also when the test panics, so libtorch is not torn down
    /// under it).
    struct Noise(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        Option<std::thread::JoinHandle<()>>,
    );

    impl Noise {
        fn start() -> Self {
            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let s = stop.clone();
            let h = std::thread::spawn(move || {
                let mut i = 0i64;
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    tch::manual_seed(i);
                    let _ = Tensor::rand([4096], (tch::Kind::Float, Device::Cpu));
                    i += 1;
                }
            });
            Self(stop, Some(h))
        }
    }

    impl Drop for Noise {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(h) = self.1.take() {
                let _ = h.join();
            }
        }
    }

    /// Same values as the default generator after `manual_seed`, and the
    /// same values while another thread reseeds and draws from it.
    #[test]
    fn a_seeded_linear_matches_manual_seed_and_ignores_other_threads() {
        let _one = DEFAULT_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
        let seed = 0x1234_5678_9abc_def0u64;
        let vs = nn::VarStore::new(tch::Device::Cpu);
        tch::manual_seed(seed as i64);
        let reference = nn::linear(vs.root() / "a", 24, 40, Default::default());
        let _noise = Noise::start();
        for k in 0..50 {
            let mut lin = nn::linear(vs.root() / format!("b{k}"), 24, 40, Default::default());
            init_linear(&mut lin, seed).unwrap();
            assert!(lin.ws.equal(&reference.ws), "weight differs (try {k})");
            assert!(
                lin.bs
                    .as_ref()
                    .unwrap()
                    .equal(reference.bs.as_ref().unwrap()),
                "bias differs (try {k})"
            );
        }
    }

    /// Dropout and attention dropout in a scope give bitwise what
    /// libtorch's own give after `manual_seed` with the scope's seed, in
    /// fp32 and under bf16 autocast, whatever another thread meanwhile
    /// does with the default generator; their gradients too (fp32); and a
    /// scope opened inside another gives the outer one back.
    #[test]
    fn scoped_dropout_matches_manual_seed_and_ignores_other_threads() {
        use crate::autocast::{autocast, Reduced};
        let _one = DEFAULT_GENERATOR.lock().unwrap_or_else(|e| e.into_inner());
        let cpu = (tch::Kind::Float, Device::Cpu);
        tch::manual_seed(5);
        let x = Tensor::randn([8, 64, 384], cpu).set_requires_grad(true);
        let (b, h, s, d) = (4, 12, 37, 32);
        // Laid out as the model's heads are: [b, s, h, d] viewed as [b, h, s, d].
        let leaf = || Tensor::randn([b, s, h, d], cpu).set_requires_grad(true);
        let (ql, kl, vl) = (leaf(), leaf(), leaf());
        let (q, k, v) = (ql.transpose(1, 2), kl.transpose(1, 2), vl.transpose(1, 2));
        // Under autocast the model's q, k, v come out of bf16 linears (the
        // mask stays fp32).
        let heads = |bf16: bool| {
            let kind = if bf16 {
                tch::Kind::BFloat16
            } else {
                tch::Kind::Float
            };
            (q.to_kind(kind), k.to_kind(kind), v.to_kind(kind))
        };
        let mask = Tensor::zeros([b, 1, 1, s], cpu);
        let _ = mask.narrow(3, 30, s - 30).fill_(-1e4);
        let scale = 1.0 / (d as f64).sqrt();
        let seed = 0xfeed_beefu64;
        // The gradients of x (through both dropouts) and of q, k, v
        // (through attention) of a loss that weighs every output.
        let grads = |a: &Tensor, a2: &Tensor, att: &Tensor| {
            let w = Tensor::arange(d, cpu) / d as f64;
            let loss = (a * 3.0 + a2).sum(tch::Kind::Float) + (att * w).sum(tch::Kind::Float);
            Tensor::run_backward(&[loss], &[&x, &ql, &kl, &vl], false, false)
        };
        // Reference: the default generator, nothing else drawing.
        let reference = |bf16: bool| {
            tch::manual_seed(seed as i64);
            let run = || {
                let a = x.dropout(0.1, true);
                let a2 = x.dropout(0.1, true);
                let (q, k, v) = heads(bf16);
                let att = Tensor::scaled_dot_product_attention(
                    &q,
                    &k,
                    &v,
                    Some(&mask),
                    0.1,
                    false,
                    scale,
                    false,
                );
                (a, a2, att)
            };
            if bf16 {
                autocast(Device::Cpu, Reduced::Bf16, run).unwrap()
            } else {
                run()
            }
        };
        let refs = [reference(false), reference(true)];
        let grad_ref = grads(&refs[0].0, &refs[0].1, &refs[0].2);
        let _noise = Noise::start();
        for t in 0..10 {
            for (bf16, (ra, ra2, ratt)) in [false, true].into_iter().zip(&refs) {
                let scope = seeded_dropout(seed).unwrap();
                let run = || {
                    let a = dropout(&x, 0.1, true);
                    let a2 = dropout(&x, 0.1, true);
                    let (q, k, v) = heads(bf16);
                    let att =
                        attention_dropout(&q, &k, &v, &mask, 0.1, scale).expect("a scope is open");
                    (a, a2, att)
                };
                let (a, a2, att) = if bf16 {
                    autocast(Device::Cpu, Reduced::Bf16, run).unwrap()
                } else {
                    run()
                };
                drop(scope);
                assert!(
                    a.equal(ra) && a2.equal(ra2),
                    "dropout differs (try {t}, bf16 {bf16})"
                );
                assert_eq!(att.kind(), ratt.kind());
                assert!(
                    att.equal(ratt),
                    "attention dropout differs (try {t}, bf16 {bf16})"
                );
                if !bf16 {
                    let g = grads(&a, &a2, &att);
                    for (n, (g, r)) in ["x", "q", "k", "v"].iter().zip(g.iter().zip(&grad_ref)) {
                        assert!(g.equal(r), "gradient of {n} differs (try {t})");
                    }
                }
            }
        }
        assert!(
            attention_dropout(&q, &k, &v, &mask, 0.1, scale).is_none(),
            "the scope is closed"
        );
        let outer = seeded_dropout(seed).unwrap();
        let first = dropout(&x, 0.1, true);
        drop(seeded_dropout(1).unwrap());
        let second = dropout(&x, 0.1, true);
        drop(outer);
        assert!(first.equal(&refs[0].0), "the outer scope's first draw");
        assert!(
            second.equal(&refs[0].1),
            "the outer scope's generator is back"
        );
    }
}
