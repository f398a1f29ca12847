//! Students derived from the real MiniLM-L6 teacher.

mod common;

use common::*;
use distill_worker::model::export::export;
use distill_worker::model::student::{
    derive_config, init_from_teacher, uniform_layer_map, StudentShape,
};
use distill_worker::model::weights::read_tensors;
use distill_worker::model::{Outputs, Task, TaskModel};
use distill_worker::tokenize::{Padding, TextTokenizer};
use tch::Device;

#[test]
fn half_size_student_loads_in_transformers() {
    let teacher_dir = minilm_dir();
    let teacher = TaskModel::load(&teacher_dir, Task::Embedding, None, Device::Cpu).unwrap();
    let cfg = derive_config(teacher.config(), &StudentShape::CompressionRatio(0.5)).unwrap();
    let mut student = TaskModel::new(&cfg, Task::Embedding, vec![], Device::Cpu).unwrap();
    student.normalize = true;
    init_from_teacher(
        &mut student,
        &teacher,
        &uniform_layer_map(6, cfg.num_hidden_layers),
    )
    .unwrap();
    let kept = student.num_params() as f64 / teacher.num_params() as f64;
    assert!(
        (0.45..=0.55).contains(&kept),
        "student keeps {kept} of the teacher's parameters"
    );

    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("student");
    export(&student, &out, &teacher_dir).unwrap();

    // transformers loads it with no missing/unexpected weights (reference.py
    // fails otherwise) and computes the same embeddings.
    let tok = TextTokenizer::load(&out, student.config(), 64).unwrap();
    let enc = tok
        .encode(
            &["a quietly moving film", "dull, overlong and confused"],
            None,
        )
        .unwrap();
    let refs: Vec<_> = enc.iter().collect();
    let batch = tok.batch(&refs, Padding::Dynamic, Device::Cpu);
    let inputs = tmp.path().join("inputs.safetensors");
    save_batch(&batch, &inputs);
    let reference_out = tmp.path().join("ref.safetensors");
    reference(&[
        "run",
        out.to_str().unwrap(),
        inputs.to_str().unwrap(),
        reference_out.to_str().unwrap(),
        "--task",
        "embedding",
        "--normalize",
    ]);
    let r = read_tensors(&[reference_out]).unwrap();
    let ours = tch::no_grad(|| student.forward_t(&batch, Outputs::default(), false)).output;
    assert!(max_abs_diff(&ours, &r["embeddings"]) < 1e-5);
}
