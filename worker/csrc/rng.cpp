// A CPU random generator of the caller's own, for draws that must not
// depend on libtorch's process-wide default generator: several trainers
// of one process (`distill run --workers N` runs its ranks as threads)
// reseed and draw from that one generator at once, so a draw made after
// `manual_seed` on one thread may take values another thread's draw was
// meant to have. tch exposes no `at::Generator`; this shim makes a
// `CPUGeneratorImpl` (the same Mersenne Twister, seeded the same way, as
// the default CPU generator after `manual_seed(seed)`, so its draws equal
// the ones `manual_seed(seed)` followed by the same draws gave) and fills
// fresh CPU tensors from it. Called from worker/src/rng.rs; every function
// catches C++ exceptions and returns null with the message in `err`.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/autocast_mode.h>

#include <cmath>

#include "shim.h"

using distill_shim::set_err;

namespace {
// The scaled Bernoulli(1 − p) noise ATen's CPU dropout multiplies by
// (`_dropout_impl`): a tensor like `like`, filled from `gen`, divided by
// 1 − p.
at::Tensor noise_like(const at::Tensor& like, double p, at::Generator& gen) {
  auto noise = at::empty_like(like);
  noise.bernoulli_(1 - p, gen);
  noise.div_(1 - p);
  return noise;
}
}  // namespace

extern "C" {

// A generator seeded with `seed`; free it with `distill_gen_free`.
void* distill_gen_new(uint64_t seed, char* err, int errlen) {
  try {
    return new at::Generator(at::make_generator<at::CPUGeneratorImpl>(seed));
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
  } catch (...) {
    set_err(err, errlen, "unknown C++ exception");
  }
  return nullptr;
}

void distill_gen_free(void* gen) { delete static_cast<at::Generator*>(gen); }

// A new fp32 CPU tensor of shape `sizes[0..ndim]`, drawn U(lo, hi) from
// `gen` (as `Tensor::uniform_` draws from the default generator; the
// kernel takes the generator's own lock).
at::Tensor* distill_gen_uniform(void* gen, const int64_t* sizes, int ndim, double lo, double hi,
                                char* err, int errlen) {
  try {
    auto* g = static_cast<at::Generator*>(gen);
    auto t = at::empty(at::IntArrayRef(sizes, static_cast<size_t>(ndim)), at::kFloat);
    t.uniform_(lo, hi, *g);
    return new at::Tensor(std::move(t));
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
  } catch (...) {
    set_err(err, errlen, "unknown C++ exception");
  }
  return nullptr;
}

// Dropout of `x` with drop probability `p` (0 < p < 1) drawn from `gen`:
// the ops, in the order, of ATen's CPU `dropout` (`_dropout_impl`: a
// Bernoulli(1 − p) noise tensor like `x`, divided by 1 − p, times `x`), so
// with `gen` in the default generator's state the result is bitwise what
// `x.dropout(p, true)` gives. Differentiable: the product is recorded by
// autograd like any ATen op.
at::Tensor* distill_gen_dropout(void* gen, const at::Tensor* x, double p, char* err, int errlen) {
  try {
    auto* g = static_cast<at::Generator*>(gen);
    return new at::Tensor(*x * noise_like(*x, p, *g));
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
  } catch (...) {
    set_err(err, errlen, "unknown C++ exception");
  }
  return nullptr;
}

// Scaled dot-product attention with dropout on the attention probabilities
// drawn from `gen`: `q`, `k`, `v` are [batch, heads, seq, head_dim], `mask`
// is additive. On the CPU, `at::scaled_dot_product_attention` with
// dropout runs its math kernel, which draws from the default generator;
// this is that kernel's computation, op for op (inputs in fp32 when they
// are bf16/fp16, q and k each scaled by √scale, the mask added, softmax,
// dropout, times v, back to the input dtype; the softmax is
// `_safe_softmax`, 0 on a row masked everywhere), so with `gen` in the
// default generator's state the result is bitwise SDPA's. The caller
// (rng.rs) passes only what SDPA accepts as is: a float mask of q's dtype,
// a positive scale, non-empty tensors. Under CPU autocast the
// inputs are first cast as autocast casts SDPA's (to its dtype) and the
// body runs with autocast off, as SDPA's kernel does.
at::Tensor* distill_gen_attention_dropout(void* gen, const at::Tensor* q, const at::Tensor* k,
                                          const at::Tensor* v, const at::Tensor* mask, double p,
                                          double scale, char* err, int errlen) {
  try {
    auto* g = static_cast<at::Generator*>(gen);
    at::Tensor qc = *q, kc = *k, vc = *v, mc = *mask;
    if (at::autocast::is_autocast_enabled(at::kCPU)) {
      auto dt = at::autocast::get_autocast_dtype(at::kCPU);
      auto cast = [&](const at::Tensor& t) {
        return t.is_floating_point() && t.scalar_type() != at::kDouble ? t.to(dt) : t;
      };
      qc = cast(qc);
      kc = cast(kc);
      vc = cast(vc);
      mc = cast(mc);
    }
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::DispatchKeySet(c10::DispatchKey::AutocastCPU));
    auto origin = qc.scalar_type();
    bool low = origin == at::kHalf || origin == at::kBFloat16;
    auto qa = low ? qc.to(at::kFloat) : qc;
    auto ka = low ? kc.to(at::kFloat) : kc;
    auto va = low ? vc.to(at::kFloat) : vc;
    double sf = std::sqrt(scale);
    auto attn = at::matmul(qa * sf, ka.transpose(-2, -1) * sf) + mc;
    attn = at::_safe_softmax(attn, -1);
    return new at::Tensor(at::matmul(attn * noise_like(attn, p, *g), va).to(origin));
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
  } catch (...) {
    set_err(err, errlen, "unknown C++ exception");
  }
  return nullptr;
}
}
