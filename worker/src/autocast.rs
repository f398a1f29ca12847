//! Mixed-precision autocast (bf16 on CPU and CUDA) through a small C++ shim
//! (`csrc/autocast.cpp`): tch only toggles CUDA autocast at its default
//! fp16, with no way to choose bf16 or the CPU.
//!
//! Inside [`autocast`], libtorch runs the ops on its lower-precision list
//! (matmul, linear, scaled-dot-product attention, …) in the reduced dtype
//! and keeps precision-sensitive ones (softmax, norms, losses) in fp32;
//! parameters stay fp32 (they are the master weights the optimiser
//! updates). The state is restored on exit, also when `f` panics.

use crate::{Error, Result};
use std::os::raw::c_int;
use tch::Device;

extern "C" {
    fn distill_autocast_enter(device: c_int, dtype: c_int, prev_dtype: *mut c_int) -> c_int;
    fn distill_autocast_exit(device: c_int, prev_enabled: c_int, prev_dtype: c_int) -> c_int;
    fn distill_autocast_is_enabled(device: c_int) -> c_int;
}

/// The reduced precision to autocast to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduced {
    Bf16,
    Fp16,
}

fn device_code(device: Device) -> Result<c_int> {
    match device {
        Device::Cpu => Ok(0),
        Device::Cuda(_) => Ok(1),
        other => Err(Error::Invalid(format!(
            "training.precision: autocast is not supported on device {other:?} (cpu and cuda are)"
        ))),
    }
}

struct Guard {
    device: c_int,
    prev_enabled: c_int,
    prev_dtype: c_int,
}

impl Drop for Guard {
    fn drop(&mut self) {
        // SAFETY: plain C calls with integer arguments; the shim catches
        // every C++ exception.
        let rc = unsafe { distill_autocast_exit(self.device, self.prev_enabled, self.prev_dtype) };
        if rc != 0 {
            tracing::error!("libtorch refused to leave an autocast region");
        }
    }
}

/// Runs `f` with autocast to `dtype` enabled on `device`'s type.
pub fn autocast<T>(device: Device, dtype: Reduced, f: impl FnOnce() -> T) -> Result<T> {
    let code = device_code(device)?;
    let mut prev_dtype: c_int = 2;
    let d = match dtype {
        Reduced::Bf16 => 0,
        Reduced::Fp16 => 1,
    };
    // SAFETY: as above; `prev_dtype` outlives the call.
    let prev_enabled = unsafe { distill_autocast_enter(code, d, &mut prev_dtype) };
    if prev_enabled < 0 {
        return Err(Error::Invalid(format!(
            "training.precision: libtorch cannot autocast to {dtype:?} on {device:?}"
        )));
    }
    let _guard = Guard {
        device: code,
        prev_enabled,
        prev_dtype,
    };
    Ok(f())
}

/// Whether autocast is on for `device`'s type right now.
pub fn is_enabled(device: Device) -> bool {
    device_code(device).is_ok_and(|c| unsafe { distill_autocast_is_enabled(c) } == 1)
}

/// Runs `f` under autocast when `precision` is set, plainly otherwise.
pub fn maybe<T>(device: Device, precision: Option<Reduced>, f: impl FnOnce() -> T) -> Result<T> {
    match precision {
        Some(p) => autocast(device, p, f),
        None => Ok(f()),
    }
}
