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
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.timeout = g->timeout;
    // A large tensor goes as `chunks` all-reduces issued at once, which
    // Gloo's worker threads run side by side (one ring all-reduce
    // alternates between sending and summing and leaves a core idle).
    // Every rank splits the same size the same way, whatever its tensor's
    // layout, and issues the chunks in the same order, which is how Gloo
    // pairs them; with two ranks each element's sum is the one the whole
    // tensor gets. A small tensor goes whole, as one all-reduce.
    int64_t bytes = t->numel() * static_cast<int64_t>(t->element_size());
    int64_t k = std::max<int64_t>(1, std::min<int64_t>(g->chunks, bytes / kChunkMinBytes));
    // Chunks are views of a contiguous copy when `t` is not contiguous
    // (the Rust side passes contiguous tensors).
    auto src = k == 1 || t->is_contiguous() ? *t : t->contiguous();
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
    auto works = issue([&] {
      std::vector<c10::intrusive_ptr<c10d::Work>> ws;
      for (auto& part : parts) ws.push_back(g->pg->allreduce(part, o));
      return ws;
    });
    // The first failure ends the call: the group is then not used again.
    for (auto& w : works) {
      int rc = wait_work(g, w, abort, "all-reduce", err, errlen, deadline);
      if (rc != 0) return rc;
    }
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

}  // extern "C"
