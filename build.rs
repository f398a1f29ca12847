//! Link-time fixes for the `distill` binary; see build-support/libtorch_link.rs.
//! Also records the version of the libtorch it links (from the wheel's
//! `torch/version.py`) for `distill --version`.
include!("build-support/libtorch_link.rs");

fn main() {
    libtorch_link_args();
    let version = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .ok()
        .and_then(|lib| {
            let root = std::path::Path::new(&lib).parent()?.to_path_buf();
            println!(
                "cargo:rerun-if-changed={}",
                root.join("version.py").display()
            );
            let text = std::fs::read_to_string(root.join("version.py")).ok()?;
            let line = text.lines().find(|l| l.starts_with("__version__"))?;
            Some(line.split('\'').nth(1)?.to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=DISTILL_LIBTORCH_VERSION={version}");
}
