//! Fresh parameters are seeded from the job seed and their own name
//! (`model::init_by_name`): the same seed gives the same values whatever
//! the global random state, however many other parameters exist, and on
//! any thread; another seed gives other values.

mod common;

use common::*;
use distill_worker::model::student::{derive_config, StudentShape};
use distill_worker::model::{BertConfig, Task, TaskModel};
use tch::{Device, Kind, Tensor};

fn shape(layers: i64) -> BertConfig {
    let base = BertConfig::from_dir(&minilm_dir()).unwrap();
    derive_config(
        &base,
        &StudentShape::Explicit {
            layers,
            hidden: 32,
            heads: 2,
            intermediate: 64,
        },
    )
    .unwrap()
}

fn vars(m: &TaskModel) -> std::collections::HashMap<String, Tensor> {
    m.vs.variables()
}

#[test]
fn fresh_parameters_depend_on_the_seed_and_their_name_only() {
    let labels = vec!["a".to_string(), "b".to_string()];
    tch::manual_seed(1);
    let _ = Tensor::randn([1000], (Kind::Float, Device::Cpu));
    let one = TaskModel::new_seeded(
        &shape(1),
        Task::Classification,
        labels.clone(),
        Device::Cpu,
        5,
    )
    .unwrap();
    tch::manual_seed(999);
    let two = TaskModel::new_seeded(
        &shape(2),
        Task::Classification,
        labels.clone(),
        Device::Cpu,
        5,
    )
    .unwrap();
    let other = std::thread::spawn({
        let labels = labels.clone();
        move || {
            let m = TaskModel::new_seeded(&shape(1), Task::Classification, labels, Device::Cpu, 5)
                .unwrap();
            vars(&m)
                .into_iter()
                .map(|(n, t)| (n, Vec::<f32>::try_from(t.reshape([-1])).unwrap()))
                .collect::<Vec<_>>()
        }
    })
    .join()
    .unwrap();
    let reseeded =
        TaskModel::new_seeded(&shape(1), Task::Classification, labels, Device::Cpu, 6).unwrap();
    let (v1, v2, v6) = (vars(&one), vars(&two), vars(&reseeded));
    assert!(v2.len() > v1.len());
    for (name, t) in &v1 {
        // Layer 0, the embeddings and the head exist in both shapes.
        assert!(
            t.equal(&v2[name]),
            "{name} depends on the model's other parameters or the global RNG"
        );
        let random = !(name.ends_with(".bias") || name.ends_with("LayerNorm.weight"));
        if random {
            assert!(!t.equal(&v6[name]), "{name} ignores the seed");
            let std = t.std(true).double_value(&[]);
            assert!(
                (std - 0.02).abs() < 0.01,
                "{name}: std {std}, want the config's initializer_range"
            );
        }
    }
    for (name, v) in other {
        let here = Vec::<f32>::try_from(v1[&name].reshape([-1])).unwrap();
        assert_eq!(here, v, "{name} differs on another thread");
    }
}
