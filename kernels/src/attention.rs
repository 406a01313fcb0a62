//! Variable-length multi-head self-attention over packed sequences (no padding computed).
//! Input: q|k|v side by side, `[T, 3H]`; output: the attention context `[T, H]`.
//! Sequence `s` owns rows `[start_s, start_s + lens[s])`; attention never crosses sequences.
//! Work is split per (sequence, head); each task copies its K and V slices into contiguous
//! buffers so the dot products and the weighted sums run over unit-stride vectors.
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::activation::exp;

struct VarlenAttention {
    lens: Vec<usize>,
    heads: usize,
}

pub fn varlen_self_attention(qkv: &Tensor, lens: &[usize], heads: usize) -> Result<Tensor> {
    let (t, h3) = qkv.dims2()?;
    if h3 % (3 * heads) != 0 {
        candle_core::bail!("qkv width {h3} is not 3 * heads ({heads}) * head_dim");
    }
    if lens.iter().sum::<usize>() != t {
        candle_core::bail!("sequence lengths add up to {}, qkv has {t} rows", lens.iter().sum::<usize>());
    }
    qkv.apply_op1_no_bwd(&VarlenAttention { lens: lens.to_vec(), heads })
}

impl CustomOp1 for VarlenAttention {
    fn name(&self) -> &'static str {
        "varlen-self-attention"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (t, h3) = layout.shape().dims2()?;
        let src = crate::linear::contiguous_f32(storage, layout, "varlen-self-attention")?;
        let h = h3 / 3;
        let d = h / self.heads;
        let mut out = vec![0f32; t * h];
        let mut starts = Vec::with_capacity(self.lens.len());
        let mut start = 0;
        for &len in &self.lens {
            starts.push(start);
            start += len;
        }
        let out_ptr = out.as_mut_ptr() as usize;
        let heads = self.heads;
        let task = |i: usize| {
            let (s, head) = (i / heads, i % heads);
            let (start, len) = (starts[s], self.lens[s]);
            let rows = &src[start * h3..(start + len) * h3];
            // SAFETY: each task writes only columns [head * d, (head + 1) * d) of its own rows.
            unsafe { head_attention(rows, len, h, d, head, (out_ptr as *mut f32).add(start * h)) }
        };
        let n = self.lens.len() * heads;
        // Tasks are tiny for short sequences: hand rayon a few at a time.
        let min_len = (4096 / (t / self.lens.len().max(1)).max(1).pow(2)).clamp(1, heads);
        (0..n).into_par_iter().with_min_len(min_len).for_each(task);
        Ok((CpuStorage::F32(out), Shape::from((t, h))))
    }
}

unsafe fn head_attention(rows: &[f32], len: usize, h: usize, d: usize, head: usize, out: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        return head_attention_avx512(rows, len, h, d, head, out);
    }
    head_attention_generic(rows, len, h, d, head, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn head_attention_avx512(rows: &[f32], len: usize, h: usize, d: usize, head: usize, out: *mut f32) {
    head_attention_generic(rows, len, h, d, head, out)
}

#[inline(always)]
unsafe fn head_attention_generic(rows: &[f32], len: usize, h: usize, d: usize, head: usize, out: *mut f32) {
    let h3 = 3 * h;
    let scale = 1.0 / (d as f32).sqrt();
    let (qo, ko, vo) = (head * d, h + head * d, 2 * h + head * d);
    let mut k = vec![0f32; len * d];
    let mut v = vec![0f32; len * d];
    for j in 0..len {
        k[j * d..(j + 1) * d].copy_from_slice(&rows[j * h3 + ko..j * h3 + ko + d]);
        v[j * d..(j + 1) * d].copy_from_slice(&rows[j * h3 + vo..j * h3 + vo + d]);
    }
    let mut scores = vec![0f32; len];
    let mut o = vec![0f32; d];
    for i in 0..len {
        let q = &rows[i * h3 + qo..i * h3 + qo + d];
        let mut max = f32::NEG_INFINITY;
        for (s, kj) in scores.iter_mut().zip(k.chunks_exact(d)) {
            *s = dot(q, kj) * scale;
            max = max.max(*s);
        }
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = exp(*s - max);
            sum += *s;
        }
        let inv = 1.0 / sum;
        o.fill(0.0);
        for (&p, vj) in scores.iter().zip(v.chunks_exact(d)) {
            for (o, &v) in o.iter_mut().zip(vj) {
                *o += p * v;
            }
        }
        let dst = std::slice::from_raw_parts_mut(out.add(i * h + head * d), d);
        for (dst, &o) in dst.iter_mut().zip(&o) {
            *dst = o * inv;
        }
    }
}

/// Dot product in 16 interleaved lanes, so it vectorises.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut ca = a.chunks_exact(16);
    let mut cb = b.chunks_exact(16);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut s: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    s += acc.iter().sum::<f32>();
    s
}
