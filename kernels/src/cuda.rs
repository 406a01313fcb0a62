//! The CUDA side shared by this crate's kernels: the fatbins build.rs compiled from `cuda/*.cu`
//! (a cubin for `CUDA_COMPUTE_CAP` plus its PTX, see build.rs for why not run-time NVRTC),
//! loaded once per device, and the buffers the ops hand their kernels.
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::cuda::cudarc::driver::{CudaFunction, CudaModule, CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda::cudarc::nvrtc::Ptx;
use candle_core::cuda::{CudaDType, CudaDevice, CudaStorage, DeviceId, WrapErr};
use candle_core::{Layout, Result};

/// One compiled `cuda/*.cu` file.
#[derive(Clone, Copy)]
pub(crate) enum Module {
    Viterbi,
    Pool,
    TopK,
}

impl Module {
    fn name(self) -> &'static str {
        match self {
            Module::Viterbi => "viterbi",
            Module::Pool => "pool",
            Module::TopK => "topk",
        }
    }

    fn image(self) -> &'static [u8] {
        match self {
            Module::Viterbi => include_bytes!(concat!(env!("OUT_DIR"), "/viterbi.fatbin")),
            Module::Pool => include_bytes!(concat!(env!("OUT_DIR"), "/pool.fatbin")),
            Module::TopK => include_bytes!(concat!(env!("OUT_DIR"), "/topk.fatbin")),
        }
    }
}

type Modules = Mutex<HashMap<(DeviceId, &'static str), Arc<CudaModule>>>;

/// `name` from `module`, the module loaded into `dev`'s context on first use. (candle's own
/// `get_or_load_custom_func` takes PTX text only, so this keeps its own cache.)
pub(crate) fn function(dev: &CudaDevice, module: Module, name: &str) -> Result<CudaFunction> {
    static MODULES: OnceLock<Modules> = OnceLock::new();
    let modules = MODULES.get_or_init(Default::default);
    let key = (dev.id(), module.name());
    let loaded = modules.lock().unwrap_or_else(|e| e.into_inner()).get(&key).cloned();
    let loaded = match loaded {
        Some(m) => m,
        None => {
            // An owned copy: the driver reads the image from a heap buffer (malloc's 16-byte
            // alignment), not from wherever the linker put the embedded bytes.
            let m = dev.cuda_stream().context().load_module(Ptx::from_binary(module.image().to_vec())).w()?;
            modules.lock().unwrap_or_else(|e| e.into_inner()).entry(key).or_insert(m).clone()
        }
    };
    loaded.load_function(name).w()
}

/// A contiguous input's elements, from its layout's offset.
pub(crate) fn input<'a, T: CudaDType + DeviceRepr>(
    s: &'a CudaStorage,
    l: &Layout,
    op: &str,
) -> Result<CudaView<'a, T>> {
    let slice = s.as_cuda_slice::<T>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(slice.slice(a..b)),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// An output buffer of `n` elements for a kernel that writes every one of them: uninitialised,
/// or filled with `poison` when tests ask (`crate::set_poison_outputs`).
pub(crate) fn output<T: DeviceRepr + Clone + 'static>(dev: &CudaDevice, n: usize, poison: T) -> Result<CudaSlice<T>> {
    if crate::poison_outputs() {
        dev.clone_htod(&vec![poison; n])
    } else {
        // SAFETY: the caller's kernel writes all n elements before anything reads them.
        unsafe { dev.alloc::<T>(n) }
    }
}
