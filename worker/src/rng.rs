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

use crate::{Error, Result};
use std::os::raw::{c_char, c_int, c_void};
use tch::Tensor;

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

    /// Same values as the default generator after `manual_seed`, and the
    /// same values while another thread reseeds and draws from it.
    #[test]
    fn a_seeded_linear_matches_manual_seed_and_ignores_other_threads() {
        let seed = 0x1234_5678_9abc_def0u64;
        let vs = nn::VarStore::new(tch::Device::Cpu);
        tch::manual_seed(seed as i64);
        let reference = nn::linear(vs.root() / "a", 24, 40, Default::default());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let noise = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut i = 0i64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    tch::manual_seed(i);
                    let _ = Tensor::rand([4096], (tch::Kind::Float, tch::Device::Cpu));
                    i += 1;
                }
            })
        };
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
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        noise.join().unwrap();
    }
}
