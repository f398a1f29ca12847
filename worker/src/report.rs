//! The evaluation report: every model measured the same way on the test
//! split (task metric, agreement with the teacher, latency p50/p95 per
//! batch size, throughput, size on disk, peak memory), the quality gate over
//! the quantized variants, `report.json` (versioned), `report.md` and the
//! plots (SVG, drawn with `plotters`).
//!
//! Latency: for each batch size `B` of `evaluation.latency_batch_sizes`
//! (batch 1 is always measured), the first `B` test examples (repeated if
//! the split is smaller) are padded to their longest; after
//! `max(2, iters/10)` warm-up passes, `evaluation.latency_iters` forward
//! passes are timed one by one (CUDA synchronised) and the 50th and 95th
//! percentiles reported. Peak memory is the process's resident high-water
//! mark (`VmHWM`, reset through `/proc/self/clear_refs` before each model),
//! so it includes everything the process holds, not only the model.

use crate::model::{Outputs, Task, TaskModel};
use crate::tokenize::{Encoded, Padding, TextTokenizer};
use crate::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Instant;
use tch::{Device, Kind, Tensor};

/// Layout version of `report.json`.
pub const REPORT_VERSION: u32 = 2;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Latency {
    pub batch_size: u32,
    pub p50_ms: f64,
    pub p95_ms: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct ModelReport {
    pub params: i64,
    pub layers: i64,
    pub hidden: i64,
    /// Accuracy (classification) or mean cosine to the teacher (embedding)
    /// on the test split.
    pub metric: f64,
    /// Macro-averaged F1 over the labels (classification).
    #[serde(default)]
    pub macro_f1: Option<f64>,
    /// Fraction of test examples where the model predicts the teacher's
    /// label (classification), or mean cosine to the teacher's embedding.
    #[serde(default)]
    pub agreement_with_teacher: Option<f64>,
    /// Size of the model's directory; `None` for a model that is not
    /// exported (the labels-only baseline).
    pub bytes_on_disk: Option<u64>,
    /// Test-split throughput (batches of 64, length-bucketed).
    pub examples_per_second: f64,
    #[serde(default)]
    pub latency: Vec<Latency>,
    /// The process's peak resident memory while this model was measured.
    #[serde(default)]
    pub peak_rss_bytes: Option<u64>,
}

impl ModelReport {
    pub fn p50_at(&self, batch: u32) -> Option<f64> {
        self.latency
            .iter()
            .find(|l| l.batch_size == batch)
            .map(|l| l.p50_ms)
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Passed the quality gate.
    Kept,
    /// Passed the gate and is the fastest: the default output.
    Chosen,
    /// Dropped more than `quantization.max_accuracy_drop`.
    Rejected,
    /// The format does not apply to this model (an `"auto"` candidate,
    /// e.g. int4 on layers its group size does not divide).
    Skipped,
}

/// One quantized variant of the student.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Variant {
    /// `fp16`, `bf16`, `int8_dynamic`, `int8_weight_only`, `int4`.
    pub format: String,
    #[serde(flatten)]
    pub model: ModelReport,
    /// Whether libtorch has a kernel on the measuring device that makes
    /// this format faster than fp32; when not, the numbers are what the
    /// device does without one.
    pub fast_kernel: bool,
    pub verdict: Verdict,
    /// Why it was rejected or not chosen.
    pub reason: Option<String>,
    /// Where the variant is saved (`None` once removed).
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// [`REPORT_VERSION`].
    #[serde(default)]
    pub version: u32,
    pub task: String,
    pub metric_name: String,
    pub teacher: ModelReport,
    pub student: ModelReport,
    pub baseline: Option<ModelReport>,
    /// The quantized variants, in the order evaluated.
    #[serde(default)]
    pub variants: Vec<Variant>,
    /// The default output: the fastest variant that passed the gate, or
    /// `fp32` when none is faster than the fp32 student.
    #[serde(default)]
    pub chosen: Option<String>,
    #[serde(default)]
    pub chosen_dir: Option<PathBuf>,
    /// The batch size "fastest" is judged at (the largest latency batch).
    #[serde(default)]
    pub chosen_at_batch: Option<u32>,
    /// student metric / teacher metric.
    pub retention: f64,
    /// The quality guard's verdict (`crate::quality`); absent in reports
    /// written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quality: Option<crate::quality::QualityCheck>,
    /// Bad examples skipped under `data.on_bad_example = "skip"`, as
    /// `file: line N: reason`.
    pub skipped_examples: Vec<String>,
    /// `[data.augment]`: augmented examples made and kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub augmentation: Option<crate::augment::AugmentStats>,
    pub student_dir: PathBuf,
    pub seconds: f64,
    /// Wall seconds per stage, in order, as far as this process saw them.
    #[serde(default)]
    pub stage_seconds: Vec<(String, f64)>,
    /// Where the latencies were measured: device and threads.
    #[serde(default)]
    pub measured_on: String,
    /// The job's configuration after defaults.
    #[serde(default)]
    pub config: serde_json::Value,
    /// The plots, relative to the report.
    #[serde(default)]
    pub plots: Vec<String>,
}

/// Accuracy and macro-F1 of `pred` against `gold` over `n_labels` classes
/// (F1 averaged over the classes that occur in either, as scikit-learn).
pub fn classification_metrics(pred: &[i64], gold: &[i64], n_labels: usize) -> (f64, f64) {
    let n = gold.len().max(1) as f64;
    let correct = pred.iter().zip(gold).filter(|(p, g)| p == g).count() as f64;
    let (mut tp, mut fp, mut fneg) = (
        vec![0f64; n_labels],
        vec![0f64; n_labels],
        vec![0f64; n_labels],
    );
    let mut seen = vec![false; n_labels];
    for (&p, &g) in pred.iter().zip(gold) {
        let (p, g) = (p as usize, g as usize);
        if p < n_labels {
            seen[p] = true;
        }
        if g < n_labels {
            seen[g] = true;
        }
        if p == g {
            tp[g] += 1.0;
        } else {
            if p < n_labels {
                fp[p] += 1.0;
            }
            if g < n_labels {
                fneg[g] += 1.0;
            }
        }
    }
    let classes: Vec<usize> = (0..n_labels).filter(|&c| seen[c]).collect();
    let f1: f64 = classes
        .iter()
        .map(|&c| {
            let d = 2.0 * tp[c] + fp[c] + fneg[c];
            if d == 0.0 {
                0.0
            } else {
                2.0 * tp[c] / d
            }
        })
        .sum::<f64>()
        / classes.len().max(1) as f64;
    (correct / n, f1)
}

fn argmax(t: &Tensor) -> Vec<i64> {
    Vec::<i64>::try_from(t.argmax(-1, false)).unwrap_or_default()
}

/// What every model is measured against: the test split, its labels and
/// the teacher's outputs on it.
pub struct Bench<'a> {
    pub tok: &'a TextTokenizer,
    pub examples: &'a [Encoded],
    pub labels: &'a [i64],
    pub n_labels: usize,
    pub task: Task,
    pub batch_sizes: Vec<u32>,
    pub iters: u32,
    /// The teacher's test outputs (logits or embeddings); set after the
    /// teacher is measured.
    pub teacher_out: Option<Tensor>,
}

impl Bench<'_> {
    /// Measures `model` (its directory, if any, for the size on disk).
    pub fn measure(&mut self, model: &TaskModel, dir: Option<&Path>) -> Result<ModelReport> {
        reset_peak_rss();
        let t0 = Instant::now();
        let out = crate::infer::infer(
            model,
            self.tok,
            self.examples,
            crate::infer::InferOptions::default(),
            |_, _| {},
        )?;
        let eps = self.examples.len() as f64 / t0.elapsed().as_secs_f64().max(1e-9);
        let teacher = self.teacher_out.get_or_insert_with(|| out.shallow_clone());
        let (metric, macro_f1, agreement) = match self.task {
            Task::Classification => {
                let pred = argmax(&out);
                let (acc, f1) = classification_metrics(&pred, self.labels, self.n_labels);
                let tpred = argmax(teacher);
                let agree = pred.iter().zip(&tpred).filter(|(a, b)| a == b).count() as f64
                    / pred.len().max(1) as f64;
                (acc, Some(f1), agree)
            }
            Task::Embedding => {
                let cos = Tensor::cosine_similarity(&out, teacher, -1, 1e-8)
                    .mean(Kind::Float)
                    .double_value(&[]);
                (cos, None, cos)
            }
        };
        let mut latency = vec![];
        for &b in &self.batch_sizes {
            latency.push(self.latency(model, b)?);
        }
        Ok(ModelReport {
            params: model.num_params(),
            layers: model.config().num_hidden_layers,
            hidden: model.config().hidden_size,
            metric,
            macro_f1,
            agreement_with_teacher: Some(agreement),
            bytes_on_disk: dir.map(dir_bytes),
            examples_per_second: eps,
            latency,
            peak_rss_bytes: peak_rss(),
        })
    }

    fn latency(&self, model: &TaskModel, batch: u32) -> Result<Latency> {
        let n = self.examples.len().max(1);
        let rows: Vec<&Encoded> = (0..batch as usize).map(|i| &self.examples[i % n]).collect();
        let device = model.device();
        let b = self.tok.batch(&rows, Padding::Dynamic, device);
        let _g = tch::no_grad_guard();
        let sync = || {
            if let Device::Cuda(i) = device {
                tch::Cuda::synchronize(i as i64);
            }
        };
        for _ in 0..(self.iters / 10).max(2) {
            let _ = model.forward_t(&b, Outputs::default(), false).output;
        }
        sync();
        let mut ms = Vec::with_capacity(self.iters as usize);
        for _ in 0..self.iters.max(1) {
            let t0 = Instant::now();
            let _ = model.forward_t(&b, Outputs::default(), false).output;
            sync();
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
        }
        ms.sort_by(|a, b| a.total_cmp(b));
        let pct = |p: f64| ms[(((ms.len() as f64) * p).ceil() as usize).clamp(1, ms.len()) - 1];
        Ok(Latency {
            batch_size: batch,
            p50_ms: pct(0.50),
            p95_ms: pct(0.95),
        })
    }
}

/// Bytes of the files under `dir`, recursively.
pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.filter_map(|e| e.ok())
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Resets the process's resident-memory high-water mark (Linux ≥ 4.0);
/// a no-op elsewhere.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The process's resident-memory high-water mark, in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The quality gate: a variant whose metric is more than `max_drop` below
/// `reference` (the fp32 student's) is rejected, with the reason. Of the
/// rest, the one with the lowest p50 latency at `batch` is chosen, unless
/// the fp32 student (`reference_p50`) is faster than all of them. Returns
/// the chosen format (`"fp32"` for the student itself).
pub fn gate(
    reference: f64,
    reference_p50: Option<f64>,
    max_drop: f64,
    batch: u32,
    variants: &mut [Variant],
) -> String {
    for v in variants
        .iter_mut()
        .filter(|v| v.verdict != Verdict::Skipped)
    {
        let drop = reference - v.model.metric;
        if drop > max_drop + 1e-12 {
            v.verdict = Verdict::Rejected;
            v.reason = Some(format!(
                "metric {:.4} is {:.4} below the fp32 student's {:.4}; quantization.max_accuracy_drop allows {:.4}",
                v.model.metric, drop, reference, max_drop
            ));
        } else {
            v.verdict = Verdict::Kept;
        }
    }
    let fastest = variants
        .iter()
        .enumerate()
        .filter(|(_, v)| v.verdict == Verdict::Kept)
        .filter_map(|(i, v)| v.model.p50_at(batch).map(|p| (i, p)))
        .min_by(|a, b| a.1.total_cmp(&b.1));
    match (fastest, reference_p50) {
        (Some((i, p)), r) if r.is_none_or(|r| p <= r) => {
            variants[i].verdict = Verdict::Chosen;
            for v in variants.iter_mut().filter(|v| v.verdict == Verdict::Kept) {
                v.reason = Some(format!(
                    "passed, but slower at batch {batch} than the chosen one"
                ));
            }
            variants[i].format.clone()
        }
        (fastest, _) => {
            let why = if fastest.is_some() {
                format!("passed, but slower at batch {batch} than the fp32 student")
            } else {
                "no variant passed the quality gate".to_string()
            };
            for v in variants.iter_mut().filter(|v| v.verdict == Verdict::Kept) {
                v.reason = Some(why.clone());
            }
            "fp32".to_string()
        }
    }
}

fn fmt_ms(m: &ModelReport, b: u32) -> String {
    m.latency
        .iter()
        .find(|l| l.batch_size == b)
        .map_or("—".into(), |l| {
            format!("{:.2} / {:.2}", l.p50_ms, l.p95_ms)
        })
}

fn fmt_mb(b: Option<u64>) -> String {
    b.map_or("—".into(), |b| format!("{:.1}", b as f64 / 1e6))
}

/// The result table as Markdown: what was kept and what it cost.
pub fn render(r: &Report) -> String {
    let batches: Vec<u32> = r.student.latency.iter().map(|l| l.batch_size).collect();
    let mut head = format!("| model | {} | agreement | ", r.metric_name);
    for b in &batches {
        head.push_str(&format!("p50 / p95 ms @{b} | "));
    }
    head.push_str("examples/s | MB on disk | params | verdict |\n|---|---|---|");
    head.push_str(&"---|".repeat(batches.len() + 4));
    head.push('\n');
    let mut s = r
        .quality
        .as_ref()
        .map(|q| format!("{}\n", crate::quality::render(q)))
        .unwrap_or_default();
    s.push_str(&head);
    let mut row = |name: &str, m: &ModelReport, verdict: &str| {
        let metric = match m.macro_f1 {
            Some(f) => format!("{:.4} (F1 {:.4})", m.metric, f),
            None => format!("{:.4}", m.metric),
        };
        s.push_str(&format!(
            "| {name} | {metric} | {} | ",
            m.agreement_with_teacher
                .map_or("—".into(), |a| format!("{a:.4}"))
        ));
        for b in &batches {
            s.push_str(&format!("{} | ", fmt_ms(m, *b)));
        }
        s.push_str(&format!(
            "{:.0} | {} | {} | {verdict} |\n",
            m.examples_per_second,
            fmt_mb(m.bytes_on_disk),
            m.params
        ));
    };
    row("teacher", &r.teacher, "");
    let chosen_fp32 = r.chosen.as_deref() == Some("fp32");
    row(
        "student fp32",
        &r.student,
        if chosen_fp32 {
            "**chosen**"
        } else {
            "reference"
        },
    );
    for v in &r.variants {
        let verdict = match v.verdict {
            Verdict::Chosen => "**chosen**".to_string(),
            Verdict::Kept => "kept".to_string(),
            Verdict::Rejected => "rejected".to_string(),
            Verdict::Skipped => "skipped".to_string(),
        };
        let name = if v.fast_kernel {
            format!("student {}", v.format)
        } else {
            format!("student {} (no fast kernel here)", v.format)
        };
        row(&name, &v.model, &verdict);
    }
    if let Some(b) = &r.baseline {
        row("student, labels only", b, "comparison");
    }
    s.push_str(&format!(
        "\nretention (student / teacher): {:.2}%  \n",
        100.0 * r.retention
    ));
    if let (Some(c), Some(d)) = (&r.chosen, &r.chosen_dir) {
        s.push_str(&format!(
            "deploy: **{c}** (fastest at batch {} that passed the gate) → `{}`  \n",
            r.chosen_at_batch.unwrap_or(1),
            d.display()
        ));
    }
    for v in r.variants.iter().filter(|v| v.reason.is_some()) {
        s.push_str(&format!(
            "- {}: {}\n",
            v.format,
            v.reason.as_deref().unwrap_or("")
        ));
    }
    s.push_str(&format!("\nmeasured on: {}  \n", r.measured_on));
    if !r.stage_seconds.is_empty() {
        let parts: Vec<String> = r
            .stage_seconds
            .iter()
            .map(|(n, t)| format!("{n} {t:.1} s"))
            .collect();
        s.push_str(&format!("stages: {}  \n", parts.join(", ")));
    }
    s.push_str(&format!("time: {:.1} s\n", r.seconds));
    for p in &r.plots {
        s.push_str(&format!("\n![{p}]({p})\n"));
    }
    if let Some(a) = &r.augmentation {
        s.push_str(&format!(
            "\naugmentation ({}): {} examples generated, {} kept{}\n",
            a.method,
            a.generated,
            a.kept,
            a.min_confidence
                .map(|m| format!(" (teacher confidence >= {m})"))
                .unwrap_or_default()
        ));
    }
    if !r.skipped_examples.is_empty() {
        s.push_str(&format!(
            "\nbad examples skipped (data.on_bad_example = \"skip\"): {}\n",
            r.skipped_examples.len()
        ));
        for e in &r.skipped_examples {
            s.push_str(&format!("- {e}\n"));
        }
    }
    s
}

/// Every measured model with a name, for the plots.
fn plotted(r: &Report) -> Vec<(String, &ModelReport)> {
    let mut v = vec![
        ("teacher".to_string(), &r.teacher),
        ("student fp32".to_string(), &r.student),
    ];
    for x in r.variants.iter().filter(|x| x.verdict != Verdict::Skipped) {
        let mark = if x.verdict == Verdict::Rejected {
            " (rejected)"
        } else {
            ""
        };
        v.push((format!("{}{mark}", x.format), &x.model));
    }
    v
}

fn plot_err(e: impl std::fmt::Display) -> crate::Error {
    crate::Error::Invalid(format!("drawing the report plots: {e}"))
}

/// Draws `accuracy_vs_latency.svg` (metric against p50 latency at `batch`)
/// and `size.svg` (MB on disk per model) into `dir`; returns their names.
pub fn plots(r: &Report, dir: &Path, batch: u32) -> Result<Vec<String>> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    let models = plotted(r);
    let pts: Vec<(String, f64, f64)> = models
        .iter()
        .filter_map(|(n, m)| m.p50_at(batch).map(|p| (n.clone(), p, m.metric)))
        .collect();
    let a = "accuracy_vs_latency.svg";
    {
        let path = dir.join(a);
        let root = SVGBackend::new(&path, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let xmax = pts.iter().map(|p| p.1).fold(0.0, f64::max) * 1.25 + 1e-6;
        let (ymin, ymax) = pts.iter().fold((f64::MAX, f64::MIN), |(lo, hi), p| {
            (lo.min(p.2), hi.max(p.2))
        });
        let pad = ((ymax - ymin) * 0.15).max(0.005);
        let mut chart = ChartBuilder::on(&root)
            .caption(
                format!("{} against p50 latency, batch {batch}", r.metric_name),
                ("sans-serif", 22),
            )
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..xmax, (ymin - pad)..(ymax + pad))
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("p50 latency (ms), lower is better")
            .y_desc(r.metric_name.clone())
            .draw()
            .map_err(plot_err)?;
        let palette = [
            RGBColor(31, 119, 180),
            RGBColor(255, 127, 14),
            RGBColor(44, 160, 44),
            RGBColor(214, 39, 40),
            RGBColor(148, 103, 189),
            RGBColor(140, 86, 75),
            RGBColor(227, 119, 194),
            RGBColor(127, 127, 127),
        ];
        for (i, (name, x, y)) in pts.iter().enumerate() {
            let c = palette[i % palette.len()];
            // The name beside the point (staggered, as points may sit close)
            // and the full numbers in the legend.
            chart
                .draw_series(std::iter::once(
                    EmptyElement::at((*x, *y))
                        + Circle::new((0, 0), 6, c.filled())
                        + Text::new(
                            name.clone(),
                            (9, -22 + 15 * (i % 4) as i32),
                            ("sans-serif", 14).into_font().color(&c),
                        ),
                ))
                .map_err(plot_err)?
                .label(format!("{name}: {y:.4}, {x:.2} ms"))
                .legend(move |(lx, ly)| Circle::new((lx + 8, ly), 5, c.filled()));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    let b = "size.svg";
    {
        let bars: Vec<(String, f64)> = models
            .iter()
            .filter_map(|(n, m)| m.bytes_on_disk.map(|x| (n.clone(), x as f64 / 1e6)))
            .collect();
        let path = dir.join(b);
        let root = SVGBackend::new(&path, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let ymax = bars.iter().map(|b| b.1).fold(0.0, f64::max) * 1.2 + 1e-6;
        let n = bars.len() as i32;
        let mut chart = ChartBuilder::on(&root)
            .caption("size on disk per model", ("sans-serif", 22))
            .margin(20)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d((0..n).into_segmented(), 0.0..ymax)
            .map_err(plot_err)?;
        let names: Vec<String> = bars.iter().map(|b| b.0.clone()).collect();
        chart
            .configure_mesh()
            .disable_x_mesh()
            .y_desc("MB on disk")
            .x_labels(bars.len().max(1))
            .x_label_formatter(&|v| match v {
                SegmentValue::CenterOf(i) => names.get(*i as usize).cloned().unwrap_or_default(),
                _ => String::new(),
            })
            .draw()
            .map_err(plot_err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, mb))| {
                let i = i as i32;
                let mut r = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), *mb),
                    ],
                    BLUE.mix(0.6).filled(),
                );
                r.set_margin(0, 0, 12, 12);
                r
            }))
            .map_err(plot_err)?;
        chart
            .draw_series(bars.iter().enumerate().map(|(i, (_, mb))| {
                let style = ("sans-serif", 15)
                    .into_font()
                    .into_text_style(&root)
                    .pos(Pos::new(HPos::Center, VPos::Bottom));
                let label = if *mb < 10.0 {
                    format!("{mb:.2} MB")
                } else {
                    format!("{mb:.1} MB")
                };
                Text::new(
                    label,
                    (SegmentValue::CenterOf(i as i32), *mb + ymax * 0.01),
                    style,
                )
            }))
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(vec![a.to_string(), b.to_string()])
}

/// Helper for tests and tools: reads a `report.json`.
pub fn read(path: &Path) -> Result<Report> {
    let text = std::fs::read_to_string(path).map_err(|e| crate::Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| crate::Error::Config {
        path: path.to_path_buf(),
        message: format!("not a distill report: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn variant(format: &str, metric: f64, p50: f64) -> Variant {
        Variant {
            format: format.into(),
            model: ModelReport {
                metric,
                latency: vec![Latency {
                    batch_size: 32,
                    p50_ms: p50,
                    p95_ms: p50,
                }],
                ..ModelReport::default()
            },
            fast_kernel: true,
            verdict: Verdict::Kept,
            reason: None,
            dir: None,
        }
    }

    #[test]
    fn the_gate_rejects_drops_beyond_the_allowance_and_chooses_the_fastest_survivor() {
        let mut v = vec![
            variant("int4", 0.80, 5.0),          // fastest, but drops 0.03
            variant("int8_dynamic", 0.825, 7.0), // drops 0.005: passes
            variant("bf16", 0.83, 9.0),          // no drop, slower
        ];
        let chosen = gate(0.83, Some(10.0), 0.01, 32, &mut v);
        assert_eq!(chosen, "int8_dynamic");
        assert_eq!(v[0].verdict, Verdict::Rejected);
        assert!(
            v[0].reason.as_ref().unwrap().contains("0.0300 below"),
            "{:?}",
            v[0].reason
        );
        assert_eq!(v[1].verdict, Verdict::Chosen);
        assert_eq!(v[2].verdict, Verdict::Kept);
        // A zero allowance rejects any drop at all, and keeps no drop.
        let mut v = vec![
            variant("int8_dynamic", 0.8299, 7.0),
            variant("bf16", 0.83, 9.0),
        ];
        assert_eq!(gate(0.83, Some(10.0), 0.0, 32, &mut v), "bf16");
        assert_eq!(v[0].verdict, Verdict::Rejected);
        // Nothing faster than the fp32 student: the student is the output.
        let mut v = vec![variant("fp16", 0.83, 12.0)];
        assert_eq!(gate(0.83, Some(10.0), 0.01, 32, &mut v), "fp32");
        assert_eq!(v[0].verdict, Verdict::Kept);
        assert!(v[0].reason.as_ref().unwrap().contains("slower"));
        // Skipped variants are left alone.
        let mut v = vec![variant("int4", 0.0, 1.0)];
        v[0].verdict = Verdict::Skipped;
        assert_eq!(gate(0.83, Some(10.0), 0.01, 32, &mut v), "fp32");
        assert_eq!(v[0].verdict, Verdict::Skipped);
    }

    #[test]
    fn accuracy_and_macro_f1_follow_the_definition() {
        // By hand, as scikit-learn's f1_score(average="macro"): class 0
        // tp 2 fp 1 fn 1 → 4/6; class 1 tp 1 fp 1 fn 2 → 2/5; class 2 tp 1
        // fp 2 fn 1 → 2/5; mean 0.4889. Accuracy 4/8.
        let gold = [0, 0, 0, 1, 1, 1, 2, 2];
        let pred = [0, 0, 1, 1, 2, 2, 2, 0];
        let (acc, f1) = classification_metrics(&pred, &gold, 3);
        assert!((acc - 0.5).abs() < 1e-12);
        let want = (2.0 * 2.0 / 6.0 + 2.0 * 1.0 / 5.0 + 2.0 * 1.0 / 5.0) / 3.0;
        assert!((f1 - want).abs() < 1e-12, "{f1} vs {want}");
    }
}
