//! `distill infer`: run a model directory over a JSONL file.

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`distill infer` is not built yet")
}
