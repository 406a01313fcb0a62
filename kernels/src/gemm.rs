//! f32 matrix products `C = A @ B` (`A: [m, k]` row-major, `B: [k, n]` packed once) with a
//! fused epilogue: `+ bias`, then an activation, then `+ residual` (or, for ResNet's block end,
//! `+ residual` before the activation). Row-major throughout.
//!
//! `B` (a layer's `W^T`) is packed at load into column panels of `NR` columns, each panel
//! `[k][NR]` contiguous and 64-byte aligned, zero-padded past `n`. The microkernel keeps an
//! `MR x NR` tile of `C` in registers (AVX-512 where the CPU has it, else AVX2+FMA, else plain
//! code), walking the full `k`. Work is split over rayon in blocks of rows x panel groups; each
//! task sweeps its rows under one panel at a time, so the panel stays in L2 while A's block
//! (at most a few hundred KiB) is re-read from L2. A `B` at most `NR / 2` wide (a thin conv's
//! output channels) is packed in half-width panels instead, so no lane multiplies padding.
use rayon::prelude::*;

use crate::activation;

/// Panel width (four AVX-512 registers).
pub const NR: usize = 64;
/// Panel width of a narrow `B`.
const NR_NARROW: usize = NR / 2;
/// Rows per register tile.
const MR: usize = 6;

#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// `B: [k, n]` packed in `NR`-column panels.
pub struct PackedB {
    k: usize,
    n: usize,
    /// Panel width: `NR`, or `NR_NARROW` when `n` fits in one.
    nr: usize,
    panels: usize,
    data: Vec<Line>,
}

impl PackedB {
    /// Packs a row-major `[k, n]` matrix.
    pub fn pack(b: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(b.len(), k * n, "pack: b is not [k, n]");
        let nr = if n <= NR_NARROW { NR_NARROW } else { NR };
        let panels = n.div_ceil(nr);
        let mut data = vec![Line([0f32; 16]); panels * k * nr / 16];
        let flat = unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr() as *mut f32, panels * k * nr) };
        for p in 0..panels {
            let c0 = p * nr;
            let w = nr.min(n - c0);
            for kk in 0..k {
                let dst = &mut flat[(p * k + kk) * nr..(p * k + kk) * nr + w];
                dst.copy_from_slice(&b[kk * n + c0..kk * n + c0 + w]);
            }
        }
        Self { k, n, nr, panels, data }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    fn panel(&self, p: usize) -> *const f32 {
        unsafe { (self.data.as_ptr() as *const f32).add(p * self.k * self.nr) }
    }
}

/// Activation applied after the bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Act {
    None,
    /// `x * (1 + erf(x / sqrt 2)) / 2`
    GeluErf,
    /// tanh approximation, as candle's `gelu`.
    GeluTanh,
    Relu,
}

pub struct Epilogue<'a> {
    pub bias: Option<&'a [f32]>,
    pub act: Act,
    /// `[m, n]`, added last (after the activation), unless `act_after_residual`.
    pub residual: Option<&'a [f32]>,
    /// `act(x + bias + residual)` instead of `act(x + bias) + residual`: a residual block that
    /// ends in `relu(conv(x) + skip)` (ResNet) rather than a pre-norm-style `f(x) + skip` (BERT).
    pub act_after_residual: bool,
}

impl<'a> Epilogue<'a> {
    /// Nothing after the product.
    pub fn none() -> Self {
        Self { bias: None, act: Act::None, residual: None, act_after_residual: false }
    }
}

/// Instruction set of the microkernel.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Plain,
}

/// The best microkernel this CPU runs.
#[doc(hidden)]
pub fn isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            return Isa::Avx512;
        }
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            return Isa::Avx2;
        }
    }
    Isa::Plain
}

/// `out[m, n] = epilogue(a[m, k] @ b)`.
pub fn gemm(a: &[f32], m: usize, b: &PackedB, epi: &Epilogue, out: &mut [f32]) {
    assert_eq!(out.len(), m * b.n, "gemm: out is not [m, n]");
    // SAFETY: out has room for m * n values.
    unsafe { gemm_into(a, m, b, epi, out.as_mut_ptr(), isa()) }
}

/// `gemm` with a given microkernel, for tests: panics if the CPU lacks it.
#[doc(hidden)]
pub fn gemm_with_isa(a: &[f32], m: usize, b: &PackedB, epi: &Epilogue, out: &mut [f32], isa: Isa) {
    assert_eq!(out.len(), m * b.n, "gemm: out is not [m, n]");
    let ok = match isa {
        Isa::Plain => true,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => std::is_x86_feature_detected!("avx512f"),
        #[allow(unreachable_patterns)]
        _ => false,
    };
    assert!(ok, "this CPU cannot run {isa:?}");
    // SAFETY: out has room for m * n values; the CPU has the instructions.
    unsafe { gemm_into(a, m, b, epi, out.as_mut_ptr(), isa) }
}

/// A fresh `[m, n]` result (never zero-filled: every element is written once).
pub fn gemm_alloc(a: &[f32], m: usize, b: &PackedB, epi: &Epilogue) -> Vec<f32> {
    let mut out = Vec::<f32>::with_capacity(m * b.n);
    // SAFETY: gemm_into writes all m * n elements before the length is set.
    unsafe {
        gemm_into(a, m, b, epi, out.as_mut_ptr(), isa());
        out.set_len(m * b.n);
    }
    out
}

/// # Safety
/// `out` must be valid for writes of `m * b.n()` values.
unsafe fn gemm_into(a: &[f32], m: usize, b: &PackedB, epi: &Epilogue, out: *mut f32, isa: Isa) {
    let (k, n) = (b.k, b.n);
    assert_eq!(a.len(), m * k, "gemm: a is not [m, k]");
    if let Some(bias) = epi.bias {
        assert_eq!(bias.len(), n, "gemm: bias is not [n]");
    }
    if let Some(r) = epi.residual {
        assert_eq!(r.len(), m * n, "gemm: residual is not [m, n]");
    }
    if m == 0 || n == 0 {
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    let row_tiles = m.div_ceil(MR);
    // Enough tasks for balance (4 per thread), as few row blocks as that allows.
    let want = if threads == 1 { 1 } else { 4 * threads };
    let rb = row_tiles.min(want);
    let pg = want.div_ceil(rb).min(b.panels);
    let out_ptr = out as usize;
    let task = |t: usize| {
        let (r, g) = (t / pg, t % pg);
        let (t0, t1) = (r * row_tiles / rb, (r + 1) * row_tiles / rb);
        let (p0, p1) = (g * b.panels / pg, (g + 1) * b.panels / pg);
        let out = out_ptr as *mut f32;
        // SAFETY: tasks own disjoint (row range x panel range) blocks of `out`.
        unsafe {
            match isa {
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => block_avx512(a, m, b, epi, out, t0, t1, p0, p1),
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => block_avx2(a, m, b, epi, out, t0, t1, p0, p1),
                _ => block_plain(a, m, b, epi, out, t0, t1, p0, p1),
            }
        }
    };
    if rb * pg == 1 {
        task(0);
    } else {
        (0..rb * pg).into_par_iter().for_each(task);
    }
}

macro_rules! block_fn {
    ($name:ident, $kernel:ident $(, $feat:literal)?) => {
        $(#[target_feature(enable = $feat)])?
        #[allow(clippy::too_many_arguments)]
        unsafe fn $name(
            a: &[f32], m: usize, b: &PackedB, epi: &Epilogue, out: *mut f32,
            t0: usize, t1: usize, p0: usize, p1: usize,
        ) {
            let (k, n) = (b.k, b.n);
            let mut tile = [[0f32; NR]; MR];
            for p in p0..p1 {
                let bp = b.panel(p);
                let c0 = p * b.nr;
                let w = b.nr.min(n - c0);
                for t in t0..t1 {
                    let r0 = t * MR;
                    let rows = MR.min(m - r0);
                    let ap = a.as_ptr().add(r0 * k);
                    match (rows, b.nr == NR) {
                        (6, true) => $kernel::<6, NR>(k, ap, bp, &mut tile),
                        (5, true) => $kernel::<5, NR>(k, ap, bp, &mut tile),
                        (4, true) => $kernel::<4, NR>(k, ap, bp, &mut tile),
                        (3, true) => $kernel::<3, NR>(k, ap, bp, &mut tile),
                        (2, true) => $kernel::<2, NR>(k, ap, bp, &mut tile),
                        (_, true) => $kernel::<1, NR>(k, ap, bp, &mut tile),
                        (6, false) => $kernel::<6, NR_NARROW>(k, ap, bp, &mut tile),
                        (5, false) => $kernel::<5, NR_NARROW>(k, ap, bp, &mut tile),
                        (4, false) => $kernel::<4, NR_NARROW>(k, ap, bp, &mut tile),
                        (3, false) => $kernel::<3, NR_NARROW>(k, ap, bp, &mut tile),
                        (2, false) => $kernel::<2, NR_NARROW>(k, ap, bp, &mut tile),
                        (_, false) => $kernel::<1, NR_NARROW>(k, ap, bp, &mut tile),
                    }
                    for (i, acc) in tile.iter_mut().enumerate().take(rows) {
                        let row = r0 + i;
                        let acc = &mut acc[..w];
                        if let Some(bias) = epi.bias {
                            for (x, &b) in acc.iter_mut().zip(&bias[c0..c0 + w]) {
                                *x += b;
                            }
                        }
                        if !epi.act_after_residual {
                            apply_act(epi.act, acc);
                        }
                        if let Some(res) = epi.residual {
                            for (x, &r) in acc.iter_mut().zip(&res[row * n + c0..row * n + c0 + w]) {
                                *x += r;
                            }
                        }
                        if epi.act_after_residual {
                            apply_act(epi.act, acc);
                        }
                        if w == NR {
                            std::ptr::copy_nonoverlapping(acc.as_ptr() as *const [f32; NR], out.add(row * n + c0) as *mut [f32; NR], 1);
                        } else {
                            std::ptr::copy_nonoverlapping(acc.as_ptr(), out.add(row * n + c0), w);
                        }
                    }
                }
            }
        }
    };
}

#[inline(always)]
fn apply_act(act: Act, acc: &mut [f32]) {
    match act {
        Act::None => {}
        Act::GeluErf => activation::gelu_erf_slice(acc),
        Act::GeluTanh => activation::gelu_tanh_slice(acc),
        Act::Relu => acc.iter_mut().for_each(|x| *x = x.max(0.0)),
    }
}

#[cfg(target_arch = "x86_64")]
block_fn!(block_avx512, kernel_avx512, "avx512f");
#[cfg(target_arch = "x86_64")]
block_fn!(block_avx2, kernel_avx2, "avx2,fma");
block_fn!(block_plain, kernel_plain);

/// `tile[0..R][..W] = a[R rows, stride k] @ panel[k][W]` (`W`: the panel width, NR or
/// NR_NARROW; the register arrays are sized for NR and only `W / 16` of them used).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn kernel_avx512<const R: usize, const W: usize>(k: usize, a: *const f32, b: *const f32, tile: &mut [[f32; NR]; MR]) {
    use std::arch::x86_64::*;
    let nv = W / 16;
    let mut c = [[_mm512_setzero_ps(); NR / 16]; R];
    for p in 0..k {
        let bv: [__m512; NR / 16] = std::array::from_fn(|j| if j < nv { _mm512_load_ps(b.add(p * W + 16 * j)) } else { _mm512_setzero_ps() });
        for r in 0..R {
            let av = _mm512_set1_ps(*a.add(r * k + p));
            for j in 0..nv {
                c[r][j] = _mm512_fmadd_ps(av, bv[j], c[r][j]);
            }
        }
    }
    for r in 0..R {
        for j in 0..nv {
            _mm512_storeu_ps(tile[r].as_mut_ptr().add(16 * j), c[r][j]);
        }
    }
}

/// AVX2: the NR-wide tile as eight 8-lane registers per row, one row a pass (16 registers).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn kernel_avx2<const R: usize, const W: usize>(k: usize, a: *const f32, b: *const f32, tile: &mut [[f32; NR]; MR]) {
    let mut r0 = 0;
    while r0 < R {
        kernel_avx2_rows::<1, W>(k, a.add(r0 * k), b, &mut tile[r0..]);
        r0 += 1;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn kernel_avx2_rows<const R: usize, const W: usize>(k: usize, a: *const f32, b: *const f32, tile: &mut [[f32; NR]]) {
    use std::arch::x86_64::*;
    let nv = W / 8;
    let mut c = [[_mm256_setzero_ps(); NR / 8]; R];
    for p in 0..k {
        let bv: [__m256; NR / 8] = std::array::from_fn(|j| if j < nv { _mm256_load_ps(b.add(p * W + 8 * j)) } else { _mm256_setzero_ps() });
        for r in 0..R {
            let av = _mm256_set1_ps(*a.add(r * k + p));
            for j in 0..nv {
                c[r][j] = _mm256_fmadd_ps(av, bv[j], c[r][j]);
            }
        }
    }
    for r in 0..R {
        for j in 0..nv {
            _mm256_storeu_ps(tile[r].as_mut_ptr().add(8 * j), c[r][j]);
        }
    }
}

#[inline]
unsafe fn kernel_plain<const R: usize, const W: usize>(k: usize, a: *const f32, b: *const f32, tile: &mut [[f32; NR]; MR]) {
    for r in 0..R {
        tile[r] = [0f32; NR];
    }
    for p in 0..k {
        let bv = std::slice::from_raw_parts(b.add(p * W), W);
        for r in 0..R {
            let av = *a.add(r * k + p);
            for (c, &b) in tile[r].iter_mut().zip(bv) {
                *c += av * b;
            }
        }
    }
}
