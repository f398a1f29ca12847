//! Malformed job specs: each gets a precise error naming the field (and, for
//! TOML, the line), and well-formed minimal specs get sane defaults.

use distill_spec::*;

const MINIMAL: &str = r#"
task = "text_classification"

[teacher]
path = "models/teacher"

[data]
train = "train.jsonl"
"#;

/// The single problem in `src`, asserting there is exactly one.
fn one_error(src: &str) -> FieldError {
    match from_toml_str(src) {
        Ok(spec) => panic!("expected an error, got {spec:?}"),
        Err(e) => {
            let p = e.problems();
            assert_eq!(p.len(), 1, "expected one problem, got {p:?}");
            p[0].clone()
        }
    }
}

#[test]
fn minimal_spec_gets_defaults() {
    let spec = from_toml_str(MINIMAL).unwrap();
    assert_eq!(spec.data.text_field, "text");
    assert_eq!(spec.data.label_field, "label");
    assert_eq!(spec.data.max_length, 128);
    assert_eq!(spec.training.batch_size, 32);
    assert_eq!(spec.training.length, TrainingLength::Epochs(3));
    assert_eq!(spec.training.precision, Precision::Fp32);
    assert_eq!(spec.distill.kd, Weight::Auto);
    assert_eq!(spec.distill.layer_map, LayerMap::Uniform);
    assert_eq!(
        spec.distill.temperature,
        Temperature {
            start: 4.0,
            end: 1.0
        }
    );
    assert_eq!(spec.quantization.formats, QuantFormats::Auto);
    assert_eq!((spec.cluster.min_workers, spec.cluster.max_workers), (1, 1));
    assert_eq!(
        spec.student.size,
        StudentSize::Ratio {
            compression_ratio: 0.5
        }
    );
}

#[test]
fn syntax_error_names_the_line() {
    let e = one_error("task = \"text_classification\"\n[teacher]\npath = \"x\n");
    assert_eq!(e.line, Some(3), "{e}");
}

#[test]
fn unknown_field_is_named_with_its_line() {
    let src = format!("{MINIMAL}\n[training]\nbatch_size = 8\nbatchsize = 16\n");
    let e = one_error(&src);
    assert_eq!(e.field, "training.batchsize", "{e}");
    assert!(e.message.contains("unknown field `batchsize`"), "{e}");
    assert_eq!(e.line, Some(12), "{e}");
}

#[test]
fn unknown_section_is_refused() {
    let e = one_error(&format!("{MINIMAL}\n[trainig]\nepochs = 1\n"));
    assert!(e.message.contains("unknown field `trainig`"), "{e}");
}

#[test]
fn wrong_type_names_field_and_line() {
    let src = format!("{MINIMAL}\n[training]\nbatch_size = \"big\"\n");
    let e = one_error(&src);
    assert_eq!(e.field, "training.batch_size", "{e}");
    assert!(e.message.contains("invalid type"), "{e}");
    assert_eq!(e.line, Some(11), "{e}");
}

#[test]
fn missing_teacher_section() {
    let e = one_error("task = \"text_classification\"\n[data]\ntrain = \"t.jsonl\"\n");
    assert_eq!(e.field, "teacher");
    assert!(e.message.contains("missing section [teacher]"), "{e}");
}

#[test]
fn missing_teacher_path() {
    let e = one_error("task = \"text_classification\"\n[teacher]\nfine_tune = true\n[data]\ntrain = \"t.jsonl\"\n");
    assert_eq!(e.field, "teacher.path");
    assert_eq!(e.line, Some(2), "points at the [teacher] table: {e}");
}

#[test]
fn negative_and_zero_batch_size() {
    for (value, word) in [("-4", "-4"), ("0", "0")] {
        let e = one_error(&format!("{MINIMAL}\n[training]\nbatch_size = {value}\n"));
        assert_eq!(e.field, "training.batch_size");
        assert_eq!(e.message, format!("must be a positive integer, got {word}"));
        assert_eq!(e.line, Some(11));
    }
}

#[test]
fn min_workers_greater_than_max_workers() {
    let e = one_error(&format!(
        "{MINIMAL}\n[cluster]\nmin_workers = 4\nmax_workers = 2\n"
    ));
    assert_eq!(e.field, "cluster.min_workers");
    assert_eq!(e.message, "min_workers (4) is greater than max_workers (2)");
    assert_eq!(e.line, Some(11));
}

#[test]
fn max_workers_defaults_to_min_workers() {
    let spec = from_toml_str(&format!("{MINIMAL}\n[cluster]\nmin_workers = 4\n")).unwrap();
    assert_eq!((spec.cluster.min_workers, spec.cluster.max_workers), (4, 4));
}

#[test]
fn out_of_range_ratios() {
    let cases = [
        (
            "[student]\ncompression_ratio = 1.5",
            "student.compression_ratio",
            "in (0, 1)",
        ),
        (
            "[student]\ncompression_ratio = 0",
            "student.compression_ratio",
            "in (0, 1)",
        ),
        (
            "[training]\nwarmup_ratio = 1.0",
            "training.warmup_ratio",
            "in [0, 1)",
        ),
        (
            "[quantization]\nmax_accuracy_drop = -0.1",
            "quantization.max_accuracy_drop",
            "in [0, 1]",
        ),
        ("[distill]\nkd = -1", "distill.kd", "non-negative"),
        (
            "[distill]\ntemperature = { start = 0.0 }",
            "distill.temperature.start",
            "positive",
        ),
    ];
    for (section, field, want) in cases {
        let e = one_error(&format!("{MINIMAL}\n{section}\n"));
        assert_eq!(e.field, field, "{e}");
        assert!(e.message.contains(want), "{e}");
        assert_eq!(e.line, Some(11), "{e}");
    }
}

#[test]
fn unknown_enum_words_list_the_choices() {
    let e = one_error(&format!("{MINIMAL}\n[training]\nprecision = \"fp8\"\n"));
    assert_eq!(e.field, "training.precision");
    assert_eq!(
        e.message,
        "unknown value \"fp8\", expected one of \"fp32\", \"bf16\", \"fp16\""
    );
    let e = one_error("task = \"summarize\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"t\"\n");
    assert_eq!((e.field.as_str(), e.line), ("task", Some(1)));
}

#[test]
fn student_sizes_are_exclusive_and_presets_checked() {
    let e = one_error(&format!(
        "{MINIMAL}\n[student]\npreset = \"L4-H312\"\ncompression_ratio = 0.3\n"
    ));
    assert_eq!(e.field, "student");
    let e = one_error(&format!("{MINIMAL}\n[student]\npreset = \"tiny\"\n"));
    assert_eq!(e.field, "student.preset");
    let e = one_error(&format!("{MINIMAL}\n[student]\nhidden_size = 384\n"));
    assert_eq!(e.field, "student.layers");
    let e = one_error(&format!(
        "{MINIMAL}\n[student]\nlayers = 4\nhidden_size = 384\nnum_heads = 5\n"
    ));
    assert_eq!(e.field, "student.num_heads");
    let spec = from_toml_str(&format!("{MINIMAL}\n[student]\npreset = \"L4-H312\"\n")).unwrap();
    let want = StudentArch {
        layers: 4,
        hidden_size: 312,
        num_heads: 12,
        intermediate_size: 1248,
    };
    assert_eq!(spec.student.size, StudentSize::Explicit(want));
}

#[test]
fn layer_maps_match_student_depth() {
    let e = one_error(&format!(
        "{MINIMAL}\n[student]\npreset = \"L4-H312\"\nlayer_map = [0, 1]\n"
    ));
    assert_eq!(e.field, "student.layer_map");
    assert!(
        e.message.contains("2 entries but the student has 4 layers"),
        "{e}"
    );
    let e = one_error(&format!(
        "{MINIMAL}\n[student]\npreset = \"L3-H384\"\n[distill]\nlayer_map = [1, -3, 5]\n"
    ));
    assert_eq!(e.field, "distill.layer_map[1]", "{e}");
    let e = one_error(&format!("{MINIMAL}\n[distill]\nlayer_map = \"middle\"\n"));
    assert_eq!(e.field, "distill.layer_map");
    let spec = from_toml_str(&format!("{MINIMAL}\n[distill]\nlayer_map = \"last\"\n")).unwrap();
    assert_eq!(spec.distill.layer_map, LayerMap::Last);
}

#[test]
fn offline_teacher_cannot_feed_intermediate_losses() {
    let e = one_error(&format!(
        "{MINIMAL}\n[distill]\nhidden = 1.0\nteacher_signal = \"offline\"\n"
    ));
    assert_eq!(e.field, "distill.hidden");
    assert!(from_toml_str(&format!(
        "{MINIMAL}\n[distill]\nhidden = 1.0\nteacher_signal = \"online\"\n"
    ))
    .is_ok());
}

#[test]
fn epochs_and_steps_are_exclusive() {
    let e = one_error(&format!("{MINIMAL}\n[training]\nepochs = 1\nsteps = 10\n"));
    assert_eq!(e.field, "training");
}

#[test]
fn quantization_formats_are_checked() {
    let e = one_error(&format!(
        "{MINIMAL}\n[quantization]\nformats = [\"int8\", \"int3\"]\n"
    ));
    assert_eq!(e.field, "quantization.formats[1]");
    let spec = from_toml_str(&format!(
        "{MINIMAL}\n[quantization]\nformats = [\"int8\", \"int4\"]\n"
    ))
    .unwrap();
    assert_eq!(
        spec.quantization.formats,
        QuantFormats::List(vec![QuantFormat::Int8, QuantFormat::Int4])
    );
}

#[test]
fn pair_task_gets_a_pair_field_and_others_refuse_it() {
    let src = MINIMAL.replace("text_classification", "text_pair_classification");
    assert_eq!(
        from_toml_str(&src).unwrap().data.text_pair_field.as_deref(),
        Some("text_pair")
    );
    let e = one_error(&format!("{MINIMAL}text_pair_field = \"b\"\n"));
    assert_eq!(e.field, "data.text_pair_field");
}

#[test]
fn every_problem_is_reported_in_line_order() {
    let src = format!("{MINIMAL}\n[training]\nbatch_size = -1\nlearning_rate = 0\n[cluster]\nmin_workers = 3\nmax_workers = 1\n");
    let err = from_toml_str(&src).unwrap_err();
    let fields: Vec<_> = err.problems().iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "training.batch_size",
            "training.learning_rate",
            "cluster.min_workers"
        ]
    );
    let text = err.to_string();
    assert!(
        text.starts_with("training.batch_size: must be a positive integer, got -1 (line 11)"),
        "{text}"
    );
    assert!(!text.ends_with('.'));
}

#[test]
fn json_errors_name_field_and_line() {
    let src = "{\n  \"task\": \"text_classification\",\n  \"teacher\": {\"path\": \"t\"},\n  \"training\": {\"batch_size\": true}\n}";
    let err = from_json_str(src).unwrap_err();
    let e = &err.problems()[0];
    assert_eq!(e.field, "training.batch_size");
    assert_eq!(e.line, Some(4));
    let err = from_json_str(
        "{\"task\": \"text_classification\", \"teacher\": {\"path\": \"t\", \"size\": 1}}",
    )
    .unwrap_err();
    assert!(err.to_string().contains("unknown field `size`"), "{err}");
}

/// Validation errors (after parsing) carry JSON lines too, every one of
/// them, in line order; a missing field gets its parent's line.
#[test]
fn json_validation_errors_carry_lines() {
    let src = concat!(
        "{\n",
        "  \"task\": \"text_classification\",\n",
        "  \"teacher\": {\"path\": \"t\"},\n",
        "  \"data\": {\n",
        "    \"train\": \"a, \\\"b\\\" {c}.jsonl\",\n",
        "    \"labels\": [\"x\", \"x\"]\n",
        "  },\n",
        "  \"training\": {\n",
        "    \"learning_rate\": 1e-4,\n",
        "    \"batch_size\": -1\n",
        "  },\n",
        "  \"cluster\": {\"min_workers\": 4,\n \"max_workers\": 2}\n",
        "}\n"
    );
    let err = from_json_str(src).unwrap_err();
    let got: Vec<(String, Option<usize>)> = err
        .problems()
        .iter()
        .map(|e| (e.field.clone(), e.line))
        .collect();
    assert!(
        got.contains(&("training.batch_size".into(), Some(10))),
        "{got:?}"
    );
    assert!(
        got.contains(&("cluster.min_workers".into(), Some(12))),
        "{got:?}"
    );
    let lines: Vec<_> = got.iter().map(|(_, l)| l.unwrap_or(usize::MAX)).collect();
    assert!(
        lines.windows(2).all(|w| w[0] <= w[1]),
        "in line order: {got:?}"
    );
    assert!(err.to_string().contains("(line 10)"), "{err}");
}

#[test]
fn json_and_toml_give_the_same_spec() {
    let toml_spec = from_toml_str(MINIMAL).unwrap();
    let json = r#"{"task": "text_classification", "teacher": {"path": "models/teacher"}, "data": {"train": "train.jsonl"}}"#;
    assert_eq!(from_json_str(json).unwrap(), toml_spec);
    assert_eq!(from_json_str(&toml_spec.to_json()).unwrap(), toml_spec);
}

#[test]
fn missing_file_is_an_io_error() {
    let err = load(std::path::Path::new("/nonexistent/job.toml")).unwrap_err();
    assert!(matches!(err, SpecError::Io { .. }));
    assert!(err
        .to_string()
        .starts_with("cannot read job spec /nonexistent/job.toml"));
}

#[test]
fn sharding_fields_default_and_are_checked() {
    let spec = from_toml_str(MINIMAL).unwrap();
    assert_eq!((spec.data.shard_size, spec.data.num_samples), (1024, None));
    let spec = from_toml_str(&format!("{MINIMAL}shard_size = 7\nnum_samples = 100\n")).unwrap();
    assert_eq!(
        (spec.data.shard_size, spec.data.num_samples),
        (7, Some(100))
    );
    let e = one_error(&format!("{MINIMAL}shard_size = 0\n"));
    assert_eq!(e.field, "data.shard_size");
    assert_eq!(e.message, "must be a positive integer, got 0");
    let e = one_error(&format!("{MINIMAL}num_samples = -3\n"));
    assert_eq!(e.field, "data.num_samples");
    let back = from_json_str(
        &from_toml_str(&format!("{MINIMAL}num_samples = 5\n"))
            .unwrap()
            .to_json(),
    )
    .unwrap();
    assert_eq!(back.data.num_samples, Some(5));
}

#[test]
fn learning_rate_schedule_and_optimizer_choices() {
    assert_eq!(
        from_toml_str(MINIMAL).unwrap().training.lr_schedule,
        LrSchedule::Linear
    );
    let cosine =
        from_toml_str(&format!("{MINIMAL}[training]\nlr_schedule = \"cosine\"\n")).unwrap();
    assert_eq!(cosine.training.lr_schedule, LrSchedule::Cosine);
    let e = one_error(&format!("{MINIMAL}[training]\nlr_schedule = \"step\"\n"));
    assert_eq!(e.field, "training.lr_schedule");
    assert!(
        e.message.contains("\"linear\", \"cosine\""),
        "{}",
        e.message
    );
    // Only AdamW is built: anything else is refused, not silently ignored.
    let e = one_error(&format!("{MINIMAL}[training]\noptimizer = \"sgd\"\n"));
    assert_eq!((e.field.as_str(), e.line), ("training.optimizer", Some(10)));
}

#[test]
fn job_names_are_safe_path_components() {
    let base =
        "task = \"text_classification\"\n[teacher]\npath = \"t\"\n[data]\ntrain = \"d.jsonl\"\n";
    for bad in [
        "../../leader",
        "a/b",
        "",
        ".hidden",
        "-x",
        "sp ace",
        &"x".repeat(65),
    ] {
        let spec = format!("name = {bad:?}\n{base}");
        let e = distill_spec::parse(&spec, distill_spec::Format::Toml)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("name") && e.contains("not a safe job name"),
            "{bad:?}: {e}"
        );
    }
    for good in ["sentiment-quickstart", "run_2.v1", "A"] {
        let spec = format!("name = {good:?}\n{base}");
        assert!(
            distill_spec::parse(&spec, distill_spec::Format::Toml).is_ok(),
            "{good}"
        );
    }
}

#[test]
fn quantization_and_teacher_budget_fields_are_checked() {
    let spec = from_toml_str(MINIMAL).unwrap();
    assert_eq!(spec.quantization.hardware, Hardware::Cpu);
    assert_eq!(spec.quantization.group_size, 32);
    assert!(!spec.quantization.keep_all);
    assert_eq!(spec.teacher.epochs, 2);
    assert_eq!(spec.teacher.learning_rate, None);
    // "gpu" is the same target as "nvidia_gpu"; "int8" is its INT8.
    let gpu = from_toml_str(&format!(
        "{MINIMAL}[quantization]\nhardware = \"gpu\"\nformats = [\"int8\"]\n"
    ))
    .unwrap();
    assert_eq!(gpu.quantization.hardware, Hardware::NvidiaGpu);
    let e = one_error(&format!(
        "{MINIMAL}[quantization]\nhardware = \"nvidia_gpu\"\nformats = [\"int8_dynamic\"]\n"
    ));
    assert_eq!(e.field, "quantization.formats[0]", "{e}");
    let e = one_error(&format!("{MINIMAL}[quantization]\ngroup_size = 48\n"));
    assert_eq!(e.field, "quantization.group_size", "{e}");
    let ok = from_toml_str(&MINIMAL.replace(
        "path = \"models/teacher\"",
        "path = \"models/teacher\"\nfine_tune = true\nepochs = 3\nlearning_rate = 2e-5",
    ))
    .unwrap();
    assert_eq!(
        (ok.teacher.epochs, ok.teacher.learning_rate),
        (3, Some(2e-5))
    );
}

#[test]
fn a_temperature_is_a_number_or_a_start_and_end() {
    for (text, want) in [
        ("2", (2.0, 2.0)),
        ("1.5", (1.5, 1.5)),
        ("{ end = 2.0 }", (4.0, 2.0)),
    ] {
        let spec = from_toml_str(&format!("{MINIMAL}\n[distill]\ntemperature = {text}\n")).unwrap();
        let t = spec.distill.temperature;
        assert_eq!((t.start, t.end), want, "temperature = {text}");
    }
    let e = one_error(&format!("{MINIMAL}\n[distill]\ntemperature = \"hot\"\n"));
    assert!(
        e.message
            .contains("a number (a constant temperature) or a table"),
        "{e}"
    );
    assert_eq!(e.line, Some(11), "{e}");
    let e = one_error(&format!(
        "{MINIMAL}\n[distill]\ntemperature = {{ begin = 2.0 }}\n"
    ));
    assert!(e.message.contains("begin"), "{e}");
    let Err(e) = from_toml_str(&format!("{MINIMAL}\n[distill]\ntemperature = 0\n")) else {
        panic!("temperature = 0 accepted");
    };
    let fields: Vec<_> = e.problems().iter().map(|p| p.field.clone()).collect();
    assert_eq!(
        fields,
        ["distill.temperature.start", "distill.temperature.end"],
        "{e}"
    );
}
