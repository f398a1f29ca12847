//! The `distill` command line: one binary for every role.
//!
//! `distill run` is the embedded single-machine mode; `distill coordinator`
//! and `distill worker` are the cluster roles. See ARCHITECTURE.md.

mod cmd;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Distill a large transformer teacher into a small, fast, quantized student.
#[derive(Parser)]
#[command(name = "distill", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// How logs and progress are written: `auto` (progress bars on a
    /// terminal, plain timestamped lines otherwise), `plain` (lines, never
    /// colour codes) or `json` (one JSON object per line).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "auto",
        env = "DISTILL_LOG_FORMAT"
    )]
    log_format: LogFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    Auto,
    Plain,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Show what libtorch sees on this machine (CUDA devices, cuDNN, CPU threads).
    Doctor(cmd::doctor::Args),
    /// Run a model over a JSONL file and write one output row per input line
    /// (classification logits or sentence embeddings) to a safetensors file.
    Infer(cmd::infer::Args),
    /// Convert a GGUF language model (Llama, Qwen2; F32/F16/BF16/Q8_0/Q4_0/Q4_1
    /// tensors, dequantized) into a Hugging Face directory with its
    /// tokenizer, chat template and generation config.
    Convert(cmd::lm::ConvertArgs),
    /// Generate text with a decoder language model for every prompt (or chat)
    /// of a JSONL file: batched, KV-cached, greedy or seeded sampling.
    Generate(cmd::lm::GenerateArgs),
    /// Train a decoder student on its teacher's signal (`distill generate
    /// --logprobs K` output): forward/reverse KL or JSD over the teacher's
    /// top-k on response tokens, or sequence-level KD; one machine.
    LmDistill(cmd::lm::LmDistillArgs),
    /// Derive a student from a teacher (preset or compression ratio), initialise
    /// it from the teacher's weights and export it as a Hugging Face directory.
    Student(cmd::student::Args),
    /// Validate a job spec and its files (config, weights, tokenizer, data) and
    /// print the plan: teacher, derived student, data counts, steps.
    Plan(cmd::run::PlanArgs),
    /// Quantize a model directory (fp16, bf16, int8_dynamic, int8_weight_only,
    /// int4) into a directory `distill eval` and `distill infer` load.
    Quantize(cmd::quantize::QuantizeArgs),
    /// Measure model directories on a job's test split: metric, agreement
    /// with the teacher, latency p50 per batch size, size on disk.
    Eval(cmd::quantize::EvalArgs),
    /// Run a whole distillation job on this machine: fine-tune the teacher if
    /// asked, distil, evaluate, export. Re-running resumes from checkpoints.
    Run(cmd::run::RunArgs),
    /// Start a cluster coordinator backed by etcd (or an embedded store).
    Coordinator(cmd::coordinator::Args),
    /// Submit a job spec to a running coordinator; prints the job id.
    Submit(cmd::client::SubmitArgs),
    /// Print a job's state and progress (one JSON object).
    Status(cmd::client::StatusArgs),
    /// Follow a job: one JSON line per change until it ends (exit 1 unless
    /// it succeeded).
    Watch(cmd::client::StatusArgs),
    /// Cancel a job: its workers stop and are released.
    Cancel(cmd::client::CancelArgs),
    /// Download a job's outputs (student, report, plots, chosen quantized
    /// variant) from the coordinator into a directory, checking each file.
    Fetch(cmd::client::FetchArgs),
    /// Print a job's log: what the coordinator saw happen to it (state
    /// changes, which worker leased, committed or failed which task,
    /// training groups formed, checkpoints committed); `--follow` keeps
    /// printing until the job ends. Workers' own logs stay on the workers.
    Logs(cmd::client::LogsArgs),
    /// Start a cluster worker: register with the coordinator, lease tasks
    /// (teacher-signal shards, training, evaluation) and run them on libtorch.
    Worker(cmd::worker::Args),
}

fn init_logs(format: LogFormat, default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DISTILL_LOG")
        .unwrap_or_else(|_| default.into());
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => fmt.json().init(),
        // Colour codes only on a terminal, never in a log file.
        LogFormat::Auto => fmt.with_ansi(terminal).init(),
        LogFormat::Plain => fmt.with_ansi(false).init(),
    }
    distill_worker::progress::set_format(match format {
        LogFormat::Auto => distill_worker::progress::LogFormat::Auto,
        LogFormat::Plain => distill_worker::progress::LogFormat::Plain,
        LogFormat::Json => distill_worker::progress::LogFormat::Json,
    });
}

fn main() -> ExitCode {
    // `--version` also says what libtorch this binary runs on and whether
    // it sees CUDA, which clap's static version string cannot.
    let args: Vec<String> = std::env::args().skip(1).collect();
    if matches!(args.as_slice(), [a] if a == "--version" || a == "-V") {
        println!(
            "distill {} (libtorch {}, CUDA {})",
            env!("CARGO_PKG_VERSION"),
            env!("DISTILL_LIBTORCH_VERSION"),
            if tch::Cuda::is_available() {
                format!("available, {} device(s)", tch::Cuda::device_count())
            } else {
                "not available".into()
            }
        );
        return ExitCode::SUCCESS;
    }
    let cli = Cli::parse();
    // `distill run` shows the job's stages; the in-process coordinator's
    // and worker's own bookkeeping (leases, reports) only when it goes
    // wrong (DISTILL_LOG=info shows all of it).
    let default_filter = match cli.command {
        Command::Run(_) => "info,distill_coordinator=warn,distill_worker::agent=warn",
        _ => "info",
    };
    init_logs(cli.log_format, default_filter);
    let result = match cli.command {
        Command::Doctor(a) => cmd::doctor::run(a),
        Command::Infer(a) => cmd::infer::run(a),
        Command::Convert(a) => cmd::lm::convert(a),
        Command::Generate(a) => cmd::lm::run_generate(a),
        Command::LmDistill(a) => cmd::lm::lm_distill(a),
        Command::Student(a) => cmd::student::run(a),
        Command::Plan(a) => cmd::run::plan(a),
        Command::Quantize(a) => cmd::quantize::quantize(a),
        Command::Eval(a) => cmd::quantize::eval(a),
        Command::Run(a) => cmd::run::run(a),
        Command::Coordinator(a) => cmd::coordinator::run(a),
        Command::Worker(a) => cmd::worker::run(a),
        Command::Submit(a) => cmd::client::submit(a),
        Command::Status(a) => cmd::client::status(a),
        Command::Watch(a) => cmd::client::watch(a),
        Command::Cancel(a) => cmd::client::cancel(a),
        Command::Fetch(a) => cmd::client::fetch(a),
        Command::Logs(a) => cmd::client::logs(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
