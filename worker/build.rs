//! The worker's tests and benchmarks link libtorch too: same rpath and
//! libtorch_cuda fixes as the `distill` binary (build-support/libtorch_link.rs).
//! It also compiles `csrc/autocast.cpp` (mixed-precision autocast per device
//! type, which tch does not expose) and `csrc/collective.cpp` (c10d's
//! TCPStore, PrefixStore and ProcessGroupGloo, which live in libtorch_cpu)
//! against libtorch's headers, and `csrc/quant.cpp` (FBGEMM's dynamic-INT8
//! linear, an ATen function tch does not wrap), and `csrc/rng.cpp` (a CPU
//! generator of the caller's own: tch has no `at::Generator`); the wheel
//! lacks gloo's own headers, which come from Debian's libgloo-dev
//! (`scripts/setup.sh` installs it).
include!("../build-support/libtorch_link.rs");

fn main() {
    libtorch_link_args();
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    println!("cargo:rerun-if-changed=csrc/collective.cpp");
    println!("cargo:rerun-if-changed=csrc/quant.cpp");
    println!("cargo:rerun-if-changed=csrc/rng.cpp");
    println!("cargo:rerun-if-changed=csrc/shim.h");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("DEP_TCH_LIBTORCH_LIB (set by torch-sys) locates libtorch's headers");
    let root = std::path::Path::new(&lib)
        .parent()
        .expect("libtorch lib dir has a parent")
        .to_path_buf();
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // One C++ shim per concern, each against libtorch's headers.
    let shim = |file: &str| {
        let mut b = cc::Build::new();
        b.cpp(true)
            .file(file)
            .include(root.join("include"))
            .include(root.join("include/torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag_if_supported("-w")
            .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str());
        b
    };
    shim("csrc/autocast.cpp").compile("distill_autocast");
    shim("csrc/quant.cpp").compile("distill_quant");
    shim("csrc/rng.cpp").compile("distill_rng");
    if !std::path::Path::new("/usr/include/gloo/config.h").exists() {
        panic!("gloo's headers are missing (/usr/include/gloo): run scripts/setup.sh, or apt-get install libgloo-dev");
    }
    let mut collective = shim("csrc/collective.cpp");
    collective
        .define("USE_C10D_GLOO", None)
        .define("USE_DISTRIBUTED", None);
    println!("cargo:rerun-if-env-changed=DISTILL_CUDA_INCLUDE");
    if std::env::var_os("CARGO_FEATURE_NCCL").is_some() {
        // ProcessGroupNCCL's headers need the CUDA runtime's and NCCL's
        // (the wheel's nvidia/cu13 and nvidia/nccl packages) and CUDA's
        // crt/ and nv/target headers, which the wheel lacks:
        // scripts/gpu/headers.sh fetches them (nvidia-cuda-crt and
        // nvidia-cuda-cccl from PyPI) and DISTILL_CUDA_INCLUDE names them.
        let torch = root.canonicalize().unwrap_or_else(|_| root.clone());
        let site = torch.parent().expect("torch's parent is site-packages");
        collective
            .define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .define("DISTILL_NCCL", None)
            .include(site.join("nvidia/cu13/include"))
            .include(site.join("nvidia/nccl/include"));
        let extra = std::env::var("DISTILL_CUDA_INCLUDE").unwrap_or_else(|_| {
            panic!("the nccl feature needs DISTILL_CUDA_INCLUDE: the folder holding CUDA's crt/ and nv/ headers (scripts/gpu/headers.sh prints it)")
        });
        for dir in std::env::split_paths(&extra) {
            collective.include(dir);
        }
    }
    collective.compile("distill_collective");
}
