//! Batched, frozen, no-grad inference: the teacher-signal path.
//!
//! Examples are tokenized once, grouped into batches (length-bucketed by
//! default, so each batch pads only to its own longest example), run under
//! `no_grad`, and scattered back so row `i` of the output is example `i`.

use crate::model::{Outputs, TaskModel};
use crate::tokenize::{batches, Encoded, Padding, TextTokenizer};
use crate::Result;
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy)]
pub struct InferOptions {
    pub batch_size: usize,
    pub padding: Padding,
    /// Sort by length before batching (only useful with dynamic padding).
    pub bucket: bool,
}

impl Default for InferOptions {
    fn default() -> Self {
        InferOptions {
            batch_size: 64,
            padding: Padding::Dynamic,
            bucket: true,
        }
    }
}

/// Run `model` over `examples`; returns `[n, d]` float32 on the CPU in input
/// order. `progress(done, total)` is called after every batch.
pub fn infer(
    model: &TaskModel,
    tok: &TextTokenizer,
    examples: &[Encoded],
    opts: InferOptions,
    mut progress: impl FnMut(usize, usize),
) -> Result<Tensor> {
    let lengths: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let plan = batches(
        &lengths,
        opts.batch_size,
        opts.bucket && opts.padding == Padding::Dynamic,
    );
    let device = model.device();
    let mut rows: Vec<Option<Tensor>> = (0..examples.len()).map(|_| None).collect();
    let mut done = 0;
    let _guard = tch::no_grad_guard();
    for idx in plan {
        let refs: Vec<&Encoded> = idx.iter().map(|&i| &examples[i]).collect();
        let batch = tok.batch(&refs, opts.padding, device);
        let out = model.forward_t(&batch, Outputs::default(), false).output;
        let out = out.to_kind(Kind::Float).to_device(tch::Device::Cpu);
        for (r, &i) in idx.iter().enumerate() {
            rows[i] = Some(out.get(r as i64));
        }
        done += idx.len();
        progress(done, examples.len());
    }
    let rows: Vec<Tensor> = rows
        .into_iter()
        .map(|r| r.expect("every example is in one batch"))
        .collect();
    Ok(Tensor::stack(&rows, 0))
}
