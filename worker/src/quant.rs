//! Post-training quantization of a trained student, on libtorch's own
//! low-precision kernels, so a quantized model is faster, not only smaller.
//!
//! | scheme | weights | activations | kernel (CPU) |
//! |---|---|---|---|
//! | `fp16`, `bf16` | every variable cast | same dtype | libtorch's dense kernels |
//! | `int8_dynamic` | int8, symmetric, one scale per output channel | fp32, quantized to uint8 per batch by the kernel | FBGEMM `fbgemm_linear_int8_weight_fp32_activation` (PyTorch's x86 dynamic INT8), through `csrc/quant.cpp` |
//! | `int8_weight_only` | int8, symmetric, one scale per output channel | bf16 | `_weight_int8pack_mm` |
//! | `int4` | 4-bit, asymmetric, one scale and zero per group of `group_size` inputs per output channel | bf16 | `_convert_weight_to_int4pack_for_cpu` + `_weight_int4pack_mm_for_cpu` |
//!
//! The integer schemes quantize the encoder's linear layers and the pooler
//! (as PyTorch's `quantize_dynamic` does for `nn.Linear`) and store the
//! word-embedding table as int8 rows (`QEmbedding`); position and
//! token-type embeddings, layer norms and the classifier stay fp32. The
//! full description is `docs/quantization.md`. Per-channel INT8 on FBGEMM: the
//! kernel takes one weight scale, so it runs with scale 1 and bias `b/s`,
//! and the per-channel scales are applied to its output in place
//! (`(x·qᵀ + b/s)·s = x·(q·s)ᵀ + b`), which is exact because the scale of
//! output channel `n` multiplies only column `n`.
//!
//! Storage (see `save`): the float tensors as in a Hugging Face checkpoint,
//! plus per quantized layer `NAME.qweight` (int8 `[out, in]`, or for int4
//! uint8 `[out, in/2]`, two 4-bit codes per byte, the even input column in
//! the low nibble), `NAME.scales` (fp32 `[out]`, int8) or
//! `NAME.scales_zeros` (fp32 `[in/group, out, 2]`, int4: `w = (code − 8) ·
//! scale + zero`), `NAME.bias`; and `quantization.json` naming the scheme
//! and the layers. The packed kernel layouts are rebuilt at load, so a
//! file does not depend on the CPU that wrote it.

use crate::error::shim_result;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::os::raw::{c_char, c_int};
use tch::{Device, Kind, Tensor};

extern "C" {
    fn distill_fbgemm_available() -> c_int;
    fn distill_fbgemm_pack(
        w: *const torch_sys::C_tensor,
        err: *mut c_char,
        errlen: c_int,
    ) -> *mut torch_sys::C_tensor;
    #[allow(clippy::too_many_arguments)]
    fn distill_fbgemm_linear(
        input: *const torch_sys::C_tensor,
        weight: *const torch_sys::C_tensor,
        packed: *const torch_sys::C_tensor,
        col_offsets: *const torch_sys::C_tensor,
        weight_scale: f64,
        weight_zero_point: i64,
        bias: *const torch_sys::C_tensor,
        err: *mut c_char,
        errlen: c_int,
    ) -> *mut torch_sys::C_tensor;
}

const ERRLEN: usize = 1024;

/// Whether FBGEMM's INT8 GEMM can overflow on this CPU. Without
/// AVX512-VNNI it multiplies the uint8 activations by the int8 weights
/// with `vpmaddubsw`, which adds each pair of products into an int16 with
/// saturation: 2·255·127 = 64 770 does not fit, so a large pair of
/// weights against large activations comes out clipped (on an AVX2 EPYC:
/// 0.43 off in an output range of 3.7, `worker/tests/quant.rs`). PyTorch
/// avoids it with 7-bit activations (`reduce_range`), which this kernel
/// does not offer; distill splits each weight in two halves that cannot
/// saturate instead (exact, twice the kernel time). With VNNI
/// (`vpdpbusd`, int32 sums) one product is exact.
pub fn fbgemm_int16_saturates() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !std::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this libtorch has FBGEMM (the x86 dynamic-INT8 kernels).
pub fn fbgemm_available() -> bool {
    // SAFETY: a plain C call; the shim catches every exception.
    unsafe { distill_fbgemm_available() == 1 }
}

/// Whether this machine's CPU has any of `flags` (`/proc/cpuinfo`).
fn cpu_flags(flags: &[&str]) -> bool {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.starts_with("flags"))
        .take(1)
        .any(|l| l.split_whitespace().any(|f| flags.contains(&f)))
}

/// A quantization scheme for the student.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum Scheme {
    Fp16,
    Bf16,
    Int8Dynamic,
    Int8WeightOnly,
    Int4 { group_size: i64 },
}

impl Scheme {
    pub fn name(&self) -> &'static str {
        match self {
            Scheme::Fp16 => "fp16",
            Scheme::Bf16 => "bf16",
            Scheme::Int8Dynamic => "int8_dynamic",
            Scheme::Int8WeightOnly => "int8_weight_only",
            Scheme::Int4 { .. } => "int4",
        }
    }

    /// Whether libtorch has a kernel on `device` that makes this scheme
    /// faster than fp32 there (the report says so when it does not).
    pub fn fast_kernel(&self, device: Device) -> bool {
        match (self, device) {
            (Scheme::Int8Dynamic, Device::Cpu) => fbgemm_available(),
            (Scheme::Int8Dynamic, _) => false,
            (Scheme::Fp16 | Scheme::Bf16, Device::Cuda(_)) => true,
            // Reduced-precision dense kernels are fast on a CPU only with
            // the instructions for them; without, libtorch converts.
            (Scheme::Bf16, Device::Cpu) => cpu_flags(&["avx512_bf16", "amx_bf16"]),
            (Scheme::Fp16, Device::Cpu) => cpu_flags(&["avx512_fp16", "amx_fp16"]),
            (Scheme::Fp16 | Scheme::Bf16, _) => false,
            (Scheme::Int8WeightOnly | Scheme::Int4 { .. }, Device::Cpu) => true,
            (Scheme::Int4 { .. }, Device::Cuda(_)) => true,
            _ => false,
        }
    }

    /// The schemes for a spec's formats on its hardware target (`int8`
    /// means the target's INT8: dynamic on a CPU, weight-only on a GPU).
    pub fn from_spec(q: &distill_spec::Quantization) -> Vec<Scheme> {
        use distill_spec::{Hardware, QuantFormat};
        let g = q.group_size as i64;
        q.formats_for_target()
            .into_iter()
            .map(|f| match f {
                QuantFormat::Fp16 => Scheme::Fp16,
                QuantFormat::Bf16 => Scheme::Bf16,
                QuantFormat::Int8 if q.hardware == Hardware::Cpu => Scheme::Int8Dynamic,
                QuantFormat::Int8 => Scheme::Int8WeightOnly,
                QuantFormat::Int8Dynamic => Scheme::Int8Dynamic,
                QuantFormat::Int8WeightOnly => Scheme::Int8WeightOnly,
                QuantFormat::Int4 => Scheme::Int4 { group_size: g },
            })
            .collect()
    }
}

/// Symmetric per-output-channel INT8: `q = round(w / s)` in [-127, 127]
/// with `s = max|w_row| / 127`. Returns `(q int8 [out, in], s fp32 [out])`.
pub fn quantize_int8(w: &Tensor) -> (Tensor, Tensor) {
    let w = w.to_kind(Kind::Float);
    let s = (w.abs().amax([1i64].as_slice(), false) / 127.0).clamp_min(1e-12);
    let q = (&w / s.unsqueeze(1))
        .round()
        .clamp(-127, 127)
        .to_kind(Kind::Int8);
    (q, s)
}

/// Asymmetric grouped INT4 over groups of `group` input columns:
/// `code = round((w − min) / scale)` in [0, 15], `scale = (max − min) / 15`,
/// stored as `zero = min + 8 · scale` so that `w ≈ (code − 8) · scale +
/// zero` (libtorch's int4pack convention). Returns `(codes int32 [out,
/// in], scales_zeros fp32 [in/group, out, 2])`.
pub fn quantize_int4(w: &Tensor, group: i64) -> Result<(Tensor, Tensor)> {
    let (n, k) = w.size2()?;
    if group <= 0 || k % group != 0 {
        return Err(Error::Invalid(format!(
            "quantization.group_size: {group} does not divide the layer's {k} input features"
        )));
    }
    let wg = w.to_kind(Kind::Float).view([n, k / group, group]);
    let mn = wg.amin([-1i64].as_slice(), false);
    let mx = wg.amax([-1i64].as_slice(), false);
    let scale = ((&mx - &mn) / 15.0).clamp_min(1e-12);
    let zero = &mn + &scale * 8.0;
    let codes = ((&wg - mn.unsqueeze(-1)) / scale.unsqueeze(-1))
        .round()
        .clamp(0, 15)
        .to_kind(Kind::Int)
        .view([n, k]);
    let sz = Tensor::stack(&[scale, zero], -1)
        .transpose(0, 1)
        .contiguous();
    Ok((codes, sz))
}

/// Two 4-bit codes per byte, the even column in the low nibble.
fn pack_nibbles(codes: &Tensor) -> Tensor {
    let lo = codes.slice(1, 0, None, 2);
    let hi = codes.slice(1, 1, None, 2);
    (lo + hi * 16).to_kind(Kind::Uint8)
}

fn unpack_nibbles(packed: &Tensor) -> Tensor {
    let p = packed.to_kind(Kind::Int);
    let lo = p.remainder(16);
    let hi = p.floor_divide_scalar(16);
    let (n, half) = p.size2().expect("[out, in/2]");
    Tensor::stack(&[lo, hi], -1).view([n, half * 2])
}

/// An int8 weight `[out, in]` as FBGEMM's dynamic-INT8 kernel takes it.
pub struct Int8Part {
    q: Tensor,
    packed: Tensor,
    col_offsets: Tensor,
    /// What the kernel adds to this part's product.
    bias: Tensor,
}

impl Int8Part {
    fn new(q: Tensor, bias: Tensor) -> Result<Self> {
        let q = q.contiguous();
        let mut err = [0u8; ERRLEN];
        // SAFETY: `q` outlives the call; the shim copies what it keeps.
        let raw = unsafe {
            distill_fbgemm_pack(q.as_ptr(), err.as_mut_ptr() as *mut c_char, ERRLEN as c_int)
        };
        let packed = shim_result(raw, &err, "fbgemm_pack_quantized_matrix")?;
        let col_offsets = q.sum_dim_intlist(1, false, Kind::Int).to_kind(Kind::Int);
        Ok(Self {
            q,
            packed,
            col_offsets,
            bias,
        })
    }

    /// `x·qᵀ + bias` for fp32 `x` `[rows, in]` (contiguous), the activations
    /// quantized to uint8 per call by the kernel.
    fn forward(&self, x: &Tensor) -> Tensor {
        let mut err = [0u8; ERRLEN];
        // SAFETY: every tensor outlives the call; the shim returns a new
        // tensor or null with the message in `err`.
        let raw = unsafe {
            distill_fbgemm_linear(
                x.as_ptr(),
                self.q.as_ptr(),
                self.packed.as_ptr(),
                self.col_offsets.as_ptr(),
                1.0,
                0,
                self.bias.as_ptr(),
                err.as_mut_ptr() as *mut c_char,
                ERRLEN as c_int,
            )
        };
        shim_result(raw, &err, "fbgemm_linear_int8_weight_fp32_activation")
            .unwrap_or_else(|e| panic!("{e}"))
    }
}

/// A quantized linear layer.
pub enum QLinear {
    Int8Dynamic {
        q: Tensor,
        scales: Tensor,
        bias: Tensor,
        /// What the kernel multiplies, its products summed: `q` itself, or
        /// where FBGEMM's int16 sums saturate (`fbgemm_int16_saturates`)
        /// two halves whose sum is `q`, each small enough not to. The first
        /// part adds `bias / scales`, the others nothing.
        parts: Vec<Int8Part>,
    },
    Int8WeightOnly {
        q: Tensor,
        scales: Tensor,
        bias: Tensor,
        scales_bf16: Tensor,
    },
    Int4 {
        nibbles: Tensor,
        scales_zeros: Tensor,
        bias: Tensor,
        group: i64,
        packed: Tensor,
        sz_bf16: Tensor,
    },
}

fn flatten(x: &Tensor) -> (Tensor, Vec<i64>) {
    let size = x.size();
    let k = *size.last().expect("input has a feature dimension");
    (x.reshape([-1, k]), size)
}

fn unflatten(y: Tensor, mut size: Vec<i64>, n: i64) -> Tensor {
    *size.last_mut().unwrap() = n;
    y.reshape(size)
}

impl QLinear {
    /// Quantizes `weight` (`[out, in]`) and `bias` (`[out]`) to `scheme`
    /// on `device`. Float schemes are not per layer (see
    /// `TaskModel::quantize`).
    pub fn new(weight: &Tensor, bias: &Tensor, scheme: Scheme, device: Device) -> Result<Self> {
        let _g = tch::no_grad_guard();
        let w = weight.to_device(Device::Cpu).to_kind(Kind::Float);
        let b = bias.to_device(Device::Cpu).to_kind(Kind::Float);
        match scheme {
            Scheme::Int8Dynamic | Scheme::Int8WeightOnly => {
                let (q, s) = quantize_int8(&w);
                Self::int8(q, s, b, scheme, device)
            }
            Scheme::Int4 { group_size } => {
                let (codes, sz) = quantize_int4(&w, group_size)?;
                Self::int4(pack_nibbles(&codes), sz, b, group_size, device)
            }
            Scheme::Fp16 | Scheme::Bf16 => Err(Error::Invalid(format!(
                "{} is a whole-model cast, not a per-layer quantization",
                scheme.name()
            ))),
        }
    }

    fn int8(
        q: Tensor,
        scales: Tensor,
        bias: Tensor,
        scheme: Scheme,
        device: Device,
    ) -> Result<Self> {
        let (q, scales, bias) = (
            q.to_device(device),
            scales.to_device(device),
            bias.to_device(device),
        );
        match scheme {
            Scheme::Int8Dynamic => {
                if device != Device::Cpu || !fbgemm_available() {
                    return Err(Error::Invalid(format!(
                        "int8_dynamic runs on FBGEMM, which this libtorch has only on an x86 CPU (device {device:?})"
                    )));
                }
                let q = q.contiguous();
                // The kernel adds this before the per-channel scale is
                // applied in place: (x·qᵀ + b/s)·s = x·(q·s)ᵀ + b.
                let bias_over_scales = &bias / &scales;
                let parts = if fbgemm_int16_saturates() {
                    // q = h + (q − h) with h = q/2 rounded toward zero:
                    // |h| ≤ 63 and |q − h| ≤ 64, so 2·255·64 = 32 640 fits
                    // in an int16; the two integer products add up to x·qᵀ
                    // exactly, at twice the kernel's cost.
                    let half = q.to_kind(Kind::Int16).divide_scalar_mode(2, "trunc");
                    let rest = q.to_kind(Kind::Int16) - &half;
                    let zero = bias_over_scales.zeros_like();
                    vec![
                        Int8Part::new(half.to_kind(Kind::Int8), bias_over_scales)?,
                        Int8Part::new(rest.to_kind(Kind::Int8), zero)?,
                    ]
                } else {
                    vec![Int8Part::new(q.shallow_clone(), bias_over_scales)?]
                };
                Ok(QLinear::Int8Dynamic {
                    q,
                    scales,
                    bias,
                    parts,
                })
            }
            _ => {
                let scales_bf16 = scales.to_kind(Kind::BFloat16);
                Ok(QLinear::Int8WeightOnly {
                    q: q.contiguous(),
                    scales,
                    bias,
                    scales_bf16,
                })
            }
        }
    }

    fn int4(
        nibbles: Tensor,
        scales_zeros: Tensor,
        bias: Tensor,
        group: i64,
        device: Device,
    ) -> Result<Self> {
        let codes = unpack_nibbles(&nibbles);
        let (packed, sz) = match device {
            Device::Cpu => (
                codes
                    .contiguous()
                    .f_internal_convert_weight_to_int4pack_for_cpu(1)?,
                scales_zeros.to_kind(Kind::BFloat16),
            ),
            // libtorch's CUDA int4 kernel wants the codes two per byte with
            // the even column in the high nibble (unverified here: no GPU).
            _ => {
                let lo = codes.slice(1, 1, None, 2);
                let hi = codes.slice(1, 0, None, 2);
                let bytes = (hi * 16 + lo).to_kind(Kind::Uint8).to_device(device);
                (
                    bytes.f_internal_convert_weight_to_int4pack(8)?,
                    scales_zeros.to_kind(Kind::BFloat16).to_device(device),
                )
            }
        };
        Ok(QLinear::Int4 {
            nibbles,
            scales_zeros,
            bias: bias.to_device(device),
            group,
            packed,
            sz_bf16: sz,
        })
    }

    /// `y = x Wᵀ + b` with the quantized weight, for `x` of any leading shape.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (x2, size) = flatten(x);
        let kind = x.kind();
        let y = match self {
            QLinear::Int8Dynamic { scales, parts, .. } => {
                let x2 = x2.to_kind(Kind::Float).contiguous();
                let mut y = parts[0].forward(&x2);
                for p in &parts[1..] {
                    let _ = y.g_add_(&p.forward(&x2));
                }
                let _ = y.g_mul_(scales);
                y
            }
            QLinear::Int8WeightOnly {
                q,
                bias,
                scales_bf16,
                ..
            } => {
                let y = match x2.device() {
                    Device::Cpu => x2
                        .to_kind(Kind::BFloat16)
                        .internal_weight_int8pack_mm(q, scales_bf16),
                    _ => x2
                        .to_kind(Kind::BFloat16)
                        .matmul(&(q.to_kind(Kind::BFloat16) * scales_bf16.unsqueeze(1)).tr()),
                };
                y.to_kind(Kind::Float) + bias
            }
            QLinear::Int4 {
                bias,
                group,
                packed,
                sz_bf16,
                ..
            } => {
                let xb = x2.to_kind(Kind::BFloat16);
                let y = match x2.device() {
                    Device::Cpu => xb.internal_weight_int4pack_mm_for_cpu(packed, *group, sz_bf16),
                    _ => xb.internal_weight_int4pack_mm(packed, *group, sz_bf16),
                };
                y.to_kind(Kind::Float) + bias
            }
        };
        let n = self.out_features();
        unflatten(y.to_kind(kind), size, n)
    }

    /// The number of weights the layer stands for (`out × in`).
    pub fn weight_numel(&self) -> i64 {
        match self {
            QLinear::Int8Dynamic { q, .. } | QLinear::Int8WeightOnly { q, .. } => q.numel() as i64,
            // Two 4-bit codes per byte.
            QLinear::Int4 { nibbles, .. } => 2 * nibbles.numel() as i64,
        }
    }

    pub fn out_features(&self) -> i64 {
        match self {
            QLinear::Int8Dynamic { q, .. } | QLinear::Int8WeightOnly { q, .. } => q.size()[0],
            QLinear::Int4 { nibbles, .. } => nibbles.size()[0],
        }
    }

    /// The fp32 weight the quantized one stands for (`[out, in]`).
    pub fn dequantize(&self) -> Tensor {
        match self {
            QLinear::Int8Dynamic { q, scales, .. } | QLinear::Int8WeightOnly { q, scales, .. } => {
                q.to_kind(Kind::Float) * scales.unsqueeze(1)
            }
            QLinear::Int4 {
                nibbles,
                scales_zeros,
                group,
                ..
            } => {
                let codes = unpack_nibbles(&nibbles.to_device(Device::Cpu)).to_kind(Kind::Float);
                let (n, k) = codes.size2().unwrap();
                let sz = scales_zeros.to_device(Device::Cpu).transpose(0, 1); // [out, groups, 2]
                let scale = sz.select(-1, 0).unsqueeze(-1);
                let zero = sz.select(-1, 1).unsqueeze(-1);
                ((codes.view([n, k / group, *group]) - 8.0) * scale + zero).view([n, k])
            }
        }
    }

    pub fn bias(&self) -> &Tensor {
        match self {
            QLinear::Int8Dynamic { bias, .. }
            | QLinear::Int8WeightOnly { bias, .. }
            | QLinear::Int4 { bias, .. } => bias,
        }
    }

    /// What `save` writes for this layer, named under `name`.
    pub fn stored(&self, name: &str) -> Vec<(String, Tensor)> {
        let mut v = match self {
            QLinear::Int8Dynamic { q, scales, .. } | QLinear::Int8WeightOnly { q, scales, .. } => {
                vec![
                    (format!("{name}.qweight"), q.shallow_clone()),
                    (format!("{name}.scales"), scales.shallow_clone()),
                ]
            }
            QLinear::Int4 {
                nibbles,
                scales_zeros,
                ..
            } => vec![
                (format!("{name}.qweight"), nibbles.shallow_clone()),
                (format!("{name}.scales_zeros"), scales_zeros.shallow_clone()),
            ],
        };
        v.push((format!("{name}.bias"), self.bias().shallow_clone()));
        v
    }

    /// Rebuilds a layer from what `stored` wrote (`tensors` by name).
    pub fn from_stored(
        tensors: &BTreeMap<String, Tensor>,
        name: &str,
        scheme: Scheme,
        device: Device,
    ) -> Result<Self> {
        let get = |suffix: &str| {
            tensors
                .get(&format!("{name}.{suffix}"))
                .map(|t| t.shallow_clone())
                .ok_or_else(|| {
                    Error::Invalid(format!("quantized layer {name}: no {name}.{suffix} tensor"))
                })
        };
        let (qweight, bias) = (get("qweight")?, get("bias")?);
        match scheme {
            Scheme::Int8Dynamic | Scheme::Int8WeightOnly => {
                let scales = get("scales")?;
                if qweight.kind() != Kind::Int8 || scales.size() != [qweight.size()[0]] {
                    return Err(Error::Invalid(format!(
                        "quantized layer {name}: expected int8 qweight [out, in] and scales [out], got {:?} {:?} and {:?}",
                        qweight.kind(),
                        qweight.size(),
                        scales.size()
                    )));
                }
                Self::int8(
                    qweight,
                    scales.to_kind(Kind::Float),
                    bias.to_kind(Kind::Float),
                    scheme,
                    device,
                )
            }
            Scheme::Int4 { group_size } => {
                let sz = get("scales_zeros")?;
                let (n, half) = qweight.size2()?;
                if qweight.kind() != Kind::Uint8 || sz.size() != [half * 2 / group_size, n, 2] {
                    return Err(Error::Invalid(format!(
                        "quantized layer {name}: expected uint8 qweight [out, in/2] and scales_zeros [in/{group_size}, out, 2], got {:?} {:?} and {:?}",
                        qweight.kind(),
                        qweight.size(),
                        sz.size()
                    )));
                }
                Self::int4(
                    qweight,
                    sz.to_kind(Kind::Float),
                    bias.to_kind(Kind::Float),
                    group_size,
                    device,
                )
            }
            Scheme::Fp16 | Scheme::Bf16 => Err(Error::Invalid(format!(
                "quantized layer {name}: {} has no per-layer tensors",
                scheme.name()
            ))),
        }
    }
}

/// The word-embedding table as int8 rows with one fp32 scale per row
/// (symmetric, as `quantize_int8`): a lookup gathers the rows and scales
/// them. Used by every integer scheme, since the table is most of a small
/// student's bytes (MiniLM's 30522 × 384 rows are 52 % of its parameters).
pub struct QEmbedding {
    pub q: Tensor,
    pub scales: Tensor,
}

impl QEmbedding {
    pub fn new(table: &Tensor) -> Self {
        let _g = tch::no_grad_guard();
        let (q, scales) = quantize_int8(table);
        QEmbedding { q, scales }
    }

    /// `[.., hidden]` fp32 rows for `ids` of any shape.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        let flat = ids.reshape([-1]);
        let rows = self.q.index_select(0, &flat).to_kind(Kind::Float)
            * self.scales.index_select(0, &flat).unsqueeze(1);
        let mut size = ids.size();
        size.push(self.q.size()[1]);
        rows.reshape(size)
    }

    pub fn stored(&self, name: &str) -> Vec<(String, Tensor)> {
        vec![
            (format!("{name}.qweight"), self.q.shallow_clone()),
            (format!("{name}.scales"), self.scales.shallow_clone()),
        ]
    }

    pub fn from_stored(
        tensors: &BTreeMap<String, Tensor>,
        name: &str,
        device: Device,
    ) -> Result<Self> {
        let q = tensors.get(&format!("{name}.qweight"));
        let s = tensors.get(&format!("{name}.scales"));
        match (q, s) {
            (Some(q), Some(s)) if q.kind() == Kind::Int8 && s.size() == [q.size()[0]] => Ok(QEmbedding {
                q: q.to_device(device),
                scales: s.to_kind(Kind::Float).to_device(device),
            }),
            _ => Err(Error::Invalid(format!(
                "quantized embeddings {name}: expected int8 {name}.qweight [rows, hidden] and {name}.scales [rows]"
            ))),
        }
    }
}

/// `quantization.json` in a quantized model directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QuantManifest {
    /// Layout version of this file and of the tensors it describes.
    pub version: u32,
    pub scheme: Scheme,
    /// The quantized layers (Hugging Face names, without `.weight`).
    pub layers: Vec<String>,
    /// Whether the word embeddings are int8 rows (`QEmbedding`).
    #[serde(default)]
    pub int8_word_embeddings: bool,
}

pub const MANIFEST: &str = "quantization.json";
pub const MANIFEST_VERSION: u32 = 1;
