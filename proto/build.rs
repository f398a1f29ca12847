fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["distill/v1/jobs.proto", "distill/v1/workers.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure().compile_protos(&protos, &["."])?;
    Ok(())
}
