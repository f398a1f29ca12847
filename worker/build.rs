//! The worker's tests and benchmarks link libtorch too: same rpath and
//! libtorch_cuda fixes as the `distill` binary (build-support/libtorch_link.rs).
include!("../build-support/libtorch_link.rs");

fn main() {
    libtorch_link_args();
}
