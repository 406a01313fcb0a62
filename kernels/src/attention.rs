//! Variable-length multi-head self-attention over packed sequences (no padding computed).
//! Input: q|k|v side by side, `[T, 3H]`; output: the attention context `[T, H]`.
//! Sequence `s` owns rows `[start_s, start_s + lens[s])`; attention never crosses sequences.
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

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
        let src = match storage {
            CpuStorage::F32(v) => v,
            _ => candle_core::bail!("varlen-self-attention: only f32 on cpu"),
        };
        let src = match layout.contiguous_offsets() {
            Some((a, b)) => &src[a..b],
            None => candle_core::bail!("varlen-self-attention: qkv must be contiguous"),
        };
        let h = h3 / 3;
        let d = h / self.heads;
        let scale = 1.0 / (d as f32).sqrt();
        let mut out = vec![0f32; t * h];
        // Split the output by sequence so each task owns its rows.
        let mut chunks = Vec::with_capacity(self.lens.len());
        let mut rest = out.as_mut_slice();
        let mut start = 0;
        for &len in &self.lens {
            let (mine, tail) = rest.split_at_mut(len * h);
            chunks.push((start, len, mine));
            rest = tail;
            start += len;
        }
        chunks.into_par_iter().for_each(|(start, len, out)| {
            let rows = &src[start * h3..(start + len) * h3];
            let mut scores = vec![0f32; len];
            for head in 0..self.heads {
                let (qo, ko, vo) = (head * d, h + head * d, 2 * h + head * d);
                for i in 0..len {
                    let q = &rows[i * h3 + qo..i * h3 + qo + d];
                    let mut max = f32::NEG_INFINITY;
                    for (j, s) in scores.iter_mut().enumerate() {
                        let k = &rows[j * h3 + ko..j * h3 + ko + d];
                        *s = dot(q, k) * scale;
                        max = max.max(*s);
                    }
                    let mut sum = 0f32;
                    for s in scores.iter_mut() {
                        *s = (*s - max).exp();
                        sum += *s;
                    }
                    let inv = 1.0 / sum;
                    let o = &mut out[i * h + head * d..i * h + head * d + d];
                    for (j, &p) in scores.iter().enumerate() {
                        let v = &rows[j * h3 + vo..j * h3 + vo + d];
                        let p = p * inv;
                        for (o, &v) in o.iter_mut().zip(v) {
                            *o += p * v;
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((t, h))))
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
