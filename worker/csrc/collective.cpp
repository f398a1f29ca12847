// PyTorch's own c10d collectives for the worker: a TCPStore rendezvous,
// a PrefixStore per group generation, and ProcessGroupGloo (compiled into
// libtorch_cpu) for CPU tensors, or ProcessGroupNCCL (libtorch_cuda) for
// CUDA tensors when built with DISTILL_NCCL (the worker's `nccl` feature).
// Called from worker/src/collective.rs.
//
// Every function catches C++ exceptions and reports failure through its
// return value, with the message copied into `err` (NUL-terminated,
// truncated to `errlen`). Every collective waits at most the group's
// timeout: a dead peer (connection reset) fails at once, a frozen one at
// the deadline; nothing waits forever.
#include <algorithm>
#include <chrono>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "shim.h"

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef DISTILL_NCCL
#include <cstdlib>
#include <thread>

#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> pg;
  std::chrono::milliseconds timeout;
  bool nccl;
  // Gloo runs this many collectives at once (its worker threads); a large
  // all-reduce is issued as this many concurrent chunks.
  int chunks;
};

// A chunk of a split all-reduce is at least this large: below it, the
// per-collective cost outweighs what the second thread gains. This rule
// and the chunk count are part of the collective protocol
// (distill_proto::COLLECTIVE_PROTOCOL): every rank must split alike.
constexpr int64_t kChunkMinBytes = 1 << 20;

using distill_shim::set_err;

// Every collective is issued (not waited for) under one process-wide
// lock. c10d's flight recorder (torch 2.11, FlightRecorderDetail.hpp,
// `recordWithResetEnabled`) registers a group on its first collective by
// inserting into a process-wide map *before* taking its own lock, so two
// groups of one process issuing their first collectives at once corrupt
// the map (SIGSEGV in `_Rb_tree_insert_and_rebalance`). One process holds
// several groups when `distill run --workers N` runs its ranks side by
// side, and while a failed group is freed as the next one forms.
template <class F>
auto issue(F&& f) -> decltype(f()) {
  static std::mutex lock;
  std::lock_guard<std::mutex> guard(lock);
  return f();
}

// Waits for `work` until it completes, `deadline` (the call's start plus
// the group's timeout) passes, or
// `*abort` becomes non-zero (checked every 20 ms; the Rust side sets it
// when the coordinator says the group changed). 0 on success; -1 on
// error or timeout; -2 when aborted. An aborted or timed-out operation
// may still be in flight in Gloo's threads: the group must not be used
// again (the Rust side frees it off-thread).
int wait_work(Group* g, const c10::intrusive_ptr<c10d::Work>& work, const unsigned char* abort,
              const char* what, char* err, int errlen,
              std::chrono::steady_clock::time_point deadline) {
#ifdef DISTILL_NCCL
  if (g->nccl) {
    // NCCL's own timed wait marks the work failed at the slice's end (and
    // its watchdog may then tear the process down): poll completion
    // instead, and abort the communicator (ncclCommAbort) on an abort or
    // at the deadline, so the kernel waiting on a lost peer exits.
    for (;;) {
      if (work->isCompleted()) {
        try {
          work->wait();  // orders the current stream after the collective
          return 0;
        } catch (const std::exception& e) {
          set_err(err, errlen, e.what());
          return -1;
        }
      }
      bool aborted = abort != nullptr && __atomic_load_n(abort, __ATOMIC_RELAXED) != 0;
      bool late = std::chrono::steady_clock::now() >= deadline;
      if (aborted || late) {
        try {
          g->pg->abort();
        } catch (...) {
        }
        set_err(err, errlen,
                aborted ? std::string(what) + " aborted: the training group changed"
                        : std::string(what) + " did not complete within the group timeout of " +
                              std::to_string(g->timeout.count()) + " ms");
        return aborted ? -2 : -1;
      }
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }
#endif
  for (;;) {
    try {
      if (work->wait(std::chrono::milliseconds(20))) return 0;
      set_err(err, errlen, std::string(what) + " was aborted");
      return -1;
    } catch (const std::exception&) {
      // The slice ran out (c10d throws "Operation timed out!"), or the
      // operation failed: only a completed work's outcome counts, and it
      // may have completed just after the slice ran out.
    }
    if (work->isCompleted()) {
      try {
        work->wait();
        return 0;
      } catch (const std::exception& e) {
        set_err(err, errlen, e.what());
        return -1;
      }
    }
    if (abort != nullptr && __atomic_load_n(abort, __ATOMIC_RELAXED) != 0) {
      set_err(err, errlen, std::string(what) + " aborted: the training group changed");
      return -2;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      set_err(err, errlen,
              std::string(what) + " did not complete within the group timeout of " +
                  std::to_string(g->timeout.count()) + " ms");
      return -1;
    }
  }
}

// Waits for every all-reduce of `works` (see `wait_work`); the first
// failure ends the wait, and the group is then not used again.
int wait_all(Group* g, const std::vector<c10::intrusive_ptr<c10d::Work>>& works,
             const unsigned char* abort, char* err, int errlen,
             std::chrono::steady_clock::time_point deadline) {
  for (auto& w : works) {
    int rc = wait_work(g, w, abort, "all-reduce", err, errlen, deadline);
    if (rc != 0) return rc;
  }
  return 0;
}

// Issues the sum of the contiguous tensor `src` over the group, not
// waiting for it. A large tensor goes as up to `chunks` all-reduces
// issued at once, which Gloo's worker threads run side by side (one ring
// all-reduce alternates between sending and summing and leaves a core
// idle). Every rank splits the same size the same way and issues the
// chunks in the same order, which is how Gloo pairs them; with two ranks
// each element's sum is the one the whole tensor gets. A small tensor
// goes whole, as one all-reduce.
std::vector<c10::intrusive_ptr<c10d::Work>> issue_allreduce(c10d::Backend& pg, int chunks,
                                                            std::chrono::milliseconds timeout,
                                                            const at::Tensor& src) {
  c10d::AllreduceOptions o;
  o.reduceOp = c10d::ReduceOp::SUM;
  o.timeout = timeout;
  int64_t bytes = src.numel() * static_cast<int64_t>(src.element_size());
  int64_t k = std::max<int64_t>(1, std::min<int64_t>(chunks, bytes / kChunkMinBytes));
  std::vector<std::vector<at::Tensor>> parts;
  if (k == 1) {
    parts.push_back({src});
  } else {
    auto flat = src.view({-1});
    int64_t n = flat.numel(), per = (n + k - 1) / k;
    for (int64_t off = 0; off < n; off += per) {
      parts.push_back({flat.narrow(0, off, std::min(per, n - off))});
    }
  }
  // Issued under one hold of the lock (see `issue`).
  return issue([&] {
    std::vector<c10::intrusive_ptr<c10d::Work>> ws;
    for (auto& part : parts) ws.push_back(pg.allreduce(part, o));
    return ws;
  });
}

// Gradient all-reduce that overlaps backward (DDP's Reducer, reduced to
// what the trainer needs). Hooks on the parameters' gradients copy each
// gradient, as it is computed, into its slot of one flat fp32 buffer;
// once every parameter of a bucket has arrived, and every earlier bucket
// has been issued, the bucket's all-reduce is issued at once and runs in
// Gloo's threads while backward goes on. Buckets are issued strictly in
// their index order on every rank, whatever order the gradients arrive
// in, so the ranks pair the same collectives. `finish` fills what never
// arrived, issues the rest in order and waits. The state holds the
// process group by reference count, so it never outlives what it issues
// on.
struct Reducer {
  c10::intrusive_ptr<c10d::Backend> pg;
  int chunks;
  std::chrono::milliseconds timeout;
  std::vector<at::Tensor> params;
  std::vector<unsigned> hook_ids;
  std::vector<int64_t> offset, numel;
  std::vector<int> bucket_of;
  std::vector<int64_t> bucket_start, bucket_len;
  // The flat fp32 buffer (the Rust side's tensor): the sums land here.
  at::Tensor flat;
  std::mutex mu;
  bool armed = false;
  // Per parameter: what earlier micro-batches accumulated (undefined: none).
  std::vector<at::Tensor> prior;
  std::vector<char> arrived;
  std::vector<int> missing;
  size_t next = 0;
  std::vector<c10::intrusive_ptr<c10d::Work>> works;
  std::string error;

  // Issues buckets from `next` on while they are complete (`mu` held).
  void issue_ready() {
    while (next < bucket_start.size() && missing[next] == 0 && error.empty()) {
      try {
        auto part = flat.narrow(0, bucket_start[next], bucket_len[next]);
        for (auto& w : issue_allreduce(*pg, chunks, timeout, part)) works.push_back(w);
      } catch (const std::exception& e) {
        error = e.what();
        return;
      }
      ++next;
    }
  }

  // Puts `value` (undefined: zeros) in parameter i's slot and counts it
  // as arrived (`mu` held).
  void place(size_t i, const at::Tensor& value) {
    at::NoGradGuard no_grad;
    auto dst = flat.narrow(0, offset[i], numel[i]);
    if (value.defined()) {
      dst.copy_(value.reshape({-1}));
    } else {
      dst.zero_();
    }
    arrived[i] = 1;
    --missing[bucket_of[i]];
  }

  void arrive(size_t i, const at::Tensor& grad) {
    std::lock_guard<std::mutex> guard(mu);
    if (!armed || !error.empty()) return;
    if (arrived[i]) {
      error = "parameter " + std::to_string(i) + "'s gradient arrived twice in one backward";
      return;
    }
    try {
      place(i, prior[i].defined() ? prior[i] + grad : grad);
    } catch (const std::exception& e) {
      error = e.what();
      return;
    }
    issue_ready();
  }
};

}  // namespace

extern "C" {

// Whether this build has ProcessGroupNCCL.
int distill_have_nccl() {
#ifdef DISTILL_NCCL
  return 1;
#else
  return 0;
#endif
}

// A group: `rank` of `world`, rendezvous at the TCPStore on host:port
// (hosted by this process when `is_master`), keys under `prefix` (one
// prefix per generation, so a re-formed group never reads an old one's
// keys). `backend` 0 is Gloo (`bind_host` is the address its transport
// listens on); 1 is NCCL on CUDA device `cuda_device` (the communicator
// is made at once, its unique id passed through the store). Null on
// error.
void* distill_pg_new(const char* host, int port, int is_master, const char* prefix,
                       const char* bind_host, int rank, int world, int timeout_ms, int backend,
                       int cuda_device, char* err, int errlen) {
  try {
    auto timeout = std::chrono::milliseconds(timeout_ms);
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<uint16_t>(port);
    opts.isServer = is_master != 0;
    opts.numWorkers = world;
    opts.waitWorkers = false;
    opts.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    if (backend == 1) {
#ifdef DISTILL_NCCL
      // Errors are ours to handle (the collective returns them, and the
      // elastic loop re-forms the group): the watchdog only cleans up
      // and never ends the process. Its own deadline is kept past ours.
      setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2", 0);
      auto options = c10d::ProcessGroupNCCL::Options::create();
      options->timeout = timeout + std::chrono::milliseconds(60000);
      auto dev = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(cuda_device));
      auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
      pg->setBoundDeviceId(dev);
      pg->eagerConnectSingleDevice(dev);
      return new Group{store, pg, timeout, true, 1};
#else
      set_err(err, errlen,
              "this build has no NCCL: build the worker with the `nccl` feature "
              "(scripts/gpu/build.sh), or use the gloo backend");
      return nullptr;
#endif
    }
    auto options = c10d::ProcessGroupGloo::Options::create();
    options->timeout = timeout;
    options->devices.push_back(
        c10d::ProcessGroupGloo::createDeviceForHostname(std::string(bind_host)));
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    int chunks = std::max(1, options->threads);
    return new Group{store, pg, timeout, false, chunks};
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return nullptr;
  } catch (...) {
    set_err(err, errlen, "unknown C++ exception");
    return nullptr;
  }
}

// Sums `t` (a CPU tensor, contiguous) over the group, in place. 0 on
// success, -1 on error (timeout, a peer gone), -2 when aborted.
int distill_pg_allreduce_sum(void* group, at::Tensor* t, const unsigned char* abort, char* err,
                               int errlen) {
  try {
    auto* g = static_cast<Group*>(group);
    auto deadline = std::chrono::steady_clock::now() + g->timeout;
    // Chunks are views of a contiguous copy when `t` is not contiguous
    // (the Rust side passes contiguous tensors).
    auto src = t->is_contiguous() ? *t : t->contiguous();
    int rc = wait_all(g, issue_allreduce(*g->pg, g->chunks, g->timeout, src), abort, err, errlen,
                      deadline);
    if (rc != 0) return rc;
    if (!src.is_same(*t)) t->copy_(src);
    return 0;
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return -1;
  } catch (...) {
    set_err(err, errlen, "unknown C++ exception");
    return -1;
  }
}

// Copies `t` of rank `root` into `t` of every rank.
int distill_pg_broadcast(void* group, at::Tensor* t, int root, const unsigned char* abort,
                           char* err, int errlen) {
  try {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.rootTensor = 0;
    o.timeout = g->timeout;
    return wait_work(g, issue([&] { return g->pg->broadcast(ts, o); }), abort, "broadcast", err,
                     errlen, std::chrono::steady_clock::now() + g->timeout);
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return -1;
  } catch (...) {
    set_err(err, errlen, "unknown C++ exception");
    return -1;
  }
}

// Waits until every rank reaches the barrier (or the timeout).
int distill_pg_barrier(void* group, const unsigned char* abort, char* err, int errlen) {
  try {
    auto* g = static_cast<Group*>(group);
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    return wait_work(g, issue([&] { return g->pg->barrier(o); }), abort, "barrier", err, errlen,
                     std::chrono::steady_clock::now() + g->timeout);
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return -1;
  } catch (...) {
    set_err(err, errlen, "unknown C++ exception");
    return -1;
  }
}

// A TCPStore server on host:port (port 0: any free port, written to
// `*bound_port`) that lives until `distill_store_free`: a worker's own
// rendezvous point for every group it leads, so no port is re-bound per
// generation. Null on error.
void* distill_store_serve(const char* host, int port, int* bound_port, char* err, int errlen) {
  try {
    c10d::TCPStoreOptions opts;
    opts.port = static_cast<uint16_t>(port);
    opts.isServer = true;
    opts.waitWorkers = false;
    auto* store = new c10::intrusive_ptr<c10d::TCPStore>(
        c10::make_intrusive<c10d::TCPStore>(std::string(host), opts));
    if (bound_port != nullptr) *bound_port = (*store)->getPort();
    return store;
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return nullptr;
  } catch (...) {
    set_err(err, errlen, "unknown C++ exception");
    return nullptr;
  }
}

void distill_store_free(void* store) {
  try {
    delete static_cast<c10::intrusive_ptr<c10d::TCPStore>*>(store);
  } catch (...) {
  }
}

void distill_pg_free(void* group) {
  try {
    delete static_cast<Group*>(group);
  } catch (...) {
  }
}

// A reducer over `n` parameters (in the order their gradients are
// expected: the last layer's first) of `group`, summing into `flat` (fp32,
// contiguous, one slot per parameter in that order), in buckets of about
// `bucket_elems` elements (a parameter is never split). Gloo on CPU
// tensors only. Null on error.
void* distill_reducer_new(void* group, at::Tensor** params, int n, at::Tensor* flat,
                          int64_t bucket_elems, char* err, int errlen) {
  try {
    auto* g = static_cast<Group*>(group);
    if (g->nccl) {
      set_err(err, errlen, "the overlapping reducer takes Gloo groups only");
      return nullptr;
    }
    auto r = std::make_shared<Reducer>();
    r->pg = g->pg;
    r->chunks = g->chunks;
    r->timeout = g->timeout;
    r->flat = *flat;
    int64_t off = 0;
    for (int i = 0; i < n; ++i) {
      auto& p = *params[i];
      int64_t len = p.numel();
      if (r->bucket_start.empty() || (r->bucket_len.back() > 0 && r->bucket_len.back() + len > bucket_elems)) {
        r->bucket_start.push_back(off);
        r->bucket_len.push_back(0);
      }
      r->params.push_back(p);
      r->offset.push_back(off);
      r->numel.push_back(len);
      r->bucket_of.push_back(static_cast<int>(r->bucket_start.size()) - 1);
      r->bucket_len.back() += len;
      off += len;
    }
    if (off != flat->numel() || flat->scalar_type() != at::kFloat || !flat->is_contiguous() ||
        !flat->device().is_cpu()) {
      set_err(err, errlen,
              "the reducer's buffer must be a contiguous CPU fp32 tensor of " +
                  std::to_string(off) + " elements");
      return nullptr;
    }
    // `arm` sets the per-backward state; the hooks do nothing before it.
    r->prior.resize(n);
    auto* holder = new std::shared_ptr<Reducer>(r);
    std::weak_ptr<Reducer> weak = r;
    for (int i = 0; i < n; ++i) {
      size_t idx = static_cast<size_t>(i);
      r->hook_ids.push_back(r->params[idx].register_hook([weak, idx](const at::Tensor& grad) {
        if (auto s = weak.lock()) s->arrive(idx, grad);
      }));
    }
    return holder;
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return nullptr;
  }
}

// Arms the reducer for the next backward: the hooks reduce from now on.
// `prior[i]` (null: none) is what earlier micro-batches accumulated for
// parameter i; it is added to the gradient before the sum.
int distill_reducer_arm(void* reducer, at::Tensor** prior, char* err, int errlen) {
  try {
    auto& r = **static_cast<std::shared_ptr<Reducer>*>(reducer);
    std::lock_guard<std::mutex> guard(r.mu);
    size_t n = r.params.size();
    for (size_t i = 0; i < n; ++i) {
      r.prior[i] = prior[i] != nullptr ? *prior[i] : at::Tensor();
    }
    r.arrived.assign(n, 0);
    r.missing.assign(r.bucket_start.size(), 0);
    for (size_t i = 0; i < n; ++i) ++r.missing[r.bucket_of[i]];
    r.next = 0;
    r.works.clear();
    r.error.clear();
    r.armed = true;
    return 0;
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return -1;
  }
}

// Ends the armed backward: a parameter whose gradient never arrived takes
// its prior (or zeros), and `defined[i]` says whether it had either; the
// buckets not yet issued are issued in order, and every all-reduce is
// waited for (the group's timeout from now; `abort` as for the other
// collectives). 0 on success, -1 on error, -2 when aborted.
int distill_reducer_finish(void* reducer, void* group, const unsigned char* abort,
                           unsigned char* defined, char* err, int errlen) {
  try {
    auto& r = **static_cast<std::shared_ptr<Reducer>*>(reducer);
    auto* g = static_cast<Group*>(group);
    std::vector<c10::intrusive_ptr<c10d::Work>> works;
    {
      std::lock_guard<std::mutex> guard(r.mu);
      r.armed = false;
      size_t n = r.params.size();
      for (size_t i = 0; i < n; ++i) {
        defined[i] = r.arrived[i] || r.prior[i].defined();
        if (!r.arrived[i]) r.place(i, r.prior[i]);
      }
      r.issue_ready();
      for (auto& p : r.prior) p = at::Tensor();
      works.swap(r.works);
      if (!r.error.empty()) {
        set_err(err, errlen, "all-reduce: " + r.error);
        return -1;
      }
    }
    return wait_all(g, works, abort, err, errlen, std::chrono::steady_clock::now() + g->timeout);
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return -1;
  } catch (...) {
    set_err(err, errlen, "unknown C++ exception");
    return -1;
  }
}

// How many buckets have been issued since the reducer was last armed.
int distill_reducer_issued(void* reducer) {
  auto& r = **static_cast<std::shared_ptr<Reducer>*>(reducer);
  std::lock_guard<std::mutex> guard(r.mu);
  return static_cast<int>(r.next);
}

// How many buckets the reducer has.
int distill_reducer_buckets(void* reducer) {
  auto& r = **static_cast<std::shared_ptr<Reducer>*>(reducer);
  return static_cast<int>(r.bucket_start.size());
}

// Removes the hooks and drops the reducer (an all-reduce still in flight
// keeps what it needs alive).
void distill_reducer_free(void* reducer) {
  try {
    auto* holder = static_cast<std::shared_ptr<Reducer>*>(reducer);
    {
      auto& r = **holder;
      std::lock_guard<std::mutex> guard(r.mu);
      r.armed = false;
      for (size_t i = 0; i < r.params.size(); ++i) r.params[i].remove_hook(r.hook_ids[i]);
    }
    delete holder;
  } catch (...) {
  }
}

}  // extern "C"
