// PyTorch's x86 dynamic-INT8 linear kernels (FBGEMM), which libtorch
// exports as ATen functions but tch does not wrap:
// `at::fbgemm_pack_quantized_matrix` packs an int8 weight once, and
// `at::fbgemm_linear_int8_weight_fp32_activation` quantizes each incoming
// batch of fp32 activations to uint8 with its own scale (per batch) and runs
// the int8 GEMM. Called from worker/src/quant.rs; every function catches C++
// exceptions and returns null with the message in `err`.
#include <ATen/ATen.h>

#include "shim.h"

#include <cstring>
#include <string>

namespace {
// FBGEMM's legacy entry points warn once that they are deprecated; the
// warning would reach every user's log, so it is dropped here (the kernels
// are pinned with libtorch 2.11).
struct Quiet : c10::WarningHandler {
  void process(const c10::Warning&) override {}
};
Quiet quiet;

using distill_shim::set_err;
}  // namespace

extern "C" {

// Whether this libtorch was built with FBGEMM (x86 only).
int distill_fbgemm_available() {
  try {
    for (auto e : at::Context::supportedQEngines()) {
      if (e == at::QEngine::FBGEMM) return 1;
    }
    return 0;
  } catch (...) {
    return 0;
  }
}

// Packs an int8 `[out, in]` weight for the FBGEMM GEMM.
at::Tensor* distill_fbgemm_pack(const at::Tensor* weight, char* err, int errlen) {
  try {
    c10::WarningUtils::WarningHandlerGuard guard(&quiet);
    return new at::Tensor(at::fbgemm_pack_quantized_matrix(*weight));
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
  } catch (...) {
    set_err(err, errlen, "unknown C++ exception");
  }
  return nullptr;
}

// y = dequant(quant(x)) · (weight_scale · (q - zero_point))ᵀ + bias, with
// the activation quantized per call; `col_offsets` (int32 `[out]`) is the
// row sum of the int8 weight.
at::Tensor* distill_fbgemm_linear(const at::Tensor* input, const at::Tensor* weight,
                                  const at::Tensor* packed, const at::Tensor* col_offsets,
                                  double weight_scale, int64_t weight_zero_point,
                                  const at::Tensor* bias, char* err, int errlen) {
  try {
    c10::WarningUtils::WarningHandlerGuard guard(&quiet);
    return new at::Tensor(at::fbgemm_linear_int8_weight_fp32_activation(
        *input, *weight, *packed, *col_offsets, weight_scale, weight_zero_point, *bias));
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
  } catch (...) {
    set_err(err, errlen, "unknown C++ exception");
  }
  return nullptr;
}
}
