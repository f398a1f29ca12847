//! Link-time fixes for the `distill` binary; see build-support/libtorch_link.rs.
include!("build-support/libtorch_link.rs");

fn main() {
    libtorch_link_args();
}
