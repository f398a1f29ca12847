/// Link-time fixes for every binary that links libtorch (the `distill` binary,
/// the worker's tests and benchmarks). Included by their `build.rs`.
///
/// 1. torch-sys links libtorch dynamically but sets no rpath, so the binary
///    would only run with `LD_LIBRARY_PATH` pointing at `torch/lib`. We embed
///    the libtorch lib directory as an rpath.
/// 2. The linker's default `--as-needed` drops `libtorch_cuda.so` because no
///    symbol from it is referenced directly; CUDA then never registers on a GPU
///    machine. When the libtorch we build against has that library, we force it
///    in with `--no-as-needed`.
fn libtorch_link_args() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=DEP_TCH_LIBTORCH_LIB not set; the binary gets no libtorch rpath");
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
