//! Subcommands whose piece is not built yet. They say so and fail; they
//! never pretend to have done work.

/// Arguments are accepted and ignored so that `--help` works.
#[derive(clap::Args)]
pub struct Args {
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    rest: Vec<String>,
}

pub fn run(name: &str, _args: Args) -> anyhow::Result<()> {
    anyhow::bail!("`distill {name}` is not built yet in this version of distill (see the project's open issues)")
}
