//! Viterbi decoding of a linear-chain CRF over a padded batch, as a candle custom op: the best
//! tag path of each sequence and its score, in one pass over the emissions instead of the
//! handful of broadcast tensors per position the tensor-op version (`Crf::decode` in the models
//! crate) builds. CPU (sequences over rayon) and CUDA (`cuda/viterbi.cu`: one block per
//! sequence, one thread per tag, back-pointers in a global scratch buffer, trace-back by one
//! thread).
//!
//! Both compute every candidate as `(score[from] + transitions[from][to]) + emissions[t][to]`
//! and keep the first maximum (the lowest tag index wins a tie, at every step and at the end),
//! which is the order and the tie rule of the tensor-op version on the CPU: the paths agree
//! exactly and so do the scores.
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::linear::contiguous_f32;

const NAME: &str = "viterbi-decode";

/// The CUDA kernel keeps two rows of scores in shared memory (48 KiB): at most this many tags.
pub const MAX_CUDA_TAGS: usize = 6144;

/// The best tag path of each sequence and its score.
///
/// - `emissions`: `[B, L, T]` (batch, padded length, tags), any float dtype (computed in f32);
/// - `lengths`: one per sequence, each in `1..=L`; positions at or past a sequence's length are
///   padding and never change its result;
/// - `transitions`: `[T, T]`, `transitions[i][j]` scores moving from tag i to tag j;
/// - `start`, `end`: `[T]`, the scores of starting and of ending at each tag.
///
/// The score of a path y is `start[y0] + em[0][y0] + sum_t (trans[y(t-1)][yt] + em[t][yt]) +
/// end[y_last]`. All tensors on one device: the CPU, or CUDA with the `cuda` feature. NaN
/// inputs give an unspecified (but in-range) path.
pub fn viterbi_decode(
    emissions: &Tensor,
    lengths: &[usize],
    transitions: &Tensor,
    start: &Tensor,
    end: &Tensor,
) -> Result<(Vec<Vec<u32>>, Vec<f32>)> {
    let &[b, l, t] = emissions.dims() else {
        candle_core::bail!("{NAME}: emissions must be [batch, length, tags], got {:?}", emissions.dims());
    };
    if t == 0 {
        candle_core::bail!("{NAME}: emissions have no tags ({:?})", emissions.dims());
    }
    for (name, x, want) in
        [("transitions", transitions, &[t, t][..]), ("start", start, &[t][..]), ("end", end, &[t][..])]
    {
        if x.dims() != want {
            candle_core::bail!(
                "{NAME}: {name} is {:?}, expected {want:?} for emissions {:?}",
                x.dims(),
                emissions.dims()
            );
        }
        if !x.dtype().is_float() {
            candle_core::bail!("{NAME}: {name} is {:?}, expected a float dtype", x.dtype());
        }
        if !x.device().same_device(emissions.device()) {
            candle_core::bail!(
                "{NAME}: {name} is on {:?}, emissions on {:?}",
                x.device().location(),
                emissions.device().location()
            );
        }
    }
    if !emissions.dtype().is_float() {
        candle_core::bail!("{NAME}: emissions are {:?}, expected a float dtype", emissions.dtype());
    }
    if lengths.len() != b {
        candle_core::bail!("{NAME}: {} lengths for a batch of {b}", lengths.len());
    }
    if let Some((i, n)) = lengths.iter().enumerate().find(|(_, &n)| n == 0 || n > l) {
        candle_core::bail!("{NAME}: sequence {i} has length {n}; lengths must be in 1..={l} (the padded length)");
    }
    crate::check_device(emissions.device(), NAME)?;
    if b == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let row = |x: &Tensor| x.to_dtype(DType::F32)?.reshape((1, t));
    let params = Tensor::cat(&[row(start)?, row(end)?, transitions.to_dtype(DType::F32)?], 0)?;
    let em = emissions.to_dtype(DType::F32)?.contiguous()?;
    let packed = em.apply_op2_no_bwd(&params, &ViterbiOp { lengths: lengths.to_vec() })?.to_vec2::<u32>()?;
    Ok(packed
        .into_iter()
        .zip(lengths)
        .map(|(mut row, &n)| {
            let score = f32::from_bits(row[l]);
            row.truncate(n);
            (row, score)
        })
        .unzip())
}

/// Emissions `[B, L, T]` and parameters `[T + 2, T]` (start, end, transitions) in f32, to
/// `[B, L + 1]` u32: each sequence's tags (0 past its length), then its score's f32 bits (one
/// output tensor carries both, and the bits survive exactly).
struct ViterbiOp {
    lengths: Vec<usize>,
}

impl CustomOp2 for ViterbiOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, l, t) = l1.shape().dims3()?;
        let em = contiguous_f32(s1, l1, NAME)?;
        let params = contiguous_f32(s2, l2, NAME)?;
        Ok((CpuStorage::U32(decode_cpu(em, params, &self.lengths, l, t)), Shape::from((b, l + 1))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{function, input, output, Module};
        use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda::WrapErr;

        let (b, l, t) = l1.shape().dims3()?;
        if t > MAX_CUDA_TAGS {
            candle_core::bail!("{NAME}: {t} tags; the CUDA kernel takes at most {MAX_CUDA_TAGS}");
        }
        if b > i32::MAX as usize || b * (l + 1) > u32::MAX as usize {
            candle_core::bail!("{NAME}: batch {b} x length {l} is too large for the CUDA kernel");
        }
        let dev = &s1.device;
        let em = input::<f32>(s1, l1, NAME)?;
        let params = input::<f32>(s2, l2, NAME)?;
        let lengths: Vec<u32> = self.lengths.iter().map(|&n| n as u32).collect();
        let lengths = dev.clone_htod(&lengths)?;
        // Scratch: the kernel writes each back-pointer before the trace-back reads it.
        let mut back = unsafe { dev.alloc::<u32>(b * l * t) }?;
        let mut out = output::<u32>(dev, b * (l + 1), u32::MAX)?;
        let func = function(dev, Module::Viterbi, "viterbi_f32")?;
        let threads = (t.div_ceil(32) * 32).min(256) as u32;
        let cfg = LaunchConfig {
            grid_dim: (b as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: (2 * t * std::mem::size_of::<f32>()) as u32,
        };
        let (l32, t32) = (l as u32, t as u32);
        let stream = dev.cuda_stream();
        let mut launch = stream.launch_builder(&func);
        launch.arg(&em).arg(&params).arg(&lengths).arg(&mut back).arg(&mut out).arg(&l32).arg(&t32);
        // SAFETY: the arguments match the kernel's signature; every index it forms is within
        // the buffers' sizes for these (b, l, t) and lengths in 1..=l.
        unsafe { launch.launch(cfg) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((b, l + 1))))
    }
}

/// Sequences below this many multiply-free candidate evaluations (`L * T * T` summed over the
/// batch) run on the calling thread: rayon's hand-off costs more than they do.
const PARALLEL_WORK: usize = 1 << 16;

/// The CPU kernel: `[B, L + 1]` packed as [`ViterbiOp`] says.
fn decode_cpu(em: &[f32], params: &[f32], lengths: &[usize], l: usize, t: usize) -> Vec<u32> {
    let (start, rest) = params.split_at(t);
    let (end, trans) = rest.split_at(t);
    let mut out = vec![0u32; lengths.len() * (l + 1)];
    let one = |((out, em), &n): ((&mut [u32], &[f32]), &usize)| decode_one(em, n, start, end, trans, t, out);
    let work: usize = lengths.iter().map(|&n| n * t * t).sum();
    if work < PARALLEL_WORK || lengths.len() == 1 {
        out.chunks_mut(l + 1).zip(em.chunks(l * t)).zip(lengths).for_each(one);
    } else {
        crate::on_cpu_pool(|| out.par_chunks_mut(l + 1).zip(em.par_chunks(l * t)).zip(lengths).for_each(one));
    }
    out
}

/// One sequence: `em` is its `[L, T]` block, `out` its `[L + 1]` output row (zeroed).
fn decode_one(em: &[f32], len: usize, start: &[f32], end: &[f32], trans: &[f32], t: usize, out: &mut [u32]) {
    let mut cur: Vec<f32> = em[..t].iter().zip(start).map(|(&e, &s)| e + s).collect();
    let mut next = vec![0f32; t];
    // back[(step - 1) * t + to]: the best `from` at step - 1 given `to` at step.
    let mut back = vec![0u32; (len - 1) * t];
    for step in 1..len {
        let e = &em[step * t..(step + 1) * t];
        step_scores(&cur, trans, e, &mut next, &mut back[(step - 1) * t..step * t]);
        std::mem::swap(&mut cur, &mut next);
    }
    let mut best = cur[0] + end[0];
    let mut tag = 0;
    for (j, (&s, &e)) in cur.iter().zip(end).enumerate().skip(1) {
        let v = s + e;
        if v > best {
            best = v;
            tag = j;
        }
    }
    out[out.len() - 1] = best.to_bits();
    out[len - 1] = tag as u32;
    for step in (1..len).rev() {
        tag = back[(step - 1) * t + tag] as usize;
        out[step - 1] = tag as u32;
    }
}

/// One Viterbi step: for every `to`, the best `(cur[from] + trans[from][to]) + e[to]` over
/// `from` (into `next`) and that `from` (into `bp`). `from` is the outer loop, so the inner one
/// runs along a row of `trans` and vectorises; each `to` still sees its candidates in
/// increasing `from` and keeps a new one only when strictly greater, so the first maximum wins
/// exactly as in a per-`to` argmax.
fn step_scores(cur: &[f32], trans: &[f32], e: &[f32], next: &mut [f32], bp: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") && !crate::portable_only() {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { step_scores_avx512(cur, trans, e, next, bp) };
    }
    step_scores_generic(cur, trans, e, next, bp)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn step_scores_avx512(cur: &[f32], trans: &[f32], e: &[f32], next: &mut [f32], bp: &mut [u32]) {
    step_scores_generic(cur, trans, e, next, bp)
}

#[inline(always)]
fn step_scores_generic(cur: &[f32], trans: &[f32], e: &[f32], next: &mut [f32], bp: &mut [u32]) {
    let t = cur.len();
    let (next, bp, e) = (&mut next[..t], &mut bp[..t], &e[..t]);
    for (((n, b), &tr), &ej) in next.iter_mut().zip(bp.iter_mut()).zip(&trans[..t]).zip(e) {
        *n = (cur[0] + tr) + ej;
        *b = 0;
    }
    for (from, (&s, row)) in cur.iter().zip(trans.chunks_exact(t)).enumerate().skip(1) {
        let from = from as u32;
        for (((n, b), &tr), &ej) in next.iter_mut().zip(bp.iter_mut()).zip(row).zip(e) {
            let v = (s + tr) + ej;
            let better = v > *n;
            *n = if better { v } else { *n };
            *b = if better { from } else { *b };
        }
    }
}
