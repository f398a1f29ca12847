//! The worker's tests and benchmarks link libtorch too: same rpath and
//! libtorch_cuda fixes as the `distill` binary (build-support/libtorch_link.rs).
//! It also compiles `csrc/autocast.cpp` (mixed-precision autocast per device
//! type, which tch does not expose) against libtorch's headers.
include!("../build-support/libtorch_link.rs");

fn main() {
    libtorch_link_args();
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("DEP_TCH_LIBTORCH_LIB (set by torch-sys) locates libtorch's headers");
    let root = std::path::Path::new(&lib)
        .parent()
        .expect("libtorch lib dir has a parent")
        .to_path_buf();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    cc::Build::new()
        .cpp(true)
        .file("csrc/autocast.cpp")
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag_if_supported("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .compile("distill_autocast");
}
