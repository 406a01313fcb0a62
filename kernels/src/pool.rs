//! Masked mean pooling fused with L2 normalisation, as a candle custom op: the mean of each
//! packed sequence's rows, then (optionally) that mean divided by its L2 norm, straight from the
//! encoder's hidden states in their own dtype. The tensor-op version builds a `[B, N]` weight
//! matrix for a matmul, converts the dtype and normalises in a second pass. CPU (sequences over
//! rayon) and CUDA (`cuda/pool.cu`: one block per sequence and 32-column tile, then one block per
//! row for the norm). Sums are f32 whatever the input dtype.
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

const NAME: &str = "masked-mean-l2";

/// The floor under the norm: a row is divided by `max(||row||, L2_EPS)`, as PyTorch's
/// `F.normalize` (and so sentence-transformers' Normalize) does with its default eps. A zero
/// row stays zero instead of becoming NaN.
pub const L2_EPS: f32 = 1e-12;

/// `[B, H]` f32: row b is the mean of the `lens[b]` rows of sequence b in `hidden`, and with
/// `normalize` that mean over `max(its L2 norm, L2_EPS)`.
///
/// `hidden`: packed `[N, H]`, f32, f16 or bf16 (sequence b is rows `sum(lens[..b])` to
/// `sum(lens[..=b])`); `lens`: each > 0, summing to N. On the CPU, or CUDA with the `cuda`
/// feature.
pub fn masked_mean_l2(hidden: &Tensor, lens: &[usize], normalize: bool) -> Result<Tensor> {
    let &[n, h] = hidden.dims() else {
        candle_core::bail!("{NAME}: hidden must be packed [tokens, hidden], got {:?}", hidden.dims());
    };
    if !matches!(hidden.dtype(), DType::F32 | DType::F16 | DType::BF16) {
        candle_core::bail!("{NAME}: hidden is {:?}; f32, f16 and bf16 are supported", hidden.dtype());
    }
    if let Some(i) = lens.iter().position(|&len| len == 0) {
        candle_core::bail!("{NAME}: sequence {i} is empty; every sequence needs at least one row");
    }
    let total: usize = lens.iter().sum();
    if total != n {
        candle_core::bail!("{NAME}: the lengths sum to {total}, hidden has {n} rows");
    }
    crate::check_device(hidden.device(), NAME)?;
    if lens.is_empty() || h == 0 {
        return Tensor::zeros((lens.len(), h), DType::F32, hidden.device());
    }
    hidden.contiguous()?.apply_op1_no_bwd(&PoolOp { lens: lens.to_vec(), normalize })
}

struct PoolOp {
    lens: Vec<usize>,
    normalize: bool,
}

impl CustomOp1 for PoolOp {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, h) = l.shape().dims2()?;
        let Some((a, z)) = l.contiguous_offsets() else {
            candle_core::bail!("{NAME}: input must be contiguous");
        };
        let out = match s {
            CpuStorage::F32(v) => pool_cpu(&v[a..z], h, &self.lens, self.normalize, |x| x),
            CpuStorage::F16(v) => pool_cpu(&v[a..z], h, &self.lens, self.normalize, |x| x.to_f32()),
            CpuStorage::BF16(v) => pool_cpu(&v[a..z], h, &self.lens, self.normalize, |x| x.to_f32()),
            _ => candle_core::bail!("{NAME}: f32, f16 and bf16 are supported"),
        };
        Ok((CpuStorage::F32(out), Shape::from((self.lens.len(), h))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        use crate::cuda::{function, input, output, Module};
        use candle_core::backend::BackendStorage;
        use candle_core::cuda::cudarc::driver::{CudaView, LaunchConfig, PushKernelArg};
        use candle_core::cuda::WrapErr;

        let (n, h) = l.shape().dims2()?;
        let b = self.lens.len();
        if n > u32::MAX as usize || h > u32::MAX as usize || b > i32::MAX as usize || h.div_ceil(32) > 65535 {
            candle_core::bail!("{NAME}: [{n}, {h}] in {b} sequences is too large for the CUDA kernel");
        }
        let dev = &s.device;
        let mut starts = Vec::with_capacity(b + 1);
        starts.push(0u32);
        for &len in &self.lens {
            starts.push(starts[starts.len() - 1] + len as u32);
        }
        let starts = dev.clone_htod(&starts)?;
        let mut out = output::<f32>(dev, b * h, f32::NAN)?;
        let h32 = h as u32;
        let stream = dev.cuda_stream();
        let cfg =
            LaunchConfig { grid_dim: (b as u32, h.div_ceil(32) as u32, 1), block_dim: (32, 8, 1), shared_mem_bytes: 0 };
        // The three input dtypes differ only in the kernel's name and the view's element type.
        fn launch<T>(
            stream: &candle_core::cuda::cudarc::driver::CudaStream,
            func: &candle_core::cuda::cudarc::driver::CudaFunction,
            x: &CudaView<'_, T>,
            starts: &candle_core::cuda::cudarc::driver::CudaSlice<u32>,
            out: &mut candle_core::cuda::cudarc::driver::CudaSlice<f32>,
            h: &u32,
            cfg: LaunchConfig,
        ) -> Result<()> {
            let mut args = stream.launch_builder(func);
            args.arg(x).arg(starts).arg(out).arg(h);
            // SAFETY: (x, starts, out, H) is the kernel's signature; starts ends at x's row
            // count and the grid covers exactly b x ceil(H / 32) tiles of out.
            unsafe { args.launch(cfg) }.w()?;
            Ok(())
        }
        match s.dtype() {
            DType::F32 => {
                let f = function(dev, Module::Pool, "masked_mean_f32")?;
                launch(&stream, &f, &input::<f32>(s, l, NAME)?, &starts, &mut out, &h32, cfg)?
            }
            DType::F16 => {
                let f = function(dev, Module::Pool, "masked_mean_f16")?;
                launch(&stream, &f, &input::<half::f16>(s, l, NAME)?, &starts, &mut out, &h32, cfg)?
            }
            DType::BF16 => {
                let f = function(dev, Module::Pool, "masked_mean_bf16")?;
                launch(&stream, &f, &input::<half::bf16>(s, l, NAME)?, &starts, &mut out, &h32, cfg)?
            }
            other => candle_core::bail!("{NAME}: hidden is {other:?}; f32, f16 and bf16 are supported"),
        }
        if self.normalize {
            let f = function(dev, Module::Pool, "l2_normalize_rows")?;
            let threads = h.next_power_of_two().clamp(32, 256) as u32;
            let cfg = LaunchConfig { grid_dim: (b as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
            let eps = L2_EPS;
            let mut args = stream.launch_builder(&f);
            args.arg(&mut out).arg(&h32).arg(&eps);
            // SAFETY: (rows, H, eps), one block per row of out, a power-of-two block <= 1024.
            unsafe { args.launch(cfg) }.w()?;
        }
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((b, h))))
    }
}

/// Sequences below this many input elements in all are pooled on the calling thread.
const PARALLEL_WORK: usize = 1 << 15;

/// The CPU kernel: rows summed in order, in f32, divided by the length, then normalised.
fn pool_cpu<T: Copy + Sync>(
    x: &[T],
    h: usize,
    lens: &[usize],
    normalize: bool,
    to_f32: impl Fn(T) -> f32 + Sync,
) -> Vec<f32> {
    let mut starts = Vec::with_capacity(lens.len());
    let mut at = 0;
    for &len in lens {
        starts.push(at);
        at += len;
    }
    let mut out = vec![0f32; lens.len() * h];
    let one = |((row, &start), &len): ((&mut [f32], &usize), &usize)| {
        for r in x[start * h..(start + len) * h].chunks_exact(h) {
            for (o, &v) in row.iter_mut().zip(r) {
                *o += to_f32(v);
            }
        }
        let n = len as f32;
        row.iter_mut().for_each(|o| *o /= n);
        if normalize {
            l2_normalize(row);
        }
    };
    if x.len() < PARALLEL_WORK || lens.len() == 1 {
        out.chunks_mut(h).zip(&starts).zip(lens).for_each(one);
    } else {
        crate::on_cpu_pool(|| out.par_chunks_mut(h).zip(&starts).zip(lens).for_each(one));
    }
    out
}

/// In place: `v / max(||v||, L2_EPS)`.
fn l2_normalize(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(L2_EPS);
    v.iter_mut().for_each(|x| *x /= norm);
}
