//! A dense layer `act(x @ W^T + b) [+ residual]` with `W^T` packed once for the CPU GEMM
//! (`crate::gemm`), as a candle custom op. CPU and f32 only: callers keep a plain-candle path
//! for other devices and dtypes.
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};

pub use crate::gemm::Act;
use crate::gemm::{gemm_alloc, Epilogue, PackedB};

#[derive(Clone)]
pub struct PackedLinear {
    w: Arc<PackedB>,
    bias: Option<Arc<Vec<f32>>>,
}

impl PackedLinear {
    /// `wt`: `W^T`, `[in, out]`; `bias`: `[out]`. Both on CPU, f32.
    pub fn new(wt: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        let (k, n) = wt.dims2()?;
        if !wt.device().is_cpu() || wt.dtype() != DType::F32 {
            candle_core::bail!("PackedLinear: weights must be f32 on cpu");
        }
        let w = wt.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let bias = match bias {
            Some(b) => {
                if b.dims1()? != n {
                    candle_core::bail!("PackedLinear: bias is {:?}, expected [{n}]", b.shape());
                }
                Some(Arc::new(b.to_dtype(DType::F32)?.to_vec1::<f32>()?))
            }
            None => None,
        };
        Ok(Self { w: Arc::new(PackedB::pack(&w, k, n)), bias })
    }

    pub fn in_dim(&self) -> usize {
        self.w.k()
    }

    pub fn out_dim(&self) -> usize {
        self.w.n()
    }

    /// `act(x @ W^T + b) + residual` for `x: [m, in]` (and `residual: [m, out]`), f32 on cpu.
    pub fn forward(&self, x: &Tensor, act: Act, residual: Option<&Tensor>) -> Result<Tensor> {
        let (_, k) = x.dims2()?;
        if k != self.w.k() {
            candle_core::bail!("PackedLinear: input width {k}, weights expect {}", self.w.k());
        }
        let op = LinearOp { lin: self.clone(), act };
        match residual {
            Some(r) => x.apply_op2_no_bwd(r, &op),
            None => x.apply_op1_no_bwd(&op),
        }
    }
}

struct LinearOp {
    lin: PackedLinear,
    act: Act,
}

pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let v = match s {
        CpuStorage::F32(v) => v,
        _ => candle_core::bail!("{op}: only f32 on cpu"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

impl LinearOp {
    fn run(&self, x: &[f32], xl: &Layout, residual: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let (m, _) = xl.shape().dims2()?;
        let n = self.lin.w.n();
        let epi = Epilogue { bias: self.lin.bias.as_deref().map(|b| b.as_slice()), act: self.act, residual, act_after_residual: false };
        let out = gemm_alloc(x, m, &self.lin.w, &epi);
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }
}

impl CustomOp1 for LinearOp {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(contiguous_f32(s, l, "packed-linear")?, l, None)
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "packed-linear-residual"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, _) = l1.shape().dims2()?;
        if l2.shape().dims() != [m, self.lin.w.n()] {
            candle_core::bail!("packed-linear: residual is {:?}, expected [{m}, {}]", l2.shape(), self.lin.w.n());
        }
        let r = contiguous_f32(s2, l2, "packed-linear")?;
        self.run(contiguous_f32(s1, l1, "packed-linear")?, l1, Some(r))
    }
}
