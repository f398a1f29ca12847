//! AdamW with state we own (moments as named tensors), so checkpoints can
//! save and restore it exactly. Decoupled weight decay (Loshchilov & Hutter)
//! is applied to matrices only, not to biases and LayerNorm parameters:
//!
//! ```text
//! m ← β1·m + (1−β1)·g        v ← β2·v + (1−β2)·g²
//! p ← p − lr·( m/(1−β1ᵗ) / (√(v/(1−β2ᵗ)) + ε) + wd·p )
//! ```

use tch::Tensor;

pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Number of updates applied so far (t).
    pub t: u64,
    /// First and second moments, by parameter name.
    pub m: Vec<(String, Tensor)>,
    pub v: Vec<(String, Tensor)>,
}

impl AdamW {
    pub fn new(params: &[(String, Tensor)], weight_decay: f64) -> Self {
        let zeros = |p: &Tensor| p.zeros_like();
        AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
            t: 0,
            m: params.iter().map(|(n, p)| (n.clone(), zeros(p))).collect(),
            v: params.iter().map(|(n, p)| (n.clone(), zeros(p))).collect(),
        }
    }

    /// Apply one update from `grads` (one per parameter, as [`gradients`]
    /// returns them; an undefined gradient skips its parameter). Every state
    /// tensor is updated in place; the only temporaries per parameter are
    /// `g²` and the denominator.
    pub fn step(&mut self, params: &[(String, Tensor)], grads: &[Tensor], lr: f64) {
        assert_eq!(params.len(), grads.len(), "one gradient per parameter");
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let bc1 = 1.0 - b1.powi(self.t as i32);
        let bc2 = 1.0 - b2.powi(self.t as i32);
        tch::no_grad(|| {
            for (i, ((_, p), g)) in params.iter().zip(grads).enumerate() {
                if !g.defined() {
                    continue;
                }
                let m = &mut self.m[i].1;
                let v = &mut self.v[i].1;
                let _ = m.lerp_(g, 1.0 - b1);
                let _ = v.lerp_(&(g * g), 1.0 - b2);
                if lr == 0.0 {
                    continue; // moments advance; the parameter does not move
                }
                let mut p = p.shallow_clone();
                if p.dim() >= 2 && self.weight_decay > 0.0 {
                    let _ = p.g_mul_scalar_(1.0 - lr * self.weight_decay);
                }
                // p += m / d with d = (√(v/bc2) + ε) · (−bc1/lr), i.e. p −= lr/bc1 · m / (√v̂ + ε).
                let mut d = v.sqrt();
                let _ = d.g_div_scalar_(bc2.sqrt());
                let _ = d.g_add_scalar_(self.eps);
                let _ = d.g_mul_scalar_(-bc1 / lr);
                let _ = p.addcdiv_(m, &d);
            }
        });
    }
}

/// The gradient of `loss` with respect to each parameter, computed by the
/// autograd engine without touching any `.grad()` field: nothing to zero
/// before a step and no accumulation pass into stale buffers (what
/// PyTorch's `zero_grad(set_to_none=True)` buys). A parameter that does
/// not require grad, or that `loss` does not depend on, gets an undefined
/// tensor.
pub fn gradients(loss: &Tensor, params: &[(String, Tensor)]) -> Vec<Tensor> {
    let live: Vec<usize> = (0..params.len())
        .filter(|&i| params[i].1.requires_grad())
        .collect();
    let inputs: Vec<&Tensor> = live.iter().map(|&i| &params[i].1).collect();
    let mut computed = Tensor::run_backward(&[loss], &inputs, false, false).into_iter();
    let mut out: Vec<Tensor> = (0..params.len()).map(|_| Tensor::new()).collect();
    for i in live {
        out[i] = computed.next().expect("one gradient per input");
    }
    out
}

/// Adds `more` into `acc` (gradient accumulation over micro-batches).
pub fn accumulate(acc: &mut [Tensor], more: Vec<Tensor>) {
    for (a, g) in acc.iter_mut().zip(more) {
        if !g.defined() {
            continue;
        }
        if a.defined() {
            let _ = a.g_add_(&g);
        } else {
            *a = g;
        }
    }
}

/// Global L2 norm of the gradients.
pub fn grad_norm(grads: &[Tensor]) -> f64 {
    let norms: Vec<Tensor> = grads
        .iter()
        .filter(|g| g.defined())
        .map(|g| g.norm())
        .collect();
    if norms.is_empty() {
        return 0.0;
    }
    // One reduction and one host sync for all parameters.
    Tensor::stack(&norms, 0)
        .to_kind(tch::Kind::Double)
        .norm()
        .double_value(&[])
}

/// Scale gradients so their global norm is at most `max_norm`; returns the
/// norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    if max_norm > 0.0 && norm.is_finite() && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        tch::no_grad(|| {
            for g in grads.iter_mut().filter(|g| g.defined()) {
                let _ = g.g_mul_scalar_(scale);
            }
        });
    }
    norm
}
