//! Variable-length multi-head self-attention over packed sequences (no padding computed).
//! Input: q|k|v side by side, `[T, 3H]`; output: the attention context `[T, H]`.
//! Sequence `s` owns rows `[start_s, start_s + lens[s])`; attention never crosses sequences.
//! Work is split per (sequence, head); each task copies its K and V slices into contiguous
//! buffers so the dot products and the weighted sums run over unit-stride vectors.
//! An optional relative-position bias (MPNet's, T5's) is added to the scaled scores.
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::activation::exp;

struct VarlenAttention {
    lens: Vec<usize>,
    heads: usize,
    bias: Option<RelativeBias>,
}

/// A bias added to the scaled score of query `i` against key `j` of the same sequence that
/// depends only on the head and on `j - i`: `table[head * (2 * span - 1) + (span - 1 + j - i)]`,
/// with `span` at least the longest sequence.
#[derive(Debug, Clone)]
pub struct RelativeBias {
    pub table: Vec<f32>,
    pub span: usize,
}

pub fn varlen_self_attention(qkv: &Tensor, lens: &[usize], heads: usize) -> Result<Tensor> {
    varlen_self_attention_biased(qkv, lens, heads, None)
}

/// [`varlen_self_attention`] with a relative-position bias on the scores.
pub fn varlen_self_attention_biased(qkv: &Tensor, lens: &[usize], heads: usize, bias: Option<RelativeBias>) -> Result<Tensor> {
    let (t, h3) = qkv.dims2()?;
    if h3 % (3 * heads) != 0 {
        candle_core::bail!("qkv width {h3} is not 3 * heads ({heads}) * head_dim");
    }
    if lens.iter().sum::<usize>() != t {
        candle_core::bail!("sequence lengths add up to {}, qkv has {t} rows", lens.iter().sum::<usize>());
    }
    if let Some(b) = &bias {
        let longest = lens.iter().copied().max().unwrap_or(0);
        if b.span < longest || b.table.len() != heads * (2 * b.span).saturating_sub(1) {
            candle_core::bail!(
                "relative bias of {} values for span {} and {heads} heads; sequences up to {longest}",
                b.table.len(),
                b.span
            );
        }
    }
    qkv.apply_op1_no_bwd(&VarlenAttention { lens: lens.to_vec(), heads, bias })
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
        let bias = self.bias.as_ref().map(|b| (b.table.as_slice(), b.span));
        // Heads per task: all of a sequence's when there are enough sequences to share out,
        // else fewer, so that there are at least 4 tasks per thread.
        let want = 4 * rayon::current_num_threads();
        let group = (1..=heads).rev().find(|&g| heads % g == 0 && self.lens.len() * (heads / g) >= want).unwrap_or(1);
        let groups = heads / group;
        let task = |i: usize| {
            let (s, g) = (i / groups, i % groups);
            let (start, len) = (starts[s], self.lens[s]);
            let rows = &src[start * h3..(start + len) * h3];
            let out = (out_ptr as *mut f32).wrapping_add(start * h);
            // SAFETY: each task writes only its heads' columns of its own sequence's rows.
            unsafe { heads_attention(rows, len, h, d, g * group, group, bias, out) }
        };
        (0..self.lens.len() * groups).into_par_iter().for_each(task);
        Ok((CpuStorage::F32(out), Shape::from((t, h))))
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A relative bias table and its span (see [`RelativeBias`]).
type Bias<'a> = Option<(&'a [f32], usize)>;

/// Heads `[head0, head0 + group)` of one sequence.
#[allow(clippy::too_many_arguments)]
unsafe fn heads_attention(rows: &[f32], len: usize, h: usize, d: usize, head0: usize, group: usize, bias: Bias, out: *mut f32) {
    SCRATCH.with_borrow_mut(|buf| {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx512f") && !crate::portable_only() {
            return heads_attention_avx512(rows, len, h, d, head0, group, bias, out, buf);
        }
        heads_attention_generic::<false>(rows, len, h, d, head0, group, bias, out, buf)
    })
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn heads_attention_avx512(
    rows: &[f32], len: usize, h: usize, d: usize, head0: usize, group: usize, bias: Bias, out: *mut f32, buf: &mut Vec<f32>,
) {
    heads_attention_generic::<true>(rows, len, h, d, head0, group, bias, out, buf)
}

/// Scores of `QB` queries against `16 * NB` keys, written to `sc` (queries `lp` apart):
/// `kt` points at the first key's lane in row `c = 0` of `K^T` (rows `lp` apart).
/// Only from AVX-512 code.
#[inline(always)]
unsafe fn scores_avx512<const NB: usize>(kt: *const f32, lp: usize, q: &[&[f32]; QB], d: usize, sc: *mut f32) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); NB]; QB];
        for c in 0..d {
            let kv: [__m512; NB] = std::array::from_fn(|b| _mm512_loadu_ps(kt.add(c * lp + 16 * b)));
            for qi in 0..QB {
                let qc = _mm512_set1_ps(*q[qi].get_unchecked(c));
                for b in 0..NB {
                    acc[qi][b] = _mm512_fmadd_ps(qc, kv[b], acc[qi][b]);
                }
            }
        }
        for qi in 0..QB {
            for b in 0..NB {
                _mm512_storeu_ps(sc.add(qi * lp + 16 * b), acc[qi][b]);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX-512 path on a non-x86 CPU")
}

/// Context lanes `[0, 16 * NB)` of `QB` queries, written to `ctx` (queries `ctx_stride`
/// apart): `v` points at lane 0 of key 0's value (keys `stride` apart), `sc` at the
/// queries' weights (`lp` apart). Only from AVX-512 code.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn context_avx512<const NB: usize>(
    v: *const f32, stride: usize, sc: *const f32, lp: usize, len: usize, ctx: *mut f32, ctx_stride: usize,
) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::*;
        let mut acc = [[_mm512_setzero_ps(); NB]; QB];
        for j in 0..len {
            let vv: [__m512; NB] = std::array::from_fn(|b| _mm512_loadu_ps(v.add(j * stride + 16 * b)));
            for qi in 0..QB {
                let p = _mm512_set1_ps(*sc.add(qi * lp + j));
                for b in 0..NB {
                    acc[qi][b] = _mm512_fmadd_ps(p, vv[b], acc[qi][b]);
                }
            }
        }
        for qi in 0..QB {
            for b in 0..NB {
                _mm512_storeu_ps(ctx.add(qi * ctx_stride + 16 * b), acc[qi][b]);
            }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("AVX-512 path on a non-x86 CPU")
}

/// Queries per register block.
const QB: usize = 4;
/// Lanes per register (16 f32 = one AVX-512 register).
const L: usize = 16;

/// `F`: use the AVX-512 inner loops (only from AVX-512 code).
/// Heads `[head0, head0 + group)` of one sequence, in register blocks of `QB` queries x `L`
/// lanes: `K^T` is gathered (one sequential pass over the rows) as `[head][d][len rounded up
/// to L]`, pre-scaled, V as `[len][head][d rounded up to L]`, so scores and context are
/// broadcast-FMAs over whole registers with no horizontal sums.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
unsafe fn heads_attention_generic<const F: bool>(
    rows: &[f32], len: usize, h: usize, d: usize, head0: usize, group: usize, bias: Bias, out: *mut f32, buf: &mut Vec<f32>,
) {
    let h3 = 3 * h;
    let scale = 1.0 / (d as f32).sqrt();
    let (lp, dp) = (len.div_ceil(L) * L, d.div_ceil(L) * L);
    let (gd, gdp) = (group * d, group * dp);
    let need = gd * lp + len * gdp + QB * lp + QB * dp;
    if buf.len() < need {
        buf.resize(need, 0.0);
    }
    let (kt, rest) = buf.split_at_mut(gd * lp);
    let (v, rest) = rest.split_at_mut(len * gdp);
    let (sc, rest) = rest.split_at_mut(QB * lp);
    let ctx = &mut rest[..QB * dp];
    let (ko, vo) = (h + head0 * d, 2 * h + head0 * d);
    for j in 0..len {
        let row = &rows[j * h3..(j + 1) * h3];
        for (c, &k) in row[ko..ko + gd].iter().enumerate() {
            kt[c * lp + j] = k * scale;
        }
        let vrow = &mut v[j * gdp..(j + 1) * gdp];
        for hh in 0..group {
            vrow[hh * dp..hh * dp + d].copy_from_slice(&row[vo + hh * d..vo + (hh + 1) * d]);
            vrow[hh * dp + d..(hh + 1) * dp].fill(0.0);
        }
    }
    for c in 0..gd {
        kt[c * lp + len..(c + 1) * lp].fill(0.0);
    }
    for hh in 0..group {
        let head = head0 + hh;
        let qo = head * d;
        let kt = &kt[hh * d * lp..(hh + 1) * d * lp];
        for i0 in (0..len).step_by(QB) {
            // Rows past the end repeat the last query; their results are dropped.
            let q: [&[f32]; QB] = std::array::from_fn(|qi| {
                let i = (i0 + qi).min(len - 1);
                &rows[i * h3 + qo..i * h3 + qo + d]
            });
            let mut jb = 0;
            while jb < lp {
                if F && jb + 2 * L <= lp {
                    scores_avx512::<2>(kt.as_ptr().add(jb), lp, &q, d, sc.as_mut_ptr().add(jb));
                    jb += 2 * L;
                } else if F {
                    scores_avx512::<1>(kt.as_ptr().add(jb), lp, &q, d, sc.as_mut_ptr().add(jb));
                    jb += L;
                } else {
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
                    jb += L;
                }
            }
            // Softmax over whole registers: padded keys score -inf, then weigh exactly 0.
            let mut inv = [0f32; QB];
            for qi in 0..QB {
                let s = &mut sc[qi * lp..(qi + 1) * lp];
                if let Some((table, span)) = bias {
                    let i = (i0 + qi).min(len - 1);
                    let from = head * (2 * span - 1) + span - 1 - i;
                    for (x, &b) in s[..len].iter_mut().zip(&table[from..from + len]) {
                        *x += b;
                    }
                }
                s[len..].fill(f32::NEG_INFINITY);
                let max = max16(s);
                for x in s.iter_mut() {
                    *x = exp(*x - max);
                }
                s[len..].fill(0.0);
                inv[qi] = 1.0 / sum16(s);
            }
            let mut db = 0;
            while db < dp {
                let vp = v.as_ptr().add(hh * dp + db);
                if F && db + 2 * L <= dp {
                    context_avx512::<2>(vp, gdp, sc.as_ptr(), lp, len, ctx.as_mut_ptr().add(db), dp);
                    db += 2 * L;
                } else if F {
                    context_avx512::<1>(vp, gdp, sc.as_ptr(), lp, len, ctx.as_mut_ptr().add(db), dp);
                    db += L;
                } else {
                    let mut acc = [[0f32; L]; QB];
                    for j in 0..len {
                        let o = j * gdp + hh * dp + db;
                        let vv: &[f32; L] = v[o..o + L].try_into().unwrap();
                        for qi in 0..QB {
                            let p = sc[qi * lp + j];
                            for l in 0..L {
                                acc[qi][l] += p * vv[l];
                            }
                        }
                    }
                    for qi in 0..QB {
                        ctx[qi * dp + db..qi * dp + db + L].copy_from_slice(&acc[qi]);
                    }
                    db += L;
                }
            }
            for qi in 0..QB.min(len - i0) {
                let dst = std::slice::from_raw_parts_mut(out.add((i0 + qi) * h + head * d), d);
                for (dst, &a) in dst.iter_mut().zip(&ctx[qi * dp..qi * dp + d]) {
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
