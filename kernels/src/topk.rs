//! Top-k of each row of a score matrix (the knowledge base's query-by-document scores), as a
//! candle custom op that returns the indices; the values are then gathered. Replaces a full
//! sort of every row (`arg_sort_last_dim`) when only the best k are wanted. CPU (a bounded heap
//! for small k, else a partial select; rows over rayon) and CUDA (`cuda/topk.cu`: one block per
//! row, a radix select over distinct 64-bit keys, then a bitonic sort of the k winners in shared
//! memory).
//!
//! Order, identical on both: larger scores first; equal scores (-0.0 equals +0.0) by lower
//! index first; NaN ranks below every number, -inf included, and NaNs among themselves by
//! index. Both rank by the same key, so they agree exactly, NaNs and ties included.
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const NAME: &str = "topk";

/// The CUDA kernel sorts the winners in a shared-memory buffer of this many entries: a larger
/// k on a CUDA tensor is an error (the CPU has no limit).
pub const MAX_CUDA_K: usize = 1024;

/// The best `min(k, N)` scores of each row of `scores` (`[Q, N]`, f32) and their column
/// indices: values `[Q, k']` f32, best first, and indices `[Q, k']` u32, in the order the module
/// docs define. `k = 0` or `N = 0` gives `[Q, 0]` tensors. On the CPU, or CUDA with the `cuda`
/// feature (there `k' <= MAX_CUDA_K`).
pub fn topk(scores: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let &[q, n] = scores.dims() else {
        candle_core::bail!("{NAME}: scores must be [queries, candidates], got {:?}", scores.dims());
    };
    if scores.dtype() != DType::F32 {
        candle_core::bail!("{NAME}: scores are {:?}; only f32 is supported", scores.dtype());
    }
    if n >= u32::MAX as usize {
        candle_core::bail!("{NAME}: {n} candidates per row; indices are u32, so at most {}", u32::MAX - 1);
    }
    crate::check_device(scores.device(), NAME)?;
    let k = k.min(n);
    if q == 0 || k == 0 {
        let dev = scores.device();
        return Ok((Tensor::zeros((q, k), DType::F32, dev)?, Tensor::zeros((q, k), DType::U32, dev)?));
    }
    if scores.device().is_cuda() && k > MAX_CUDA_K {
        candle_core::bail!("{NAME}: k = {k} on cuda; the CUDA kernel returns at most {MAX_CUDA_K} per row");
    }
    let scores = scores.contiguous()?;
    let indices = scores.apply_op1_no_bwd(&TopKOp { k })?;
    Ok((scores.gather(&indices, 1)?, indices))
}

/// The ranking key of a score: larger is better. The high 32 bits order the floats (the sign
/// flip that makes IEEE bits sort as unsigned integers; NaN is 0, below -inf's key; -0.0 is
/// read as +0.0); the low 32 bits are `!index`, so the lower index wins a tie and no two
/// elements of a row have the same key. `cuda/topk.cu` computes the same.
#[inline(always)]
pub fn rank_key(score: f32, index: u32) -> u64 {
    ((order_key(score) as u64) << 32) | (!index) as u64
}

/// The high half of [`rank_key`]: the float's place in the order, NaN lowest.
#[inline(always)]
fn order_key(score: f32) -> u32 {
    let bits = if score == 0.0 { 0 } else { score.to_bits() };
    if score.is_nan() {
        0
    } else if bits & 0x8000_0000 != 0 {
        !bits
    } else {
        bits | 0x8000_0000
    }
}

struct TopKOp {
    k: usize,
}

impl CustomOp1 for TopKOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (q, n) = l.shape().dims2()?;
        let x = crate::linear::contiguous_f32(s, l, NAME)?;
        let k = self.k;
        let mut out = vec![0u32; q * k];
        let one = |(row, out): (&[f32], &mut [u32])| topk_row(row, out);
        if q * n < PARALLEL_WORK || q == 1 {
            x.chunks(n).zip(out.chunks_mut(k)).for_each(one);
        } else {
            crate::on_cpu_pool(|| x.par_chunks(n).zip(out.par_chunks_mut(k)).for_each(one));
        }
        Ok((CpuStorage::U32(out), Shape::from((q, k))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{function, input, output, Module};
        use candle_core::cuda::cudarc::driver::{LaunchConfig, PushKernelArg};
        use candle_core::cuda::WrapErr;

        let (q, n) = l.shape().dims2()?;
        let k = self.k;
        if k > MAX_CUDA_K || q > i32::MAX as usize {
            candle_core::bail!("{NAME}: k = {k} over {q} rows; the CUDA kernel takes k <= {MAX_CUDA_K}");
        }
        let dev = &s.device;
        let x = input::<f32>(s, l, NAME)?;
        let mut out = output::<u32>(dev, q * k, u32::MAX)?;
        let func = function(dev, Module::TopK, "topk_f32")?;
        let cfg = LaunchConfig { grid_dim: (q as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let (n32, k32) = (n as u32, k as u32);
        let stream = dev.cuda_stream();
        let mut args = stream.launch_builder(&func);
        args.arg(&x).arg(&n32).arg(&k32).arg(&mut out);
        // SAFETY: (scores, N, k, out) is the kernel's signature; 1 <= k <= min(N, 1024) and
        // N < 2^32 - 1 as it requires; one block per row of out.
        unsafe { args.launch(cfg) }.w()?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((q, k))))
    }
}

/// Rows below this many scores in all are ranked on the calling thread.
const PARALLEL_WORK: usize = 1 << 15;

/// One row: the indices of its best `out.len()` scores, best first. A bounded min-heap of keys
/// when k is small next to N (one compare per score once it is full), otherwise a partial select
/// over every key.
fn topk_row(row: &[f32], out: &mut [u32]) {
    use std::cmp::Reverse;
    let k = out.len();
    let keys = row.iter().enumerate().map(|(i, &v)| rank_key(v, i as u32));
    let mut best: Vec<u64> = if k * 8 <= row.len() {
        let mut heap: std::collections::BinaryHeap<Reverse<u64>> = keys.take(k).map(Reverse).collect();
        // The heap's minimum, cached. A block of 16 scores is looked at one by one only when one
        // of them could enter (its order key reaches the minimum's): a test that vectorises,
        // and that almost every block of a long row fails.
        let mut floor = heap.peek().map_or(0, |m| m.0);
        for (b, block) in row[k..].chunks(16).enumerate() {
            let low = (floor >> 32) as u32;
            if !block.iter().fold(false, |any, &v| any | (order_key(v) >= low)) {
                continue;
            }
            let base = k + b * 16;
            for (j, &v) in block.iter().enumerate() {
                let key = rank_key(v, (base + j) as u32);
                if key > floor {
                    if let Some(mut min) = heap.peek_mut() {
                        *min = Reverse(key);
                    }
                    floor = heap.peek().map_or(0, |m| m.0);
                }
            }
        }
        heap.into_iter().map(|Reverse(key)| key).collect()
    } else {
        let mut all: Vec<u64> = keys.collect();
        if k < all.len() {
            all.select_nth_unstable_by(k - 1, |a, b| b.cmp(a));
            all.truncate(k);
        }
        all
    };
    best.sort_unstable_by(|a, b| b.cmp(a));
    for (o, key) in out.iter_mut().zip(best) {
        *o = !(key as u32);
    }
}
