//! Language-model commands: `distill convert` (GGUF → Hugging Face
//! directory) and `distill generate` (batched generation over a JSONL file
//! of prompts or chat messages).

use anyhow::Context;
use distill_worker::model::decoder::chat::ChatTemplate;
use distill_worker::model::decoder::generate::{GenerateOptions, Sampling};
use distill_worker::model::decoder::{DecoderModel, GenerationDefaults};
use serde_json::Value;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct ConvertArgs {
    /// A GGUF file (llama.cpp's format): Llama or Qwen2 architecture, tensors
    /// in F32, F16, BF16, Q8_0, Q4_0 or Q4_1 (dequantized to fp32).
    pub gguf: PathBuf,
    /// The Hugging Face directory to write: config.json, model.safetensors,
    /// tokenizer.json, tokenizer_config.json (chat template),
    /// generation_config.json.
    pub output: PathBuf,
}

pub fn convert(a: ConvertArgs) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let cfg = distill_worker::model::gguf::convert(&a.gguf, &a.output)?;
    eprintln!(
        "converted {} → {} in {:.1}s ({} layers, hidden {}, vocab {})",
        a.gguf.display(),
        a.output.display(),
        t0.elapsed().as_secs_f64(),
        cfg["num_hidden_layers"],
        cfg["hidden_size"],
        cfg["vocab_size"]
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A decoder model: a Hugging Face directory (Llama, Qwen2, Mistral) or
    /// a .gguf file (converted into a temporary directory first).
    pub model: PathBuf,
    /// JSONL, one object per line with `prompt` (text, tokenized as is) or
    /// `messages` (a chat: [{"role", "content"}], rendered with the model's
    /// chat template and its generation prompt).
    pub prompts: PathBuf,
    /// Output JSONL: each input line's fields plus `text` (the new text),
    /// `ids` (the new token ids), `finish` (eos, stop or length) and, with
    /// --logprobs, `logprobs`. Same order as the input; written atomically.
    /// Meanwhile results collect in OUT.partial: the same command after a
    /// crash or Ctrl-C resumes from it (same tokens as one run: each
    /// prompt's sampler is seeded by its line).
    #[arg(long)]
    pub output: PathBuf,
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sample at this temperature (default: greedy decoding).
    #[arg(long)]
    pub temperature: Option<f64>,
    /// Nucleus sampling: keep the most likely tokens up to this mass (with --temperature).
    #[arg(long, default_value_t = 1.0, requires = "temperature")]
    pub top_p: f64,
    /// Keep only the k most likely tokens when sampling (0: all).
    #[arg(long, default_value_t = 0, requires = "temperature")]
    pub top_k: usize,
    /// Seed of the sampling: the same seed gives the same tokens.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Stop once the text contains this string (repeatable); the text is cut before it.
    #[arg(long)]
    pub stop: Vec<String>,
    /// Also write, per generated token, its log-probability and the K most likely tokens'.
    #[arg(long, value_name = "K")]
    pub logprobs: Option<usize>,
    /// Also write the teacher signal compactly (with --logprobs K): token
    /// ids and top-K as int32 and fp16 in one safetensors file, for
    /// `distill lm-distill --signal`.
    #[arg(long, requires = "logprobs")]
    pub signal_out: Option<PathBuf>,
    /// Prompts per batch (prompts are sorted by length, so a batch pads little).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights precision: `auto` (the config's torch_dtype), fp32, bf16 or fp16.
    #[arg(long, default_value = "auto")]
    pub dtype: String,
    /// CPU threads for libtorch (at least 1; default: libtorch's choice).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub threads: Option<i32>,
}

/// A model directory for `path`: itself, or a GGUF converted into `tmp`.
pub fn model_dir(path: &Path, tmp: &mut Option<tempfile::TempDir>) -> anyhow::Result<PathBuf> {
    if path.extension().and_then(|e| e.to_str()) == Some("gguf") {
        let dir =
            tempfile::tempdir().context("creating a temporary directory for the conversion")?;
        eprintln!(
            "converting {} (distill convert keeps the result)",
            path.display()
        );
        distill_worker::model::gguf::convert(path, dir.path())?;
        let p = dir.path().to_path_buf();
        *tmp = Some(dir);
        return Ok(p);
    }
    Ok(path.to_path_buf())
}

pub fn run_generate(a: GenerateArgs) -> anyhow::Result<()> {
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    anyhow::ensure!(a.batch_size > 0, "--batch-size must be positive");
    anyhow::ensure!(a.max_new_tokens > 0, "--max-new-tokens must be positive");
    let device = distill_worker::device::parse_device(&a.device)?;
    let kind = match a.dtype.as_str() {
        "auto" => None,
        "fp32" => Some(tch::Kind::Float),
        "bf16" => Some(tch::Kind::BFloat16),
        "fp16" => Some(tch::Kind::Half),
        other => anyhow::bail!("--dtype {other}: expected auto, fp32, bf16 or fp16"),
    };
    let mut tmp = None;
    let dir = model_dir(&a.model, &mut tmp)?;
    let model = DecoderModel::load(&dir, device, kind)?;
    let tokenizer = distill_worker::model::decoder::load_tokenizer(&dir)?;
    let template = ChatTemplate::from_dir(&dir)?;
    // Read every prompt first: a bad line fails before any work.
    let file =
        std::fs::File::open(&a.prompts).with_context(|| format!("{}", a.prompts.display()))?;
    let mut rows = vec![];
    let mut prompts = vec![];
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let at = format!("{}:{}", a.prompts.display(), n + 1);
        let line = line.with_context(|| at.clone())?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(&line).with_context(|| format!("{at}: not a JSON object"))?;
        let ids = prompt_ids(&v, &tokenizer, template.as_ref(), &at)?;
        anyhow::ensure!(!ids.is_empty(), "{at}: the prompt has no tokens");
        rows.push(v);
        prompts.push(ids);
    }
    anyhow::ensure!(!prompts.is_empty(), "{}: no prompts", a.prompts.display());
    let mut eos = model.config.eos_token_ids.clone();
    eos.extend(GenerationDefaults::from_dir(&dir)?.eos_token_ids);
    eos.sort();
    eos.dedup();
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: a.temperature.map(|t| Sampling {
            temperature: t,
            top_p: a.top_p,
            top_k: a.top_k,
            seed: a.seed,
        }),
        eos_token_ids: eos,
        stop: a.stop.clone(),
        batch_size: a.batch_size,
        logprobs_top_k: a.logprobs,
    };
    let prompt_tokens: usize = prompts.iter().map(|p| p.len()).sum();
    eprintln!(
        "generating for {} prompts ({} prompt tokens) with {} ({:.1}M parameters, {:?}), {}",
        prompts.len(),
        prompt_tokens,
        a.model.display(),
        model.num_params() as f64 / 1e6,
        model.kind(),
        if opts.sampling.is_some() {
            "sampling"
        } else {
            "greedy"
        }
    );
    let t0 = Instant::now();
    let total = prompts.len();
    // Results go to OUT.partial as each group of batches finishes; a run
    // stopped by a crash or Ctrl-C resumes from there when the same command
    // is given again (same model, prompts and settings: a fingerprint in
    // the file's first line says so).
    let partial = PathBuf::from(format!("{}.partial", a.output.display()));
    let fingerprint = {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(model.config.to_json().to_string());
        h.update(serde_json::to_string(&prompts)?);
        h.update(format!("{opts:?} {:?}", model.kind()));
        hex::encode(h.finalize())
    };
    let mut results: Vec<Option<distill_worker::model::decoder::generate::Generated>> =
        vec![None; total];
    let resumed = read_partial(&partial, &fingerprint, &mut results)?;
    if resumed > 0 {
        eprintln!(
            "resuming from {}: {resumed} of {total} prompts already generated",
            partial.display()
        );
    }
    let mut file = open_partial(&partial, &fingerprint, resumed > 0)?;
    let mut todo: Vec<usize> = (0..total).filter(|&i| results[i].is_none()).collect();
    todo.sort_by_key(|&i| (prompts[i].len(), i));
    let mut bar = distill_worker::progress::CountProgress::new("generate", total as u64, "prompts");
    let (mut done, mut tokens) = (resumed, 0usize);
    for group in todo.chunks(a.batch_size * 4) {
        let ps: Vec<Vec<i64>> = group.iter().map(|&i| prompts[i].clone()).collect();
        let (base_done, base_tokens) = (done, tokens);
        let got = distill_worker::model::decoder::generate::generate_indexed(
            &model,
            Some(&tokenizer),
            &ps,
            group,
            &opts,
            &mut |d, t| {
                let s = t0.elapsed().as_secs_f64();
                bar.set(
                    (base_done + d) as u64,
                    &format!(
                        "{} tokens, {:.1} tokens/s",
                        base_tokens + t,
                        (base_tokens + t) as f64 / s
                    ),
                );
            },
        )?;
        for (&i, g) in group.iter().zip(got) {
            tokens += g.ids.len();
            serde_json::to_writer(&mut file, &serde_json::json!({"index": i, "result": g}))?;
            file.write_all(b"\n")?;
            results[i] = Some(g);
        }
        file.flush()?;
        file.get_ref()
            .sync_data()
            .with_context(|| partial.display().to_string())?;
        done += group.len();
    }
    bar.finish();
    let results: Vec<_> = results
        .into_iter()
        .map(|g| g.expect("every prompt generated"))
        .collect();
    let secs = t0.elapsed().as_secs_f64();
    let new_tokens: usize = results.iter().map(|g| g.ids.len()).sum();
    if let Some(path) = &a.signal_out {
        let examples: Vec<distill_worker::distill::lm_train::LmExample> = prompts
            .iter()
            .zip(&results)
            .filter(|(_, g)| !g.ids.is_empty())
            .map(|(p, g)| {
                distill_worker::distill::lm_train::LmExample::from_generation(p, g)
                    .expect("--logprobs is required with --signal-out")
            })
            .collect();
        distill_worker::distill::lm_train::write_signal(path, &examples)?;
        let size = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        let resp: usize = examples.iter().map(|e| e.response_len()).sum();
        eprintln!(
            "wrote the teacher signal to {}: {} sequences, {:.0} bytes per response token",
            path.display(),
            examples.len(),
            size as f64 / resp.max(1) as f64
        );
    }
    let mut out = Vec::new();
    for (mut row, g) in rows.into_iter().zip(results) {
        let obj = row.as_object_mut().unwrap();
        obj.insert("text".into(), g.text.into());
        obj.insert("ids".into(), serde_json::to_value(&g.ids)?);
        obj.insert("finish".into(), serde_json::to_value(g.finish)?);
        if let Some(lp) = g.logprobs {
            obj.insert("logprobs".into(), serde_json::to_value(lp)?);
        }
        serde_json::to_writer(&mut out, &row)?;
        out.write_all(b"\n")?;
    }
    distill_worker::fsutil::write_atomic(&a.output, &out)?;
    drop(file);
    std::fs::remove_file(&partial).with_context(|| partial.display().to_string())?;
    eprintln!(
        "wrote {} rows to {}: {} new tokens in {:.1}s ({:.1} tokens/s)",
        total,
        a.output.display(),
        new_tokens,
        secs,
        new_tokens as f64 / secs
    );
    Ok(())
}

/// Results of an earlier, stopped run of the same command from `path`
/// (none when it does not exist); a file from other settings is refused. A
/// last line cut short by the crash is dropped. Returns how many.
fn read_partial(
    path: &Path,
    fingerprint: &str,
    results: &mut [Option<distill_worker::model::decoder::generate::Generated>],
) -> anyhow::Result<usize> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(0);
    };
    let mut lines = text.lines();
    let header: Value = lines
        .next()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    if header["fingerprint"].as_str() != Some(fingerprint) {
        anyhow::bail!(
            "{}: results of a stopped run with another model, prompts or settings; delete it to start afresh, or rerun that command to finish it",
            path.display()
        );
    }
    let lines: Vec<&str> = lines.collect();
    let mut n = 0;
    for (k, line) in lines.iter().enumerate() {
        let v: Value = match serde_json::from_str(line) {
            Ok(v) => v,
            Err(_) if k + 1 == lines.len() => break, // cut short by the crash
            Err(e) => anyhow::bail!("{}:{}: {e}", path.display(), k + 2),
        };
        let i = v["index"]
            .as_u64()
            .map(|i| i as usize)
            .filter(|&i| i < results.len());
        let g = serde_json::from_value(v["result"].clone()).ok();
        match (i, g) {
            (Some(i), Some(g)) => {
                if results[i].replace(g).is_none() {
                    n += 1;
                }
            }
            _ => anyhow::bail!("{}:{}: not a result of this run", path.display(), k + 2),
        }
    }
    Ok(n)
}

/// The partial-results file, opened for appending (a fresh one gets the
/// fingerprint line; a resumed one loses a cut-short last line first).
fn open_partial(
    path: &Path,
    fingerprint: &str,
    resume: bool,
) -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
    let ctx = || path.display().to_string();
    if resume {
        // Rewrite the complete lines only, then append after them.
        let text = std::fs::read_to_string(path).with_context(ctx)?;
        let keep: String = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .collect();
        distill_worker::fsutil::write_atomic(path, keep.as_bytes())?;
        let f = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .with_context(ctx)?;
        return Ok(std::io::BufWriter::new(f));
    }
    let f = std::fs::File::create(path).with_context(ctx)?;
    let mut w = std::io::BufWriter::new(f);
    serde_json::to_writer(
        &mut w,
        &serde_json::json!({"distill_generate_partial": 1, "fingerprint": fingerprint}),
    )?;
    w.write_all(b"\n")?;
    w.flush()?;
    Ok(w)
}

/// The token ids of a JSONL row's `prompt` (tokenized as is) or
/// `messages` (the chat template with its generation prompt).
fn prompt_ids(
    v: &Value,
    tokenizer: &tokenizers::Tokenizer,
    template: Option<&ChatTemplate>,
    at: &str,
) -> anyhow::Result<Vec<i64>> {
    Ok(match (v.get("prompt"), v.get("messages")) {
        (Some(Value::String(p)), None) => encode(tokenizer, p, true, at)?,
        (None, Some(m @ Value::Array(_))) => {
            let t = template.ok_or_else(|| {
                anyhow::anyhow!("{at}: field messages: the model has no chat template (tokenizer_config.json chat_template)")
            })?;
            let text = t.render(m, true).with_context(|| at.to_string())?;
            encode(tokenizer, &text, false, at)?
        }
        (Some(_), Some(_)) => anyhow::bail!("{at}: give prompt or messages, not both"),
        (Some(_), None) => anyhow::bail!("{at}: field prompt: expected a string"),
        (None, Some(_)) => {
            anyhow::bail!("{at}: field messages: expected a list of {{role, content}}")
        }
        (None, None) => anyhow::bail!("{at}: no prompt or messages field"),
    })
}

fn encode(
    tok: &tokenizers::Tokenizer,
    text: &str,
    special: bool,
    at: &str,
) -> anyhow::Result<Vec<i64>> {
    let enc = tok
        .encode(text, special)
        .map_err(|e| anyhow::anyhow!("{at}: tokenizing: {e}"))?;
    Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
}

#[derive(clap::Args)]
pub struct LmDistillArgs {
    /// The student to train: a decoder directory, e.g. from `distill student
    /// --teacher TEACHER --compression-ratio 0.5` (initialised from the teacher).
    #[arg(long)]
    pub student: PathBuf,
    /// The teacher's signal: JSONL written by `distill generate TEACHER
    /// PROMPTS --logprobs K` (each line's prompt or messages, the teacher's
    /// response `ids` and its top-k `logprobs`), or the compact
    /// `.safetensors` of its `--signal-out`. The student must share the
    /// teacher's tokenizer.
    #[arg(long)]
    pub signal: PathBuf,
    /// Held-out signal in the same format: the student's loss and
    /// perplexity on the teacher's responses, before and after training.
    #[arg(long)]
    pub eval: Option<PathBuf>,
    /// Where to write the trained student (a Hugging Face directory) and
    /// `lm_distill.json` (settings, the curve, before/after figures).
    #[arg(long)]
    pub output: PathBuf,
    /// forward_kl (KL(teacher ‖ student) over the teacher's top-k plus one
    /// bucket for the rest of the vocabulary), reverse_kl, jsd (generalised
    /// Jensen-Shannon, --beta; both on the same buckets), or sequence_ce
    /// (the teacher's tokens as labels: sequence-level KD).
    #[arg(long, default_value = "forward_kl")]
    pub loss: String,
    /// Weight on the teacher in jsd.
    #[arg(long, default_value_t = 0.5)]
    pub beta: f64,
    /// Add this times the cross-entropy on the teacher's tokens to a KD loss.
    #[arg(long, default_value_t = 0.0)]
    pub ce_weight: f64,
    /// Temperature of the KD losses (both sides' buckets tempered; losses scaled by T²).
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Optimizer steps.
    #[arg(long, default_value_t = 200)]
    pub steps: u64,
    /// Sequences per step.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// AdamW peak learning rate (linear warmup, then linear decay to 0).
    #[arg(long, default_value_t = 1e-4)]
    pub learning_rate: f64,
    /// Fraction of the steps spent warming up.
    #[arg(long, default_value_t = 0.1)]
    pub warmup_ratio: f64,
    /// Decoupled weight decay on matrices.
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub grad_clip: f64,
    /// Seed of the sequence order.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// `fp32`, or `bf16`: forward passes under autocast, fp32 weights.
    #[arg(long, default_value = "fp32")]
    pub precision: String,
    /// CPU threads for libtorch (at least 1; default: libtorch's choice).
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..))]
    pub threads: Option<i32>,
}

/// The training sequences of a signal file.
fn read_signal(
    path: &Path,
    tokenizer: &tokenizers::Tokenizer,
    template: Option<&ChatTemplate>,
) -> anyhow::Result<Vec<distill_worker::distill::lm_train::LmExample>> {
    if path.extension().and_then(|e| e.to_str()) == Some("safetensors") {
        let v = distill_worker::distill::lm_train::read_signal(path)?;
        anyhow::ensure!(!v.is_empty(), "{}: no sequences", path.display());
        return Ok(v);
    }
    let file = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let mut out = vec![];
    let mut k_seen = None;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let at = format!("{}:{}", path.display(), n + 1);
        let line = line.with_context(|| at.clone())?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value =
            serde_json::from_str(&line).with_context(|| format!("{at}: not a JSON object"))?;
        let prompt = prompt_ids(&v, tokenizer, template, &at)?;
        let resp: Vec<i64> = serde_json::from_value(v.get("ids").cloned().unwrap_or(Value::Null))
            .map_err(|_| {
            anyhow::anyhow!(
                "{at}: field ids: expected the response's token ids (distill generate output)"
            )
        })?;
        if resp.is_empty() {
            continue; // nothing to learn from an empty response
        }
        let (mut tids, mut tlp) = (vec![], vec![]);
        match v.get("logprobs") {
            Some(Value::Array(lps)) => {
                anyhow::ensure!(
                    lps.len() == resp.len(),
                    "{at}: field logprobs: {} entries for {} response tokens",
                    lps.len(),
                    resp.len()
                );
                for (j, lp) in lps.iter().enumerate() {
                    let top = lp
                        .get("top")
                        .and_then(|t| t.as_array())
                        .ok_or_else(|| anyhow::anyhow!("{at}: field logprobs[{j}].top: missing"))?;
                    anyhow::ensure!(
                        k_seen.is_none_or(|k| k == top.len()),
                        "{at}: field logprobs[{j}].top: {} entries, earlier lines have {}",
                        top.len(),
                        k_seen.unwrap_or(0)
                    );
                    k_seen = Some(top.len());
                    for pair in top {
                        let (id, l) = (
                            pair.get(0).and_then(|x| x.as_i64()),
                            pair.get(1).and_then(|x| x.as_f64()),
                        );
                        match (id, l) {
                            (Some(id), Some(l)) => {
                                tids.push(id);
                                tlp.push(l as f32);
                            }
                            _ => anyhow::bail!(
                                "{at}: field logprobs[{j}].top: expected [id, logprob] pairs"
                            ),
                        }
                    }
                }
            }
            None | Some(Value::Null) => {}
            Some(_) => anyhow::bail!("{at}: field logprobs: expected a list"),
        }
        let mut ids = prompt.clone();
        ids.extend_from_slice(&resp);
        out.push(distill_worker::distill::lm_train::LmExample {
            ids,
            prompt_len: prompt.len(),
            topk_ids: tids,
            topk_logp: tlp,
        });
    }
    anyhow::ensure!(
        !out.is_empty(),
        "{}: no sequences with a response",
        path.display()
    );
    Ok(out)
}

pub fn lm_distill(a: LmDistillArgs) -> anyhow::Result<()> {
    use distill_worker::distill::lm_train::{eval_loss, train, LmLoss, LmTrainConfig};
    if let Some(t) = a.threads {
        tch::set_num_threads(t);
    }
    tch::manual_seed(a.seed as i64);
    let mut loss: LmLoss = a.loss.parse()?;
    if let LmLoss::Jsd { beta } = &mut loss {
        anyhow::ensure!((0.0..=1.0).contains(&a.beta), "--beta must be in [0, 1]");
        *beta = a.beta;
    }
    anyhow::ensure!(a.temperature > 0.0, "--temperature must be positive");
    anyhow::ensure!(
        a.batch_size > 0 && a.steps > 0,
        "--steps and --batch-size must be positive"
    );
    let device = distill_worker::device::parse_device(&a.device)?;
    let precision = match a.precision.as_str() {
        "fp32" => None,
        "bf16" => Some(distill_worker::autocast::Reduced::Bf16),
        other => anyhow::bail!("--precision {other}: expected fp32 or bf16"),
    };
    let mut model = DecoderModel::load(&a.student, device, Some(tch::Kind::Float))?;
    let tokenizer = distill_worker::model::decoder::load_tokenizer(&a.student)?;
    let template = ChatTemplate::from_dir(&a.student)?;
    let train_set = read_signal(&a.signal, &tokenizer, template.as_ref())?;
    let eval_set = match &a.eval {
        Some(p) => Some(read_signal(p, &tokenizer, template.as_ref())?),
        None => None,
    };
    let cfg = LmTrainConfig {
        steps: a.steps,
        batch_size: a.batch_size,
        learning_rate: a.learning_rate,
        warmup_ratio: a.warmup_ratio,
        weight_decay: a.weight_decay,
        grad_clip: a.grad_clip,
        temperature: a.temperature,
        loss,
        ce_weight: a.ce_weight,
        seed: a.seed,
        precision,
    };
    // Held-out figures: the loss being trained and the perplexity of the
    // teacher's responses under the student (cross-entropy on its tokens).
    let ce_cfg = LmTrainConfig {
        loss: LmLoss::SequenceCe,
        ..cfg.clone()
    };
    let measure = |m: &DecoderModel| -> anyhow::Result<Option<Value>> {
        let Some(es) = &eval_set else { return Ok(None) };
        let ce = eval_loss(m, es, &ce_cfg)?;
        // Forward KL (T = 1, top-k + tail) whatever the training loss, so
        // students trained with different losses compare on one figure.
        let fkl_cfg = LmTrainConfig {
            loss: LmLoss::ForwardKl,
            temperature: 1.0,
            ce_weight: 0.0,
            ..cfg.clone()
        };
        let fkl = if es[0].topk_ids.is_empty() {
            None
        } else {
            Some(eval_loss(m, es, &fkl_cfg)?)
        };
        Ok(Some(
            serde_json::json!({"forward_kl": fkl, "response_ce": ce, "response_perplexity": ce.exp()}),
        ))
    };
    let before = measure(&model)?;
    eprintln!(
        "lm-distill: {} sequences ({} response tokens), {} steps of {}, student {:.1}M parameters; held-out before: {}",
        train_set.len(),
        train_set.iter().map(|e| e.response_len()).sum::<usize>(),
        a.steps,
        a.loss,
        model.num_params() as f64 / 1e6,
        before.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "(no --eval)".into())
    );
    let mut bar = distill_worker::progress::CountProgress::new("lm-distill", a.steps, "steps");
    let mut curve = vec![];
    let t0 = Instant::now();
    train(&mut model, &train_set, &cfg, &mut |s| {
        bar.set(
            s.step + 1,
            &format!(
                "loss {:.4} lr {:.2e} grad {:.2} ({:.2} steps/s)",
                s.loss,
                s.lr,
                s.grad_norm,
                (s.step + 1) as f64 / t0.elapsed().as_secs_f64()
            ),
        );
        curve.push(s.clone());
    })?;
    bar.finish();
    let secs = t0.elapsed().as_secs_f64();
    let after = measure(&model)?;
    let teacher_dir = a.student.clone();
    distill_worker::model::decoder::student::export(&model, &teacher_dir, &a.output)?;
    let report = serde_json::json!({
        "student": a.student, "signal": a.signal, "eval": a.eval,
        "loss": a.loss, "beta": a.beta, "ce_weight": a.ce_weight, "temperature": a.temperature,
        "steps": a.steps, "batch_size": a.batch_size, "learning_rate": a.learning_rate, "seed": a.seed,
        "device": a.device, "precision": a.precision,
        "train_sequences": train_set.len(), "seconds": secs,
        "held_out_before": before, "held_out_after": after, "curve": curve,
    });
    distill_worker::fsutil::write_atomic(
        &a.output.join("lm_distill.json"),
        (serde_json::to_string_pretty(&report)? + "\n").as_bytes(),
    )?;
    eprintln!(
        "lm-distill: {} steps in {:.0}s; held-out after: {}; wrote {}",
        a.steps,
        secs,
        after
            .map(|v| v.to_string())
            .unwrap_or_else(|| "(no --eval)".into()),
        a.output.display()
    );
    Ok(())
}
