//! Post-training quantization (`distill_worker::quant`): error bounds of
//! each format's round trip, each kernel against the product with its own
//! dequantized weight, the real MiniLM's outputs after quantization against
//! fp32 within the documented tolerances, and a quantized directory saved
//! and loaded back (and, for fp16/bf16, loaded by transformers).

mod common;

use common::*;
use distill_worker::model::export::export;
use distill_worker::model::{Outputs, Task, TaskModel};
use distill_worker::quant::{quantize_int4, quantize_int8, QLinear, Scheme};
use distill_worker::tokenize::{Padding, TextTokenizer};
use tch::{Device, Kind, Tensor};

const SCHEMES: [Scheme; 5] = [
    Scheme::Fp16,
    Scheme::Bf16,
    Scheme::Int8Dynamic,
    Scheme::Int8WeightOnly,
    Scheme::Int4 { group_size: 32 },
];

fn weight(n: i64, k: i64, seed: i64) -> Tensor {
    tch::manual_seed(seed);
    Tensor::randn([n, k], (Kind::Float, Device::Cpu)) * 0.05
}

#[test]
fn round_trip_error_is_within_half_a_quantization_step() {
    let w = weight(96, 128, 1);
    // INT8: |w − q·s| ≤ s/2 per output channel, s = max|row| / 127.
    let (q, s) = quantize_int8(&w);
    let deq = q.to_kind(Kind::Float) * s.unsqueeze(1);
    let excess = ((&deq - &w).abs() - s.unsqueeze(1) * (0.5 + 1e-4))
        .max()
        .double_value(&[]);
    assert!(excess <= 0.0, "int8 round trip exceeds s/2 by {excess}");
    assert!(q.abs().max().int64_value(&[]) <= 127);
    // INT4 grouped: |w − ((code − 8)·scale + zero)| ≤ scale/2 per group.
    for g in [32, 64, 128] {
        let (codes, sz) = quantize_int4(&w, g).unwrap();
        assert!(codes.min().int64_value(&[]) >= 0 && codes.max().int64_value(&[]) <= 15);
        let scale = sz.select(-1, 0).transpose(0, 1).unsqueeze(-1); // [out, groups, 1]
        let zero = sz.select(-1, 1).transpose(0, 1).unsqueeze(-1);
        let deq = ((codes.to_kind(Kind::Float).view([96, 128 / g, g]) - 8.0) * &scale + zero)
            .view([96, 128]);
        let err = (&deq - &w).abs().view([96, 128 / g, g]);
        let excess = (err - scale * (0.5 + 1e-4)).max().double_value(&[]);
        assert!(
            excess <= 0.0,
            "int4 (group {g}) round trip exceeds scale/2 by {excess}"
        );
        // The layer's own dequantization agrees with the formula above.
        let layer = QLinear::new(
            &w,
            &Tensor::zeros([96], (Kind::Float, Device::Cpu)),
            Scheme::Int4 { group_size: g },
            Device::Cpu,
        )
        .unwrap();
        assert!(max_abs_diff(&layer.dequantize(), &deq) < 1e-6);
    }
    // fp16 / bf16: relative error ≤ 2^-11 / 2^-8 (round to nearest), and
    // half the subnormal step (2^-25) for fp16 values below 2^-14.
    for (kind, rel, abs) in [
        (Kind::Half, 2f64.powi(-11), 2f64.powi(-25)),
        (Kind::BFloat16, 2f64.powi(-8), 0.0),
    ] {
        let back = w.to_kind(kind).to_kind(Kind::Float);
        let bound = w.abs() * (rel * (1.0 + 1e-3)) + abs * (1.0 + 1e-3);
        let excess = ((&back - &w).abs() - bound).max().double_value(&[]);
        assert!(
            excess <= 0.0,
            "{kind:?} round trip error above {rel} relative"
        );
    }
    // A group size that does not divide the layer is refused by name.
    let err = quantize_int4(&weight(8, 48, 2), 32)
        .unwrap_err()
        .to_string();
    assert!(err.contains("quantization.group_size"), "{err}");
}

#[test]
fn each_kernel_computes_the_product_with_its_dequantized_weight() {
    let (n, k) = (256, 384);
    let w = weight(n, k, 3);
    tch::manual_seed(4);
    let b = Tensor::randn([n], (Kind::Float, Device::Cpu)) * 0.1;
    let x = Tensor::randn([3, 7, k], (Kind::Float, Device::Cpu));
    for (scheme, tol) in [
        // uint8 activations quantized per batch: relative to the output range.
        (Scheme::Int8Dynamic, 0.02),
        // bf16 activations: 8 bits of mantissa.
        (Scheme::Int8WeightOnly, 0.01),
        (Scheme::Int4 { group_size: 32 }, 0.01),
        (Scheme::Int4 { group_size: 128 }, 0.01),
    ] {
        let layer = QLinear::new(&w, &b, scheme, Device::Cpu).unwrap();
        let y = tch::no_grad(|| layer.forward(&x));
        assert_eq!(y.size(), [3, 7, n]);
        assert_eq!(y.kind(), Kind::Float);
        let reference = x.matmul(&layer.dequantize().tr()) + &b;
        let range = reference.abs().max().double_value(&[]);
        let d = max_abs_diff(&y, &reference);
        assert!(
            d <= tol * range,
            "{}: kernel differs from x·deq(W)ᵀ + b by {d} (range {range})",
            scheme.name()
        );
    }
}

/// 64 real reviews through the real MiniLM (sentence embeddings).
fn real_inputs() -> (TaskModel, distill_worker::model::Batch) {
    let dir = minilm_dir();
    let model = TaskModel::load(&dir, Task::Embedding, None, Device::Cpu).unwrap();
    let tok = TextTokenizer::load(&dir, model.config(), 64).unwrap();
    let text = std::fs::read_to_string(data_file("rotten_tomatoes/test.jsonl")).unwrap();
    let texts: Vec<String> = text
        .lines()
        .take(64)
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["text"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let enc = tok.encode(&refs, None).unwrap();
    let er: Vec<_> = enc.iter().collect();
    (model, tok.batch(&er, Padding::Dynamic, Device::Cpu))
}

fn embed(m: &TaskModel, b: &distill_worker::model::Batch) -> Tensor {
    tch::no_grad(|| {
        m.forward_t(b, Outputs::default(), false)
            .output
            .to_kind(Kind::Float)
    })
}

/// The documented tolerances (docs/quantization): the mean cosine between
/// the quantized and the fp32 model's sentence embeddings, real MiniLM-L6.
fn min_cosine(s: Scheme) -> f64 {
    match s {
        Scheme::Fp16 => 0.9999,
        Scheme::Bf16 => 0.999,
        Scheme::Int8Dynamic | Scheme::Int8WeightOnly => 0.99,
        Scheme::Int4 { .. } => 0.95,
    }
}

#[test]
fn quantized_minilm_stays_close_to_fp32_and_round_trips_through_its_directory() {
    let (fp32, batch) = real_inputs();
    let want = embed(&fp32, &batch);
    let dir = tempfile::tempdir().unwrap();
    let fp32_dir = dir.path().join("fp32");
    export(&fp32, &fp32_dir, &minilm_dir()).unwrap();
    let fp32_bytes = std::fs::metadata(fp32_dir.join("model.safetensors"))
        .unwrap()
        .len();
    for scheme in SCHEMES {
        let (mut m, _) = real_inputs();
        let params = m.num_params();
        m.quantize(scheme).unwrap();
        assert_eq!(m.num_params(), params, "{}: parameter count", scheme.name());
        let got = embed(&m, &batch);
        let cos = Tensor::cosine_similarity(&got, &want, -1, 1e-8)
            .mean(Kind::Float)
            .double_value(&[]);
        eprintln!("{}: mean cosine to fp32 {cos:.6}", scheme.name());
        assert!(
            cos >= min_cosine(scheme),
            "{}: mean cosine {cos} below {}",
            scheme.name(),
            min_cosine(scheme)
        );
        // Saved and loaded back: the same outputs, bit for bit.
        let out = dir.path().join(scheme.name());
        export(&m, &out, &minilm_dir()).unwrap();
        let back = TaskModel::load(&out, Task::Embedding, None, Device::Cpu).unwrap();
        assert_eq!(back.quant, Some(scheme));
        let again = embed(&back, &batch);
        assert_eq!(
            max_abs_diff(&again, &got),
            0.0,
            "{}: reloaded model differs",
            scheme.name()
        );
        let bytes = std::fs::metadata(out.join("model.safetensors"))
            .unwrap()
            .len();
        let ratio = bytes as f64 / fp32_bytes as f64;
        eprintln!("{}: {bytes} bytes, {ratio:.3} of fp32", scheme.name());
        // Integer schemes store int8 word embeddings too (MiniLM's table is
        // 52 % of its parameters); layer norms, position embeddings and the
        // classifier stay fp32.
        let most = match scheme {
            Scheme::Fp16 | Scheme::Bf16 => 0.51,
            Scheme::Int8Dynamic | Scheme::Int8WeightOnly => 0.27,
            Scheme::Int4 { .. } => 0.24,
        };
        assert!(ratio < most, "{}: {ratio} of the fp32 size", scheme.name());
    }
}

#[test]
fn fp16_and_bf16_directories_load_in_transformers() {
    let (mut m, batch) = real_inputs();
    m.quantize(Scheme::Bf16).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("bf16");
    export(&m, &out, &minilm_dir()).unwrap();
    let ours = embed(&m, &batch);
    save_batch(&batch, &dir.path().join("batch.safetensors"));
    let got = dir.path().join("hf.safetensors");
    let inputs = dir.path().join("batch.safetensors");
    let mut args = vec![
        "run",
        out.to_str().unwrap(),
        inputs.to_str().unwrap(),
        got.to_str().unwrap(),
        "--task",
        "embedding",
    ];
    if m.normalize {
        args.push("--normalize");
    }
    reference(&args);
    let hf = distill_worker::model::weights::read_tensors(&[got]).unwrap();
    let theirs = hf
        .get("embeddings")
        .expect("reference output")
        .to_kind(Kind::Float);
    let cos = Tensor::cosine_similarity(&ours, &theirs, -1, 1e-8)
        .min()
        .double_value(&[]);
    assert!(
        cos > 0.999,
        "transformers' bf16 output differs: min cosine {cos}"
    );
}
