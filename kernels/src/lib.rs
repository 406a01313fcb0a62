//! Fused kernels for the hot paths of the encoders, each a candle custom op.
//! Every op has a CPU implementation (the reference a CUDA one is tested against).
pub mod activation;
pub mod attention;
pub mod conv;
pub mod dot;
pub mod embedding;
pub mod gemm;
pub mod linear;
pub mod norm;

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

/// Tests: make attention and LayerNorm take their portable code path (no AVX-512) as well.
#[doc(hidden)]
pub fn set_portable_only(on: bool) {
    PORTABLE_ONLY.store(on, std::sync::atomic::Ordering::Relaxed);
}

#[inline]
pub(crate) fn portable_only() -> bool {
    PORTABLE_ONLY.load(std::sync::atomic::Ordering::Relaxed)
}
