//! Fused kernels for the hot paths of the encoders, each a candle custom op.
//! Every op has a CPU implementation (the reference a CUDA one is tested against); CRF Viterbi
//! decoding, masked mean pooling with L2 normalisation and top-k also have a CUDA one, behind
//! the `cuda` feature (`cuda/*.cu`, compiled by build.rs).
pub mod activation;
pub mod attention;
pub mod conv;
#[cfg(feature = "cuda")]
mod cuda;
pub mod dot;
pub mod embedding;
pub mod gemm;
pub mod linear;
pub mod norm;
pub mod pool;
pub mod topk;
pub mod viterbi;

use candle_core::Device;

/// Runs `f` on a worker of rayon's global pool (the pool every CPU kernel here splits its work
/// over), waiting for it. A forward pass of many short parallel ops run this way hands its
/// splits to a sibling worker directly, instead of injecting each op from outside the pool and
/// sleeping on a latch until it is done.
pub fn on_cpu_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    rayon::scope(|_| f())
}

static PORTABLE_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Tests: make attention, LayerNorm and the Viterbi step take their portable code path (no
/// AVX-512) as well.
#[doc(hidden)]
pub fn set_portable_only(on: bool) {
    PORTABLE_ONLY.store(on, std::sync::atomic::Ordering::Relaxed);
}

#[inline]
pub(crate) fn portable_only() -> bool {
    PORTABLE_ONLY.load(std::sync::atomic::Ordering::Relaxed)
}

static POISON_OUTPUTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Tests: the CUDA ops fill each output buffer with NaN / `u32::MAX` before their kernel runs,
/// so an element the kernel fails to write shows up against the CPU result instead of passing
/// as stale zeros. Off by default: it costs an upload per call.
#[doc(hidden)]
pub fn set_poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, std::sync::atomic::Ordering::Relaxed);
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn poison_outputs() -> bool {
    POISON_OUTPUTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The ops with a CUDA kernel run on the CPU always and on CUDA with the `cuda` feature; any
/// other device is an error that says so (candle's own message would only say "no metal
/// implementation").
pub(crate) fn check_device(device: &Device, op: &str) -> candle_core::Result<()> {
    match device {
        Device::Cpu => Ok(()),
        Device::Cuda(_) if cfg!(feature = "cuda") => Ok(()),
        other => candle_core::bail!(
            "{op}: runs on the cpu, or on cuda in a build with the `cuda` feature; not on {:?}",
            other.location()
        ),
    }
}
