//! LayerNorm over the last dimension, `(x - mean) / sqrt(var + eps) * gamma + beta`, as a candle
//! custom op (CPU, f32): two passes per row (mean, then centred variance), rows over rayon.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::linear::contiguous_f32;

struct LayerNormOp {
    eps: f32,
}

/// `x: [.., h]`, `gamma`, `beta`: `[h]`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f32) -> Result<Tensor> {
    x.apply_op3_no_bwd(gamma, beta, &LayerNormOp { eps })
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, "layer-norm")?;
        let g = contiguous_f32(s2, l2, "layer-norm")?;
        let b = contiguous_f32(s3, l3, "layer-norm")?;
        let h = *l1.shape().dims().last().unwrap_or(&0);
        if h == 0 || g.len() != h || b.len() != h {
            candle_core::bail!("layer-norm: x {:?}, gamma {:?}, beta {:?}", l1.shape(), l2.shape(), l3.shape());
        }
        let mut out = vec![0f32; x.len()];
        let rows_per_task = (16 * 1024 / h).max(1);
        let run = |(xs, ys): (&[f32], &mut [f32])| norm_rows(xs, ys, g, b, h, self.eps);
        if x.len() <= rows_per_task * h {
            run((x, &mut out));
        } else {
            x.par_chunks(rows_per_task * h).zip(out.par_chunks_mut(rows_per_task * h)).for_each(run);
        }
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

fn norm_rows(xs: &[f32], ys: &mut [f32], g: &[f32], b: &[f32], h: usize, eps: f32) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && !crate::portable_only() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { norm_rows_avx512(xs, ys, g, b, h, eps) };
    }
    norm_rows_generic(xs, ys, g, b, h, eps)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn norm_rows_avx512(xs: &[f32], ys: &mut [f32], g: &[f32], b: &[f32], h: usize, eps: f32) {
    norm_rows_generic(xs, ys, g, b, h, eps)
}

#[inline(always)]
fn norm_rows_generic(xs: &[f32], ys: &mut [f32], g: &[f32], b: &[f32], h: usize, eps: f32) {
    for (x, y) in xs.chunks_exact(h).zip(ys.chunks_exact_mut(h)) {
        let mean = sum16(x, |v| v) / h as f32;
        let var = sum16(x, |v| (v - mean) * (v - mean)) / h as f32;
        let inv = 1.0 / (var + eps).sqrt();
        for (((y, &x), &g), &b) in y.iter_mut().zip(x).zip(g).zip(b) {
            *y = (x - mean) * inv * g + b;
        }
    }
}

/// Sum of `f(x)` in 16 interleaved lanes (so it vectorises without reassociation).
#[inline(always)]
fn sum16(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = x.chunks_exact(16);
    for c in &mut chunks {
        for i in 0..16 {
            acc[i] += f(c[i]);
        }
    }
    let mut s: f32 = chunks.remainder().iter().map(|&v| f(v)).sum();
    s += acc.iter().sum::<f32>();
    s
}
