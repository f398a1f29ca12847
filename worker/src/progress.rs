//! Progress of long work (teacher fine-tuning, distillation, the labels-only
//! baseline) in the form its reader wants:
//!
//! - on a terminal ([`LogFormat::Auto`] with stderr a TTY): one `indicatif`
//!   bar per stage with steps/s, ETA and the latest loss terms;
//! - otherwise ([`LogFormat::Plain`], or `Auto` into a file or pipe): a
//!   timestamped line every 20 steps (and at least every 10 s), no colour
//!   codes;
//! - [`LogFormat::Json`]: the same lines as JSON objects, for machines.
//!
//! The format is chosen once per process (`distill --log-format`).

use std::collections::VecDeque;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::distill::train::StepLog;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// A bar on a terminal, plain lines elsewhere.
    #[default]
    Auto,
    Plain,
    Json,
}

static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// Sets the process's format (the first call wins).
pub fn set_format(f: LogFormat) {
    let _ = FORMAT.set(f);
}

pub fn format() -> LogFormat {
    FORMAT.get().copied().unwrap_or_default()
}

/// The process's format for stderr as it is (`Auto` only on a terminal),
/// and on a terminal a bar for `stage` drawn with `template`.
fn resolve(stage: &'static str, total: u64, template: &str) -> (LogFormat, Option<ProgressBar>) {
    let format = match format() {
        LogFormat::Auto if std::io::stderr().is_terminal() => LogFormat::Auto,
        LogFormat::Auto => LogFormat::Plain,
        f => f,
    };
    let bar = (format == LogFormat::Auto).then(|| {
        let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(template)
                .expect("a valid template")
                .progress_chars("=> "),
        );
        b.set_prefix(stage);
        b
    });
    (format, bar)
}

const TERMS: [&str; 5] = ["task", "kd", "attn", "hidden", "emb"];

/// Reports the steps of one stage.
pub struct StepProgress {
    stage: &'static str,
    total: u64,
    format: LogFormat,
    bar: Option<ProgressBar>,
    started: Instant,
    last_line: Option<Instant>,
    /// (time, step) of the last steps, for the rate.
    window: VecDeque<(Instant, u64)>,
}

impl StepProgress {
    pub fn new(stage: &'static str, total: u64) -> Self {
        let (format, bar) = resolve(
            stage,
            total,
            "{prefix:>9} [{bar:30}] {pos}/{len} {per_sec} ETA {eta} {msg}",
        );
        Self {
            stage,
            total,
            format,
            bar,
            started: Instant::now(),
            last_line: None,
            window: VecDeque::new(),
        }
    }

    /// Steps per second over the last 20 steps.
    fn rate(&self) -> f64 {
        match (self.window.front(), self.window.back()) {
            (Some(&(t0, s0)), Some(&(t1, s1))) if s1 > s0 => {
                (s1 - s0) as f64 / (t1 - t0).as_secs_f64().max(1e-9)
            }
            _ => 0.0,
        }
    }

    pub fn step(&mut self, l: &StepLog) {
        let now = Instant::now();
        if self.window.back().is_some_and(|&(_, s)| s >= l.step) {
            self.window.clear(); // resumed or re-formed: a new window
        }
        self.window.push_back((now, l.step));
        if self.window.len() > 20 {
            self.window.pop_front();
        }
        let done = l.step + 1;
        let last = done >= self.total;
        let terms: Vec<(&str, f64)> = TERMS
            .iter()
            .zip(l.terms)
            .filter_map(|(n, v)| v.map(|v| (*n, v)))
            .collect();
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            let t: Vec<String> = terms.iter().map(|(n, v)| format!("{n}={v:.4}")).collect();
            bar.set_message(format!("loss {:.4} [{}]", l.loss, t.join(" ")));
            if last {
                bar.finish();
            }
            return;
        }
        let due = l.step % 20 == 0
            || last
            || self
                .last_line
                .is_none_or(|t| now - t >= Duration::from_secs(10));
        if !due {
            return;
        }
        self.last_line = Some(now);
        let rate = self.rate();
        let eta = if rate > 0.0 {
            (self.total - done) as f64 / rate
        } else {
            0.0
        };
        let time = humantime::format_rfc3339_millis(SystemTime::now());
        if self.format == LogFormat::Json {
            let terms: serde_json::Map<String, serde_json::Value> = terms
                .iter()
                .map(|(n, v)| (n.to_string(), (*v).into()))
                .collect();
            eprintln!(
                "{}",
                serde_json::json!({"time": time.to_string(), "stage": self.stage, "step": done,
                    "total": self.total, "loss": l.loss, "terms": terms, "lr": l.lr,
                    "temperature": l.temperature, "steps_per_second": rate,
                    "eta_seconds": eta, "elapsed_seconds": self.started.elapsed().as_secs_f64()})
            );
        } else {
            let t: Vec<String> = terms.iter().map(|(n, v)| format!("{n}={v:.4}")).collect();
            eprintln!(
                "{time} {}: step {done}/{} loss {:.4} [{}] lr {:.2e} T {:.2} {rate:.2} steps/s ETA {:.0}s",
                self.stage,
                self.total,
                l.loss,
                t.join(" "),
                l.lr,
                l.temperature,
                eta
            );
        }
    }
}

/// `at` as an RFC 3339 UTC timestamp with milliseconds, as plain log lines
/// print it.
pub fn rfc3339_ms(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

/// Progress of a count of items (prompts generated, shards labelled): a bar
/// on a terminal, otherwise a timestamped line at most every 10 s and at the
/// end, in the process's format.
pub struct CountProgress {
    stage: &'static str,
    unit: &'static str,
    total: u64,
    format: LogFormat,
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
}

impl CountProgress {
    pub fn new(stage: &'static str, total: u64, unit: &'static str) -> Self {
        let (format, bar) = resolve(
            stage,
            total,
            "{prefix:>9} [{bar:30}] {pos}/{len} ETA {eta} {msg}",
        );
        CountProgress {
            stage,
            unit,
            total,
            format,
            bar,
            last_line: None,
        }
    }

    /// `done` of the total, with a free-form note (rates, say).
    pub fn set(&mut self, done: u64, note: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.set_message(note.to_string());
            return;
        }
        let now = Instant::now();
        if done < self.total
            && self
                .last_line
                .is_some_and(|t| now - t < Duration::from_secs(10))
        {
            return;
        }
        self.last_line = Some(now);
        let time = humantime::format_rfc3339_millis(SystemTime::now());
        if self.format == LogFormat::Json {
            eprintln!(
                "{}",
                serde_json::json!({"time": time.to_string(), "stage": self.stage, "done": done,
                    "total": self.total, "unit": self.unit, "note": note})
            );
        } else {
            eprintln!(
                "{time} {}: {done}/{} {} {note}",
                self.stage, self.total, self.unit
            );
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
