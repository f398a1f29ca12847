// PyTorch's own c10d collectives for the worker: a TCPStore rendezvous,
// a PrefixStore per group generation, and ProcessGroupGloo (compiled into
// libtorch_cpu) for CPU tensors. Called from worker/src/collective.rs.
//
// Every function catches C++ exceptions and reports failure through its
// return value, with the message copied into `err` (NUL-terminated,
// truncated to `errlen`). Every collective waits at most the group's
// timeout: a dead peer (connection reset) fails at once, a frozen one at
// the deadline; nothing waits forever.
#include <chrono>
#include <cstring>
#include <string>

#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

namespace {

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::ProcessGroupGloo> pg;
  std::chrono::milliseconds timeout;
};

void set_err(char* err, int errlen, const std::string& msg) {
  if (err == nullptr || errlen <= 0) return;
  auto n = std::min<size_t>(msg.size(), static_cast<size_t>(errlen - 1));
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

// Waits for `work` until it completes, the group's deadline passes, or
// `*abort` becomes non-zero (checked every 20 ms; the Rust side sets it
// when the coordinator says the group changed). 0 on success; -1 on
// error or timeout; -2 when aborted. An aborted or timed-out operation
// may still be in flight in Gloo's threads: the group must not be used
// again (the Rust side frees it off-thread).
int wait_work(Group* g, const c10::intrusive_ptr<c10d::Work>& work, const unsigned char* abort,
              const char* what, char* err, int errlen) {
  auto deadline = std::chrono::steady_clock::now() + g->timeout;
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

// A Gloo group: `rank` of `world`, rendezvous at the TCPStore on
// host:port (hosted by this process when `is_master`), keys under
// `prefix` (one prefix per generation, so a re-formed group never reads
// an old one's keys). `bind_host` is the address this rank's Gloo
// transport listens on. Null on error.
void* distill_gloo_new(const char* host, int port, int is_master, const char* prefix,
                       const char* bind_host, int rank, int world, int timeout_ms, char* err,
                       int errlen) {
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
    auto options = c10d::ProcessGroupGloo::Options::create();
    options->timeout = timeout;
    options->devices.push_back(
        c10d::ProcessGroupGloo::createDeviceForHostname(std::string(bind_host)));
    auto pg = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
    return new Group{store, pg, timeout};
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
int distill_gloo_allreduce_sum(void* group, at::Tensor* t, const unsigned char* abort, char* err,
                               int errlen) {
  try {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> ts{*t};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.timeout = g->timeout;
    return wait_work(g, g->pg->allreduce(ts, o), abort, "all-reduce", err, errlen);
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return -1;
  } catch (...) {
    set_err(err, errlen, "unknown C++ exception");
    return -1;
  }
}

// Copies `t` of rank `root` into `t` of every rank.
int distill_gloo_broadcast(void* group, at::Tensor* t, int root, const unsigned char* abort,
                           char* err, int errlen) {
  try {
    auto* g = static_cast<Group*>(group);
    std::vector<at::Tensor> ts{*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.rootTensor = 0;
    o.timeout = g->timeout;
    return wait_work(g, g->pg->broadcast(ts, o), abort, "broadcast", err, errlen);
  } catch (const std::exception& e) {
    set_err(err, errlen, e.what());
    return -1;
  } catch (...) {
    set_err(err, errlen, "unknown C++ exception");
    return -1;
  }
}

// Waits until every rank reaches the barrier (or the timeout).
int distill_gloo_barrier(void* group, const unsigned char* abort, char* err, int errlen) {
  try {
    auto* g = static_cast<Group*>(group);
    c10d::BarrierOptions o;
    o.timeout = g->timeout;
    return wait_work(g, g->pg->barrier(o), abort, "barrier", err, errlen);
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

void distill_gloo_free(void* group) {
  try {
    delete static_cast<Group*>(group);
  } catch (...) {
  }
}

}  // extern "C"
