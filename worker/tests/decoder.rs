//! Decoder language models against transformers (the reference users
//! trust): tiny random Llama, Qwen2 (attention bias), Mistral, a
//! grouped-query Llama with `llama3` rotary scaling and one with `linear`
//! scaling give the same logits within 1e-5 (fp32) over a ragged batch,
//! from configs in both rotary spellings; greedy generation with the KV
//! cache over a batch of prompts of different lengths gives transformers'
//! tokens; sampling is a function of the seed alone.

mod common;

use common::*;
use distill_worker::model::decoder::generate::{generate, GenerateOptions, Sampling};
use distill_worker::model::decoder::{DecoderConfig, DecoderModel, RopeScaling};
use distill_worker::model::weights::read_tensors;
use std::path::Path;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-5;

fn decoder_reference(args: &[&str]) {
    parity_script("decoder_reference.py", args);
}

fn make(dir: &Path, kind: &str, old_rope: bool) {
    let d = dir.to_str().unwrap();
    let mut args = vec!["make-random", d, "--kind", kind];
    if old_rope {
        args.push("--old-rope");
    }
    decoder_reference(&args);
}

fn check_logits(dir: &Path, what: &str) {
    let model = DecoderModel::load(dir, Device::Cpu, None).unwrap();
    let r = read_tensors(&[dir.join("reference.safetensors")]).unwrap();
    let (ids, mask) = (&r["input_ids"], &r["attention_mask"]);
    let logits = tch::no_grad(|| model.forward_masked(ids, mask));
    let m = mask.unsqueeze(-1).to_kind(Kind::Float);
    let d = max_abs_diff(&(&logits * &m), &(&r["logits"] * &m));
    assert!(d < TOL, "{what}: logits differ from transformers by {d}");
    // The reference is not trivially small.
    let scale = (&r["logits"] * &m).abs().max().double_value(&[]);
    assert!(
        scale > 0.05,
        "{what}: reference logits suspiciously small ({scale})"
    );
}

#[test]
fn logits_match_transformers_for_each_family_and_rope_spelling() {
    let tmp = tempfile::tempdir().unwrap();
    for (kind, old) in [
        ("llama", false),
        ("qwen2", false),
        ("qwen2", true),
        ("gqa-llama3", false),
        ("gqa-llama3", true),
        ("linear", false),
        ("mistral", false),
    ] {
        let dir = tmp.path().join(format!("{kind}-{old}"));
        make(&dir, kind, old);
        let cfg = DecoderConfig::from_dir(&dir).unwrap();
        match kind {
            "gqa-llama3" => {
                assert!(
                    matches!(cfg.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0)
                );
                assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads), (4, 2));
                assert!(cfg.tie_word_embeddings);
            }
            "linear" => assert_eq!(cfg.rope_scaling, RopeScaling::Linear { factor: 4.0 }),
            "qwen2" => assert!(cfg.qkv_bias && !cfg.o_bias),
            _ => assert_eq!(cfg.rope_scaling, RopeScaling::None),
        }
        check_logits(&dir, &format!("{kind} (old rope spelling: {old})"));
    }
}

#[test]
fn greedy_generation_with_the_cache_matches_transformers_over_a_ragged_batch() {
    let tmp = tempfile::tempdir().unwrap();
    for kind in ["gqa-llama3", "qwen2"] {
        let dir = tmp.path().join(kind);
        make(&dir, kind, false);
        let prompts: Vec<Vec<i64>> = vec![
            vec![5, 17, 33, 4, 90, 12, 7],
            vec![8],
            vec![44, 45, 46],
            vec![60, 3, 3, 3, 71, 72, 9, 10, 11, 12],
            vec![20, 21],
        ];
        let pj = dir.join("prompts.json");
        std::fs::write(&pj, serde_json::to_string(&prompts).unwrap()).unwrap();
        let oj = dir.join("greedy.json");
        decoder_reference(&[
            "generate",
            dir.to_str().unwrap(),
            pj.to_str().unwrap(),
            oj.to_str().unwrap(),
            "--max-new-tokens",
            "12",
        ]);
        let want: Vec<Vec<i64>> =
            serde_json::from_str(&std::fs::read_to_string(&oj).unwrap()).unwrap();
        let model = DecoderModel::load(&dir, Device::Cpu, None).unwrap();
        let opts = GenerateOptions {
            max_new_tokens: 12,
            eos_token_ids: vec![2],
            batch_size: 8,
            ..Default::default()
        };
        let got = generate(&model, None, &prompts, &opts, &mut |_, _| {}).unwrap();
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(
                &g.ids, w,
                "{kind}: prompt {i}: distill {:?} vs transformers {w:?}",
                g.ids
            );
        }
        // Batch of one (no padding at all) agrees with the padded batch.
        let single = GenerateOptions {
            batch_size: 1,
            ..opts
        };
        let one = generate(&model, None, &prompts, &single, &mut |_, _| {}).unwrap();
        for (a, b) in one.iter().zip(&got) {
            assert_eq!(a.ids, b.ids);
        }
    }
}

#[test]
fn sampling_depends_on_the_seed_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    make(&dir, "llama", false);
    let model = DecoderModel::load(&dir, Device::Cpu, None).unwrap();
    let prompts: Vec<Vec<i64>> = (0..6)
        .map(|i| (0..(i + 2)).map(|j| 3 + (i * 7 + j * 5) % 90).collect())
        .collect();
    let run = |seed: u64, batch: usize| {
        let opts = GenerateOptions {
            max_new_tokens: 10,
            sampling: Some(Sampling {
                temperature: 1.5,
                top_p: 0.95,
                top_k: 50,
                seed,
            }),
            batch_size: batch,
            logprobs_top_k: Some(4),
            ..Default::default()
        };
        generate(&model, None, &prompts, &opts, &mut |_, _| {}).unwrap()
    };
    let a = run(7, 6);
    let b = run(7, 1);
    let c = run(8, 6);
    let ids = |v: &[distill_worker::model::decoder::generate::Generated]| {
        v.iter().map(|g| g.ids.clone()).collect::<Vec<_>>()
    };
    assert_eq!(
        ids(&a),
        ids(&b),
        "same seed, different batch size: different tokens"
    );
    assert_ne!(
        ids(&a),
        ids(&c),
        "a different seed gave the same 60 sampled tokens"
    );
    // Log-probabilities: k per token, sorted, the sampled token's at most the best.
    for g in &a {
        let lp = g.logprobs.as_ref().unwrap();
        assert_eq!(lp.len(), g.ids.len());
        for t in lp {
            assert_eq!(t.top.len(), 4);
            assert!(t.top.windows(2).all(|w| w[0].1 >= w[1].1));
            assert!(t.logprob <= t.top[0].1 + 1e-6 && t.logprob < 0.0);
        }
    }
}

#[test]
fn bad_configs_are_refused_by_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = serde_json::json!({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
    });
    let cases = [
        (
            serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}),
            "rope_scaling.rope_type",
        ),
        (
            serde_json::json!({"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4}}),
            "rope_parameters.rope_type",
        ),
        (
            serde_json::json!({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}),
            "rope_parameters.low_freq_factor",
        ),
        (
            serde_json::json!({"num_key_value_heads": 3}),
            "num_key_value_heads",
        ),
        (serde_json::json!({"hidden_act": "gelu"}), "hidden_act"),
        (serde_json::json!({"model_type": "gpt2"}), "model_type"),
        (serde_json::json!({"hidden_size": "big"}), "hidden_size"),
    ];
    for (patch, field) in cases {
        let mut c = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        std::fs::write(dir.join("config.json"), c.to_string()).unwrap();
        let e = DecoderConfig::from_dir(dir).unwrap_err().to_string();
        assert!(
            e.contains("config.json") && e.contains(field),
            "{patch}: error {e:?} does not name {field}"
        );
    }
    // A missing and a mis-shaped tensor are named.
    let good = tmp.path().join("good");
    make(&good, "llama", false);
    let mut t = read_tensors(&[good.join("model.safetensors")]).unwrap();
    t.remove("model.layers.1.mlp.up_proj.weight");
    t.insert(
        "model.norm.weight".into(),
        Tensor::ones([7], (Kind::Float, Device::Cpu)),
    );
    let named: Vec<(String, Tensor)> = t.into_iter().collect();
    distill_worker::model::weights::write_safetensors(&good.join("model.safetensors"), &named)
        .unwrap();
    let e = DecoderModel::load(&good, Device::Cpu, None)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("layers.1.mlp.up_proj.weight") && e.contains("norm.weight"),
        "{e}"
    );
}

/// Distillation of a decoder on its teacher's signal: a tiny random teacher
/// generates responses with its top-8 log-probabilities; a student (half
/// the layers, from the teacher's slices) trained with forward KL on them
/// moves toward the teacher on held-out prompts — its KD loss and the
/// cross-entropy of the teacher's tokens both fall — while the same student
/// untrained stays where it was.
#[test]
fn lm_distillation_moves_the_student_toward_the_teacher() {
    use distill_worker::distill::lm_train::{eval_loss, train, LmExample, LmLoss, LmTrainConfig};
    use distill_worker::model::decoder::student::{
        derive_config, init_from_teacher, layer_map, DecoderShape, LayerChoice,
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("t");
    make(&dir, "gqa-llama3", false);
    let teacher = DecoderModel::load(&dir, Device::Cpu, None).unwrap();
    let prompts: Vec<Vec<i64>> = (0..48)
        .map(|i| {
            (0..(3 + i % 5))
                .map(|j| 3 + (i * 13 + j * 7) % 90)
                .collect()
        })
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: 12,
        sampling: Some(Sampling {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 3,
        }),
        logprobs_top_k: Some(8),
        batch_size: 16,
        ..Default::default()
    };
    let gens = generate(&teacher, None, &prompts, &opts, &mut |_, _| {}).unwrap();
    let examples: Vec<LmExample> = prompts
        .iter()
        .zip(&gens)
        .map(|(p, g)| LmExample::from_generation(p, g).unwrap())
        .collect();
    let (train_set, held) = examples.split_at(40);
    let cfg_s = derive_config(
        &teacher.config,
        &DecoderShape::Sized {
            layers: 1,
            hidden: 32,
        },
    )
    .unwrap();
    let map = layer_map(&LayerChoice::Uniform, 2, 1).unwrap();
    let mut student = DecoderModel::new(&cfg_s, Device::Cpu).unwrap();
    init_from_teacher(&mut student, &teacher, &map).unwrap();
    let cfg = LmTrainConfig {
        steps: 150,
        batch_size: 8,
        learning_rate: 3e-3,
        warmup_ratio: 0.1,
        weight_decay: 0.0,
        grad_clip: 1.0,
        temperature: 1.0,
        loss: LmLoss::ForwardKl,
        ce_weight: 0.0,
        seed: 1,
        precision: None,
    };
    let ce_cfg = LmTrainConfig {
        loss: LmLoss::SequenceCe,
        ..cfg.clone()
    };
    let (kd0, ce0) = (
        eval_loss(&student, held, &cfg).unwrap(),
        eval_loss(&student, held, &ce_cfg).unwrap(),
    );
    let teacher_ce = eval_loss(&teacher, held, &ce_cfg).unwrap();
    let mut losses = vec![];
    train(&mut student, train_set, &cfg, &mut |s| losses.push(s.loss)).unwrap();
    assert_eq!(losses.len(), 150);
    eprintln!(
        "held-out KD {kd0} -> {kd1}, CE {ce0} -> {ce1} (teacher {teacher_ce})",
        kd1 = eval_loss(&student, held, &cfg).unwrap(),
        ce1 = eval_loss(&student, held, &ce_cfg).unwrap()
    );
    let (kd1, ce1) = (
        eval_loss(&student, held, &cfg).unwrap(),
        eval_loss(&student, held, &ce_cfg).unwrap(),
    );
    assert!(
        kd1 < 0.7 * kd0,
        "held-out forward KL {kd0} -> {kd1}: not 30 % lower"
    );
    assert!(
        ce1 < ce0,
        "held-out CE of the teacher's tokens {ce0} -> {ce1}"
    );
    assert!(
        ce1 > teacher_ce * 0.9,
        "the student ({ce1}) beats its teacher ({teacher_ce}) on the teacher's own samples"
    );
    // The compact signal file: the same sequences back, log-probabilities
    // within fp16's precision, the same held-out loss to 1e-3; a truncated
    // file is refused naming it.
    let path = tmp.path().join("signal.safetensors");
    distill_worker::distill::lm_train::write_signal(&path, held).unwrap();
    let back = distill_worker::distill::lm_train::read_signal(&path).unwrap();
    assert_eq!(back.len(), held.len());
    for (a, b) in back.iter().zip(held) {
        assert_eq!(
            (&a.ids, a.prompt_len, &a.topk_ids),
            (&b.ids, b.prompt_len, &b.topk_ids)
        );
        for (x, y) in a.topk_logp.iter().zip(&b.topk_logp) {
            assert!((x - y).abs() <= 1e-3 * y.abs().max(1.0), "{x} vs {y}");
        }
    }
    let (l_back, l_orig) = (
        eval_loss(&student, &back, &cfg).unwrap(),
        eval_loss(&student, held, &cfg).unwrap(),
    );
    assert!(
        (l_back - l_orig).abs() < 1e-3,
        "loss on the compact signal {l_back} vs {l_orig}"
    );
    let resp: usize = held.iter().map(|e| e.response_len()).sum();
    let size = std::fs::metadata(&path).unwrap().len() as usize;
    assert!(
        size < resp * (8 * 6 + 4) + 2048 + held.iter().map(|e| e.ids.len() * 4).sum::<usize>(),
        "{size} bytes for {resp} tokens"
    );
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let e = distill_worker::distill::lm_train::read_signal(&path)
        .unwrap_err()
        .to_string();
    assert!(e.contains("signal.safetensors"), "{e}");

    // A loss without the teacher's top-k is refused by name.
    let bare: Vec<LmExample> = train_set
        .iter()
        .map(|e| LmExample {
            topk_ids: vec![],
            topk_logp: vec![],
            ..e.clone()
        })
        .collect();
    let err = train(
        &mut student,
        &bare,
        &LmTrainConfig {
            steps: 1,
            ..cfg.clone()
        },
        &mut |_| {},
    )
    .unwrap_err();
    assert!(err.to_string().contains("--logprobs"), "{err}");
}
