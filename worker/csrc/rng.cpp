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

#include "shim.h"

using distill_shim::set_err;

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
}
