//! Collectives on PyTorch's own c10d engine: `ProcessGroupGloo` (compiled
//! into libtorch_cpu) or `ProcessGroupNCCL` (libtorch_cuda; the `nccl`
//! feature) over a `TCPStore` rendezvous with a `PrefixStore` per group
//! generation, reached through the C++ shim `csrc/collective.cpp` and
//! handed tch tensors directly (no copies). Gloo takes CUDA tensors too,
//! staged through host memory; NCCL takes CUDA tensors only, and needs
//! one GPU per rank (NCCL refuses two ranks on one device).
//!
//! Every collective has a deadline (the group's timeout): a peer that died
//! fails it at once (connection reset), a frozen one at the deadline. A
//! failed group is dropped and a new one formed on a fresh prefix of the
//! same store (as TorchFT does per quorum).
//!
//! A collective can also be aborted from another thread (the coordinator
//! said the group changed): it returns within 20 ms, and the group, whose
//! operation may still be in flight inside Gloo, is never used again.
//! With NCCL an abort or a deadline calls `ncclCommAbort`, so a kernel
//! waiting on a lost peer exits too.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tch::{Device, Tensor};

use crate::{Error, Result};

extern "C" {
    fn distill_pg_new(
        host: *const c_char,
        port: c_int,
        is_master: c_int,
        prefix: *const c_char,
        bind_host: *const c_char,
        rank: c_int,
        world: c_int,
        timeout_ms: c_int,
        backend: c_int,
        cuda_device: c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> *mut c_void;
    fn distill_have_nccl() -> c_int;
    fn distill_pg_allreduce_sum(
        group: *mut c_void,
        t: *mut torch_sys::C_tensor,
        abort: *const u8,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn distill_pg_broadcast(
        group: *mut c_void,
        t: *mut torch_sys::C_tensor,
        root: c_int,
        abort: *const u8,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn distill_pg_barrier(
        group: *mut c_void,
        abort: *const u8,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn distill_pg_free(group: *mut c_void);
    fn distill_reducer_new(
        group: *mut c_void,
        params: *const *mut torch_sys::C_tensor,
        n: c_int,
        flat: *mut torch_sys::C_tensor,
        bucket_elems: i64,
        err: *mut c_char,
        errlen: c_int,
    ) -> *mut c_void;
    fn distill_reducer_arm(
        reducer: *mut c_void,
        prior: *const *mut torch_sys::C_tensor,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn distill_reducer_finish(
        reducer: *mut c_void,
        group: *mut c_void,
        abort: *const u8,
        defined: *mut u8,
        err: *mut c_char,
        errlen: c_int,
    ) -> c_int;
    fn distill_reducer_free(reducer: *mut c_void);
    fn distill_reducer_issued(reducer: *mut c_void) -> c_int;
    fn distill_reducer_buckets(reducer: *mut c_void) -> c_int;
    fn distill_store_serve(
        host: *const c_char,
        port: c_int,
        bound_port: *mut c_int,
        err: *mut c_char,
        errlen: c_int,
    ) -> *mut c_void;
    fn distill_store_free(store: *mut c_void);
}

const ERRLEN: usize = 1024;

/// Rendezvous threads still running (an aborted rendezvous runs on until
/// c10d's constructor returns, at the latest at its deadline).
static RENDEZVOUS_THREADS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// How many abandoned or running rendezvous threads this process has. A
/// process must not exit while one is inside c10d (its static destructors
/// would run under it): [`Group::join_abortable`]'s callers wait for 0.
pub fn rendezvous_threads() -> usize {
    RENDEZVOUS_THREADS.load(Ordering::SeqCst)
}

fn message(buf: &[u8]) -> String {
    let m = CStr::from_bytes_until_nul(buf)
        .map(|c| c.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "unknown error".into());
    // c10d appends a C++ backtrace: keep the message.
    match m.split_once("\nException raised from") {
        Some((head, _)) => head.trim_end().to_string(),
        None => m,
    }
}

fn cstring(what: &str, s: &str) -> Result<CString> {
    CString::new(s).map_err(|_| Error::Invalid(format!("{what}: contains a NUL byte")))
}

/// The engine a group's collectives run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `ProcessGroupGloo`: CPU tensors (CUDA ones are staged through host
    /// memory). Any number of ranks per machine.
    Gloo,
    /// `ProcessGroupNCCL` on the given CUDA device: CUDA tensors, one GPU
    /// per rank. Only in builds with the `nccl` feature.
    Nccl { device: usize },
}

impl Backend {
    pub fn name(&self) -> &'static str {
        match self {
            Backend::Gloo => "gloo",
            Backend::Nccl { .. } => "nccl",
        }
    }
}

/// Which engine a worker's training groups use (`distill worker
/// --collective-backend`). Every rank of a group must resolve to the same
/// one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackendChoice {
    /// NCCL when the student trains on a CUDA device and this build has
    /// NCCL, else Gloo.
    #[default]
    Auto,
    Gloo,
    Nccl,
}

impl std::str::FromStr for BackendChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "gloo" => Ok(Self::Gloo),
            "nccl" => Ok(Self::Nccl),
            _ => Err(format!(
                "{s:?} is not a collective backend: auto, gloo or nccl"
            )),
        }
    }
}

impl BackendChoice {
    /// The backend for a student on `device`.
    pub fn resolve(self, device: Device) -> Result<Backend> {
        match (self, device) {
            (Self::Gloo, _) => Ok(Backend::Gloo),
            (Self::Auto, Device::Cuda(i)) if have_nccl() => Ok(Backend::Nccl { device: i }),
            (Self::Auto, _) => Ok(Backend::Gloo),
            (Self::Nccl, Device::Cuda(i)) if have_nccl() => Ok(Backend::Nccl { device: i }),
            (Self::Nccl, Device::Cuda(_)) => Err(Error::Invalid(
                "--collective-backend nccl: this build has no NCCL (build with the `nccl` feature: scripts/gpu/build.sh)".into(),
            )),
            (Self::Nccl, d) => Err(Error::Invalid(format!(
                "--collective-backend nccl needs a CUDA device; the student trains on {d:?}"
            ))),
        }
    }
}

/// Whether this build has NCCL (the worker's `nccl` feature).
pub fn have_nccl() -> bool {
    unsafe { distill_have_nccl() != 0 }
}

/// Where and how a group meets.
#[derive(Debug, Clone)]
pub struct Rendezvous {
    /// The TCPStore's host and port.
    pub host: String,
    pub port: u16,
    /// Rank 0 starts the store for this group (and stops it with the
    /// group). False when a [`StoreServer`] already serves it.
    pub host_store: bool,
    /// One prefix per group generation, e.g. `job-000001/gen-3/`.
    pub prefix: String,
    /// The address this rank's Gloo transport binds to.
    pub bind_host: String,
    pub rank: u32,
    pub world: u32,
    /// Deadline of the rendezvous and of every collective.
    pub timeout: Duration,
    pub backend: Backend,
}

/// One rank's membership of a c10d process group (Gloo or NCCL).
pub struct Group {
    raw: *mut c_void,
    pub rank: u32,
    pub world: u32,
    pub backend: Backend,
    /// Set (by another thread) to abort the collective in flight: it
    /// returns within 20 ms with [`Error::Collective`].
    abort: Arc<AtomicBool>,
    /// A collective failed, timed out or was aborted: it may still be in
    /// flight in Gloo's threads, so the group is never used again and is
    /// freed off-thread (freeing waits for Gloo's own deadline).
    poisoned: AtomicBool,
}

// The group is used from one thread at a time (the libtorch thread); the
// underlying c10d objects are thread-safe for that.
unsafe impl Send for Group {}

impl Group {
    /// Joins the group; returns once every rank has joined, or fails at the
    /// deadline.
    pub fn join(r: &Rendezvous) -> Result<Self> {
        Self::join_abortable(r, Arc::new(AtomicBool::new(false)))
    }

    /// Like [`join`](Self::join); the rendezvous and every collective of
    /// the group return early with an error once `abort` is set. The
    /// rendezvous runs on its own thread (c10d's constructors cannot be
    /// interrupted): on an abort it is left to end at its own deadline,
    /// and a group it forms after all is freed there.
    pub fn join_abortable(r: &Rendezvous, abort: Arc<AtomicBool>) -> Result<Self> {
        if r.world == 0 || r.rank >= r.world {
            return Err(Error::Invalid(format!(
                "rank {} is not in a world of {}",
                r.rank, r.world
            )));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let rv = r.clone();
        RENDEZVOUS_THREADS.fetch_add(1, Ordering::SeqCst);
        std::thread::Builder::new()
            .name("distill-rendezvous".into())
            .spawn(move || {
                let formed = Self::rendezvous(&rv).map(Raw);
                if let Err(std::sync::mpsc::SendError(Ok(raw))) = tx.send(formed) {
                    unsafe { distill_pg_free(raw.0) }
                }
                RENDEZVOUS_THREADS.fetch_sub(1, Ordering::SeqCst);
            })
            .map_err(|e| {
                RENDEZVOUS_THREADS.fetch_sub(1, Ordering::SeqCst);
                Error::Collective(format!("cannot start the rendezvous: {e}"))
            })?;
        let raw = loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(formed) => break formed?.0,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    if abort.load(Ordering::Relaxed) {
                        return Err(Error::Collective(format!(
                            "joining rank {} of {} ({}): aborted: the training group changed",
                            r.rank, r.world, r.prefix
                        )));
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Error::Collective("the rendezvous thread died".into()))
                }
            }
        };
        Ok(Self {
            raw,
            rank: r.rank,
            world: r.world,
            backend: r.backend,
            abort,
            poisoned: AtomicBool::new(false),
        })
    }

    /// Makes the c10d group (blocking until every rank joined, or the
    /// deadline).
    fn rendezvous(r: &Rendezvous) -> Result<*mut c_void> {
        let host = cstring("host", &r.host)?;
        let prefix = cstring("prefix", &r.prefix)?;
        let bind = cstring("bind host", &r.bind_host)?;
        let (backend, cuda_device) = match r.backend {
            Backend::Gloo => (0, 0),
            Backend::Nccl { device } => (1, device as c_int),
        };
        let mut err = vec![0u8; ERRLEN];
        let raw = unsafe {
            distill_pg_new(
                host.as_ptr(),
                r.port as c_int,
                (r.rank == 0 && r.host_store) as c_int,
                prefix.as_ptr(),
                bind.as_ptr(),
                r.rank as c_int,
                r.world as c_int,
                r.timeout.as_millis().min(i32::MAX as u128) as c_int,
                backend,
                cuda_device,
                err.as_mut_ptr() as *mut c_char,
                ERRLEN as c_int,
            )
        };
        if raw.is_null() {
            return Err(Error::Collective(format!(
                "joining rank {} of {} ({}) at {}:{} ({}): {}",
                r.rank,
                r.world,
                r.backend.name(),
                r.host,
                r.port,
                r.prefix,
                message(&err)
            )));
        }
        Ok(raw)
    }

    fn abort_ptr(&self) -> *const u8 {
        self.abort.as_ptr() as *const u8
    }

    /// Turns the shim's return code into a result; any failure poisons
    /// the group.
    fn check(&self, rc: c_int, what: &str, err: &[u8]) -> Result<()> {
        if rc == 0 {
            return Ok(());
        }
        self.poisoned.store(true, Ordering::Relaxed);
        Err(Error::Collective(format!(
            "{what} on rank {} of {}: {}",
            self.rank,
            self.world,
            message(err)
        )))
    }

    /// Whether a collective of this group has failed (it is not used again).
    pub fn failed(&self) -> bool {
        self.poisoned.load(Ordering::Relaxed)
    }

    /// Copies `t` on rank `root` into `t` on every rank. `t` must have
    /// the same shape and kind on every rank; any device.
    pub fn broadcast(&self, t: &mut Tensor, root: u32) -> Result<()> {
        self.staged(t, |g, t| g.broadcast_raw(t, root))
    }

    /// Runs `op` on `t` as this backend takes it: in place when it is on
    /// the backend's device and contiguous, else on a staged copy that is
    /// then copied back (Gloo: through host memory; NCCL: onto the
    /// group's GPU).
    fn staged(&self, t: &mut Tensor, op: impl Fn(&Self, &mut Tensor) -> Result<()>) -> Result<()> {
        let want = match self.backend {
            Backend::Gloo => Device::Cpu,
            Backend::Nccl { device } => Device::Cuda(device),
        };
        if t.device() == want && t.is_contiguous() {
            return op(self, t);
        }
        let mut staged = t.to_device(want).contiguous();
        op(self, &mut staged)?;
        let _g = tch::no_grad_guard();
        t.copy_(&staged);
        Ok(())
    }

    fn broadcast_raw(&self, t: &mut Tensor, root: u32) -> Result<()> {
        let mut err = vec![0u8; ERRLEN];
        let rc = unsafe {
            distill_pg_broadcast(
                self.raw,
                t.as_mut_ptr(),
                root as c_int,
                self.abort_ptr(),
                err.as_mut_ptr() as *mut c_char,
                ERRLEN as c_int,
            )
        };
        self.check(rc, "broadcast", &err)
    }

    /// Sums `t` over the group, in place; any device (staged when it is
    /// not the backend's own).
    pub fn all_reduce_sum(&self, t: &mut Tensor) -> Result<()> {
        self.staged(t, |g, t| g.all_reduce_raw(t))
    }

    fn all_reduce_raw(&self, t: &mut Tensor) -> Result<()> {
        let mut err = vec![0u8; ERRLEN];
        let rc = unsafe {
            distill_pg_allreduce_sum(
                self.raw,
                t.as_mut_ptr(),
                self.abort_ptr(),
                err.as_mut_ptr() as *mut c_char,
                ERRLEN as c_int,
            )
        };
        self.check(rc, "all-reduce", &err)
    }

    /// Waits for every rank (or fails at the deadline).
    pub fn barrier(&self) -> Result<()> {
        let mut err = vec![0u8; ERRLEN];
        let rc = unsafe {
            distill_pg_barrier(
                self.raw,
                self.abort_ptr(),
                err.as_mut_ptr() as *mut c_char,
                ERRLEN as c_int,
            )
        };
        self.check(rc, "barrier", &err)
    }
}

/// A gradient all-reduce that overlaps backward (Gloo groups on CPU
/// tensors): hooks on the parameters copy each gradient, as backward
/// computes it, into its slot of one flat fp32 buffer, and issue a
/// bucket's all-reduce as soon as all of the bucket has arrived and every
/// earlier bucket has been issued, so the sums run in Gloo's threads while
/// backward goes on. Buckets go in index order on every rank, whatever
/// order the gradients arrive in. Part of the collective protocol
/// (`distill_proto::COLLECTIVE_PROTOCOL`): every rank must hook the same
/// parameters in the same order with the same bucket size.
///
/// Use: [`arm`](Self::arm) before the backward whose gradients are to be
/// summed, then [`finish`](Self::finish). Hooks fire only while armed (a
/// backward of an earlier micro-batch, or of another model, is left
/// alone). Dropping the reducer removes its hooks.
pub struct Reducer {
    raw: *mut c_void,
    n: usize,
    flat: Tensor,
}

// Used from the libtorch thread that runs backward; the C++ state has its
// own lock (the hooks may run on autograd's threads).
unsafe impl Send for Reducer {}

impl Reducer {
    /// Hooks `params` (each its own slot, in this order: the gradients
    /// expected first come first) of `group`, in buckets of about
    /// `bucket_elems` elements (a parameter is never split).
    /// Gloo groups only (the shim refuses another).
    pub fn new(group: &Group, params: &[&Tensor], bucket_elems: i64) -> Result<Self> {
        let total: i64 = params.iter().map(|p| p.numel() as i64).sum();
        let mut flat = Tensor::zeros([total], (tch::Kind::Float, Device::Cpu));
        let ptrs: Vec<*mut torch_sys::C_tensor> =
            params.iter().map(|p| p.as_ptr() as *mut _).collect();
        let mut err = vec![0u8; ERRLEN];
        let raw = unsafe {
            distill_reducer_new(
                group.raw,
                ptrs.as_ptr(),
                ptrs.len() as c_int,
                flat.as_mut_ptr(),
                bucket_elems,
                err.as_mut_ptr() as *mut c_char,
                ERRLEN as c_int,
            )
        };
        if raw.is_null() {
            return Err(Error::Collective(format!(
                "cannot hook the gradients: {}",
                message(&err)
            )));
        }
        Ok(Self {
            raw,
            n: params.len(),
            flat,
        })
    }

    /// Arms the hooks for the next backward. `prior[i]`, when given, is
    /// what earlier micro-batches accumulated for parameter `i`: it is
    /// added to the gradient before the sum.
    pub fn arm(&mut self, prior: &[Option<&Tensor>]) -> Result<()> {
        assert_eq!(prior.len(), self.n, "one prior per hooked parameter");
        let ptrs: Vec<*mut torch_sys::C_tensor> = prior
            .iter()
            .map(|p| p.map_or(std::ptr::null_mut(), |t| t.as_ptr() as *mut _))
            .collect();
        let mut err = vec![0u8; ERRLEN];
        let rc = unsafe {
            distill_reducer_arm(
                self.raw,
                ptrs.as_ptr(),
                err.as_mut_ptr() as *mut c_char,
                ERRLEN as c_int,
            )
        };
        if rc != 0 {
            return Err(Error::Collective(format!(
                "cannot arm the gradient hooks: {}",
                message(&err)
            )));
        }
        Ok(())
    }

    /// How many buckets have been issued since the last [`arm`](Self::arm):
    /// after a backward in which every hooked gradient arrived, all of
    /// them, before [`finish`](Self::finish) is called.
    pub fn issued(&self) -> usize {
        unsafe { distill_reducer_issued(self.raw) as usize }
    }

    /// How many buckets the hooked parameters make.
    pub fn buckets(&self) -> usize {
        unsafe { distill_reducer_buckets(self.raw) as usize }
    }

    /// Ends the armed backward: what never arrived is its prior or zeros,
    /// the buckets not yet issued are issued, and every sum is waited for
    /// (the group's deadline and abort, as for any collective; a failure
    /// poisons the group). Returns the flat buffer of sums and, per
    /// parameter, whether this rank had a gradient (or prior) for it.
    pub fn finish(&mut self, group: &Group) -> Result<(&Tensor, Vec<bool>)> {
        let mut defined = vec![0u8; self.n];
        let mut err = vec![0u8; ERRLEN];
        let rc = unsafe {
            distill_reducer_finish(
                self.raw,
                group.raw,
                group.abort_ptr(),
                defined.as_mut_ptr(),
                err.as_mut_ptr() as *mut c_char,
                ERRLEN as c_int,
            )
        };
        group.check(rc, "all-reduce", &err)?;
        Ok((&self.flat, defined.into_iter().map(|d| d != 0).collect()))
    }
}

impl Drop for Reducer {
    fn drop(&mut self) {
        unsafe { distill_reducer_free(self.raw) }
    }
}

struct Raw(*mut c_void);
// Only moved across threads to be handed over or freed.
unsafe impl Send for Raw {}

impl Drop for Group {
    fn drop(&mut self) {
        let raw = Raw(self.raw);
        if self.failed() {
            // An operation may still be in flight: c10d's destructor waits
            // for it (up to Gloo's deadline), so free it off this thread.
            std::thread::spawn(move || {
                let raw = raw;
                unsafe { distill_pg_free(raw.0) }
            });
        } else {
            unsafe { distill_pg_free(raw.0) }
        }
    }
}

/// A TCPStore server that outlives groups: a worker starts one at its
/// collective address, and every group it is rank 0 of meets there, each
/// generation under its own prefix (so no port is bound twice, even while
/// a failed group is still being freed).
pub struct StoreServer {
    raw: *mut c_void,
    pub port: u16,
}

// Only created and dropped; c10d's store server runs on its own thread.
unsafe impl Send for StoreServer {}
unsafe impl Sync for StoreServer {}

impl StoreServer {
    /// Serves on `host:port` (port 0: any free port, see `self.port`).
    pub fn serve(host: &str, port: u16) -> Result<Self> {
        let h = cstring("host", host)?;
        let mut bound: c_int = 0;
        let mut err = vec![0u8; ERRLEN];
        let raw = unsafe {
            distill_store_serve(
                h.as_ptr(),
                port as c_int,
                &mut bound,
                err.as_mut_ptr() as *mut c_char,
                ERRLEN as c_int,
            )
        };
        if raw.is_null() {
            return Err(Error::Collective(format!(
                "cannot serve the rendezvous store on {host}:{port}: {}",
                message(&err)
            )));
        }
        Ok(Self {
            raw,
            port: bound as u16,
        })
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        unsafe { distill_store_free(self.raw) }
    }
}
