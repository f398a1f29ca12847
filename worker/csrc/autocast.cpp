// Mixed-precision autocast for one device type, which tch does not expose
// (its `tch::autocast` only toggles CUDA autocast at the default fp16).
// Called from worker/src/autocast.rs; every function catches C++ exceptions
// and reports failure through its return value.
#include <ATen/autocast_mode.h>

namespace {
c10::DeviceType device_type(int device) {
  return device == 1 ? c10::DeviceType::CUDA : c10::DeviceType::CPU;
}
}  // namespace

extern "C" {

// Enables autocast on `device` (0 CPU, 1 CUDA) to `dtype` (0 bf16, 1 fp16).
// Returns the previous enabled state (0/1) or -1 on error; the previous
// dtype is written to `prev_dtype` (0 bf16, 1 fp16, 2 other).
int distill_autocast_enter(int device, int dtype, int* prev_dtype) {
  try {
    auto dt = device_type(device);
    bool prev = at::autocast::is_autocast_enabled(dt);
    auto pd = at::autocast::get_autocast_dtype(dt);
    *prev_dtype = pd == at::kBFloat16 ? 0 : (pd == at::kHalf ? 1 : 2);
    at::autocast::set_autocast_dtype(dt, dtype == 0 ? at::kBFloat16 : at::kHalf);
    at::autocast::set_autocast_enabled(dt, true);
    at::autocast::increment_nesting();
    return prev ? 1 : 0;
  } catch (...) {
    return -1;
  }
}

// Restores what `distill_autocast_enter` returned; clears the cast cache
// when the outermost region ends. Returns 0, or -1 on error.
int distill_autocast_exit(int device, int prev_enabled, int prev_dtype) {
  try {
    auto dt = device_type(device);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(dt, prev_enabled == 1);
    if (prev_dtype == 0 || prev_dtype == 1) {
      at::autocast::set_autocast_dtype(dt, prev_dtype == 0 ? at::kBFloat16 : at::kHalf);
    }
    return 0;
  } catch (...) {
    return -1;
  }
}

// Whether autocast is on for `device` right now (for tests and logs).
int distill_autocast_is_enabled(int device) {
  try {
    return at::autocast::is_autocast_enabled(device_type(device)) ? 1 : 0;
  } catch (...) {
    return -1;
  }
}
}
