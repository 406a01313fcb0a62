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

/// Queries per register block.
const QB: usize = 4;
/// Lanes per register (16 f32 = one AVX-512 register).
const L: usize = 16;

/// One (sequence, head), in register blocks of `QB` queries x `L` lanes: `K^T` is gathered as
/// `[d][len rounded up to L]` (zero-padded, pre-scaled), V as `[len][d rounded up to L]`, so
/// scores and context are broadcast-FMAs over whole registers with no horizontal sums.
#[inline(always)]
unsafe fn head_attention_generic(rows: &[f32], len: usize, h: usize, d: usize, head: usize, out: *mut f32) {
    let h3 = 3 * h;
    let scale = 1.0 / (d as f32).sqrt();
    let (qo, ko, vo) = (head * d, h + head * d, 2 * h + head * d);
    let (lp, dp) = (len.div_ceil(L) * L, d.div_ceil(L) * L);
    let mut buf = vec![0f32; d * lp + len * dp + QB * lp];
    let (kt, rest) = buf.split_at_mut(d * lp);
    let (v, sc) = rest.split_at_mut(len * dp);
    for j in 0..len {
        let row = &rows[j * h3..(j + 1) * h3];
        for c in 0..d {
            kt[c * lp + j] = row[ko + c] * scale;
        }
        v[j * dp..j * dp + d].copy_from_slice(&row[vo..vo + d]);
    }
    for i0 in (0..len).step_by(QB) {
        // Rows past the end repeat the last query; their results are dropped.
        let q: [&[f32]; QB] = std::array::from_fn(|qi| {
            let i = (i0 + qi).min(len - 1);
            &rows[i * h3 + qo..i * h3 + qo + d]
        });
        for jb in (0..lp).step_by(L) {
            let mut acc = [[0f32; L]; QB];
            for c in 0..d {
                let kv: &[f32; L] = kt[c * lp + jb..c * lp + jb + L].try_into().unwrap();
                for qi in 0..QB {
                    let qc = q[qi][c];
                    for l in 0..L {
                        acc[qi][l] += qc * kv[l];
                    }
                }
            }
            for qi in 0..QB {
                sc[qi * lp + jb..qi * lp + jb + L].copy_from_slice(&acc[qi]);
            }
        }
        // Softmax over whole registers: padded keys score -inf, then weigh exactly 0.
        let mut inv = [0f32; QB];
        for qi in 0..QB {
            let s = &mut sc[qi * lp..(qi + 1) * lp];
            s[len..].fill(f32::NEG_INFINITY);
            let max = max16(s);
            for x in s.iter_mut() {
                *x = exp(*x - max);
            }
            s[len..].fill(0.0);
            inv[qi] = 1.0 / sum16(s);
        }
        for db in (0..dp).step_by(L) {
            let mut acc = [[0f32; L]; QB];
            for j in 0..len {
                let vv: &[f32; L] = v[j * dp + db..j * dp + db + L].try_into().unwrap();
                for qi in 0..QB {
                    let p = sc[qi * lp + j];
                    for l in 0..L {
                        acc[qi][l] += p * vv[l];
                    }
                }
            }
            let w = L.min(d - db);
            for qi in 0..QB.min(len - i0) {
                let dst = std::slice::from_raw_parts_mut(out.add((i0 + qi) * h + head * d + db), w);
                for (dst, &a) in dst.iter_mut().zip(&acc[qi][..w]) {
                    *dst = a * inv[qi];
                }
            }
        }
    }
}

/// Sum in 16 interleaved lanes, so it vectorises.
#[inline(always)]
fn sum16(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let mut c = x.chunks_exact(16);
    for x in &mut c {
        for i in 0..16 {
            acc[i] += x[i];
        }
    }
    c.remainder().iter().sum::<f32>() + acc.iter().sum::<f32>()
}

#[inline(always)]
fn max16(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let mut c = x.chunks_exact(16);
    for x in &mut c {
        for i in 0..16 {
            acc[i] = acc[i].max(x[i]);
        }
    }
    c.remainder().iter().chain(acc.iter()).fold(f32::NEG_INFINITY, |m, &x| m.max(x))
}
