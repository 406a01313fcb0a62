//! Channels-last (NHWC) f32 convolution as a GEMM on `crate::gemm`: `out[b*oh*ow, c_out] =
//! patches @ W^T`, with bias, activation and residual fused into the write-out. The weights are
//! packed once at load, from PyTorch's `[c_out, c_in, kh, kw]` into `[kh*kw*c_in, c_out]`, the
//! order of the patches built here (for each output pixel: `ky`, then `kx`, then the channel).
//! Also the pools around a ResNet's convs: max-pool with -inf padding and global average pool.
//!
//! A 1x1 stride-1 unpadded conv needs no patches: the activation `[n*h*w, c]` is the GEMM's A.
//! Any other conv gathers its patches (zero padding, a strided 1x1 included) in blocks of rows
//! of about `PATCH_BLOCK_BYTES`, each followed by its GEMM, so memory stays bounded whatever
//! the batch and the block stays in cache for its product.
use rayon::prelude::*;

use crate::gemm::{gemm, Act, Epilogue, PackedB};

/// Bytes of patches gathered per GEMM call.
const PATCH_BLOCK_BYTES: usize = 1 << 20;

/// An f32 activation, channels last: `data[((b * h + y) * w + x) * c + ch]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Nhwc {
    pub n: usize,
    pub h: usize,
    pub w: usize,
    pub c: usize,
    pub data: Vec<f32>,
}

impl Nhwc {
    pub fn new(n: usize, h: usize, w: usize, c: usize, data: Vec<f32>) -> Self {
        assert_eq!(data.len(), n * h * w * c, "Nhwc: data is not [{n}, {h}, {w}, {c}]");
        Self { n, h, w, c, data }
    }

    /// From an NCHW `[n, c, h, w]` array.
    pub fn from_nchw(x: &[f32], n: usize, c: usize, h: usize, w: usize) -> Self {
        assert_eq!(x.len(), n * c * h * w, "from_nchw: x is not [{n}, {c}, {h}, {w}]");
        let mut data = vec![0f32; x.len()];
        let plane = h * w;
        if plane > 0 && c > 0 {
            data.par_chunks_mut(w * c).enumerate().for_each(|(row, dst)| {
                let (b, y) = (row / h, row % h);
                for ch in 0..c {
                    let src = &x[(b * c + ch) * plane + y * w..][..w];
                    for (xx, &v) in src.iter().enumerate() {
                        dst[xx * c + ch] = v;
                    }
                }
            });
        }
        Self { n, h, w, c, data }
    }

    /// The NCHW `[n, c, h, w]` copy.
    pub fn to_nchw(&self) -> Vec<f32> {
        let (h, w, c) = (self.h, self.w, self.c);
        let plane = h * w;
        let mut out = vec![0f32; self.data.len()];
        if plane > 0 && c > 0 {
            out.par_chunks_mut(plane).enumerate().for_each(|(bc, dst)| {
                let (b, ch) = (bc / c, bc % c);
                let src = &self.data[b * plane * c..][..plane * c];
                for (p, d) in dst.iter_mut().enumerate() {
                    *d = src[p * c + ch];
                }
            });
        }
        out
    }

    /// Pixels over the batch: the GEMM's rows.
    pub fn pixels(&self) -> usize {
        self.n * self.h * self.w
    }
}

/// Recycled f32 buffers for one forward pass: a network's activations are a handful of sizes,
/// and fresh multi-megabyte allocations cost a page fault per 4 KiB every layer.
#[derive(Default)]
pub struct Buffers(Vec<Vec<f32>>);

impl Buffers {
    /// A buffer of `len` values (their contents are left over from earlier use: write before
    /// reading).
    pub fn take(&mut self, len: usize) -> Vec<f32> {
        // The smallest free buffer that fits, else the largest (grown).
        let fit = (0..self.0.len()).filter(|&i| self.0[i].capacity() >= len).min_by_key(|&i| self.0[i].capacity());
        let pick = fit.or_else(|| (0..self.0.len()).max_by_key(|&i| self.0[i].capacity()));
        match pick.map(|i| self.0.swap_remove(i)) {
            Some(mut v) if v.capacity() >= len => {
                v.resize(len, 0.0);
                v
            }
            // Too small: a fresh (zeroed by the OS, not copied) one instead of growing it.
            _ => vec![0f32; len],
        }
    }

    pub fn give(&mut self, v: Vec<f32>) {
        if v.capacity() > 0 {
            self.0.push(v);
        }
    }
}

/// A convolution's shape: channels, kernel, stride and zero padding `[top, bottom, left, right]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvSpec {
    pub c_in: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub pad: [usize; 4],
}

impl ConvSpec {
    /// Output height and width for an `h x w` input (a window must fit the padded input).
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        window_out(h, w, self.kh, self.kw, self.stride, self.pad)
    }

    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == [0; 4]
    }
}

fn window_out(h: usize, w: usize, kh: usize, kw: usize, stride: usize, [t, b, l, r]: [usize; 4]) -> (usize, usize) {
    assert!(stride > 0 && kh > 0 && kw > 0, "window {kh}x{kw} stride {stride}");
    let (ph, pw) = (h + t + b, w + l + r);
    assert!(ph >= kh && pw >= kw, "a {kh}x{kw} window does not fit a {h}x{w} input padded {:?}", [t, b, l, r]);
    ((ph - kh) / stride + 1, (pw - kw) / stride + 1)
}

/// A convolution with its weights packed for the GEMM and its bias (batch-norm folded in by
/// the caller).
pub struct PackedConv {
    spec: ConvSpec,
    w: PackedB,
    bias: Vec<f32>,
}

impl std::fmt::Debug for PackedConv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedConv").field("spec", &self.spec).finish_non_exhaustive()
    }
}

impl PackedConv {
    /// `weight`: PyTorch's `[c_out, c_in, kh, kw]`, row-major; `bias`: `[c_out]`.
    pub fn new(spec: ConvSpec, weight: &[f32], bias: &[f32]) -> Self {
        let ConvSpec { c_in, c_out, kh, kw, .. } = spec;
        assert_eq!(weight.len(), c_out * c_in * kh * kw, "PackedConv: weight is not [{c_out}, {c_in}, {kh}, {kw}]");
        assert_eq!(bias.len(), c_out, "PackedConv: bias is not [{c_out}]");
        let k = kh * kw * c_in;
        // B[(ky * kw + kx) * c_in + ci][co] = weight[co][ci][ky][kx]
        let mut b = vec![0f32; k * c_out];
        for co in 0..c_out {
            for ci in 0..c_in {
                for ky in 0..kh {
                    for kx in 0..kw {
                        b[((ky * kw + kx) * c_in + ci) * c_out + co] = weight[((co * c_in + ci) * kh + ky) * kw + kx];
                    }
                }
            }
        }
        Self { spec, w: PackedB::pack(&b, k, c_out), bias: bias.to_vec() }
    }

    pub fn spec(&self) -> &ConvSpec {
        &self.spec
    }

    /// `act(conv(x) + bias) + residual`, or `act(conv(x) + bias + residual)` when
    /// `act_after_residual`; `residual` is `[n, oh, ow, c_out]`. The result's buffer (and the
    /// patch scratch) come from `bufs`.
    pub fn forward(
        &self,
        x: &Nhwc,
        act: Act,
        residual: Option<&Nhwc>,
        act_after_residual: bool,
        bufs: &mut Buffers,
    ) -> Nhwc {
        let s = &self.spec;
        assert_eq!(x.c, s.c_in, "conv: input has {} channels, weights expect {}", x.c, s.c_in);
        let (oh, ow) = s.out_hw(x.h, x.w);
        let (m, n) = (x.n * oh * ow, s.c_out);
        if let Some(r) = residual {
            assert_eq!((r.n, r.h, r.w, r.c), (x.n, oh, ow, n), "conv: residual is not the output's shape");
        }
        let mut out = bufs.take(m * n);
        let epi = |r0: usize, r1: usize| Epilogue {
            bias: Some(&self.bias),
            act,
            residual: residual.map(|r| &r.data[r0 * n..r1 * n]),
            act_after_residual,
        };
        if m == 0 || n == 0 {
            return Nhwc { n: x.n, h: oh, w: ow, c: n, data: out };
        }
        if s.pointwise() {
            gemm(&x.data, m, &self.w, &epi(0, m), &mut out);
        } else {
            let k = s.kh * s.kw * s.c_in;
            let block = (PATCH_BLOCK_BYTES / (4 * k)).max(96).min(m);
            let mut a = bufs.take(block * k);
            for r0 in (0..m).step_by(block) {
                let r1 = (r0 + block).min(m);
                let a = &mut a[..(r1 - r0) * k];
                im2col(x, s, oh, ow, r0, a);
                gemm(a, r1 - r0, &self.w, &epi(r0, r1), &mut out[r0 * n..r1 * n]);
            }
            bufs.give(a);
        }
        Nhwc { n: x.n, h: oh, w: ow, c: n, data: out }
    }
}

/// Patches of output pixels `r0..r0 + a.len() / k` (pixels numbered over the batch), one row
/// of `k = kh * kw * c_in` each, zeros where the window leaves the input.
fn im2col(x: &Nhwc, s: &ConvSpec, oh: usize, ow: usize, r0: usize, a: &mut [f32]) {
    let k = s.kh * s.kw * s.c_in;
    let rows = a.len() / k;
    let threads = rayon::current_num_threads().max(1);
    let chunk = rows.div_ceil(4 * threads).max(16);
    let (h, w, c) = (x.h as isize, x.w as isize, x.c);
    let span = s.kw * c;
    a.par_chunks_mut(chunk * k).enumerate().for_each(|(ci, block)| {
        for (j, row) in block.chunks_exact_mut(k).enumerate() {
            let r = r0 + ci * chunk + j;
            let (b, p) = (r / (oh * ow), r % (oh * ow));
            let (oy, ox) = (p / ow, p % ow);
            let iy0 = (oy * s.stride) as isize - s.pad[0] as isize;
            let ix0 = (ox * s.stride) as isize - s.pad[2] as isize;
            // Columns of the window inside the input: kx0..kx1 (the same for every ky).
            let kx0 = (-ix0).clamp(0, s.kw as isize) as usize;
            let kx1 = (w - ix0).clamp(kx0 as isize, s.kw as isize) as usize;
            for ky in 0..s.kh {
                let dst = &mut row[ky * span..(ky + 1) * span];
                let iy = iy0 + ky as isize;
                if iy < 0 || iy >= h || kx0 == kx1 {
                    dst.fill(0.0);
                    continue;
                }
                dst[..kx0 * c].fill(0.0);
                dst[kx1 * c..].fill(0.0);
                let src = ((b * x.h + iy as usize) * x.w + (ix0 + kx0 as isize) as usize) * c;
                dst[kx0 * c..kx1 * c].copy_from_slice(&x.data[src..src + (kx1 - kx0) * c]);
            }
        }
    });
}

/// `k x k` max-pool with stride `stride` over the input padded with -inf by `pad` `[top,
/// bottom, left, right]` (so padding never wins), as TensorFlow's and Caffe's asymmetric pools.
pub fn max_pool(x: &Nhwc, k: usize, stride: usize, pad: [usize; 4], bufs: &mut Buffers) -> Nhwc {
    let (oh, ow) = window_out(x.h, x.w, k, k, stride, pad);
    let c = x.c;
    let mut out = bufs.take(x.n * oh * ow * c);
    if !out.is_empty() {
        let (h, w) = (x.h as isize, x.w as isize);
        out.par_chunks_mut(ow * c).enumerate().for_each(|(row, dst)| {
            let (b, oy) = (row / oh, row % oh);
            let iy0 = (oy * stride) as isize - pad[0] as isize;
            dst.fill(f32::NEG_INFINITY);
            for ox in 0..ow {
                let d = &mut dst[ox * c..(ox + 1) * c];
                let ix0 = (ox * stride) as isize - pad[2] as isize;
                for iy in (iy0..iy0 + k as isize).filter(|&y| y >= 0 && y < h) {
                    for ix in (ix0..ix0 + k as isize).filter(|&xx| xx >= 0 && xx < w) {
                        let src = &x.data[((b * x.h + iy as usize) * x.w + ix as usize) * c..][..c];
                        for (o, &v) in d.iter_mut().zip(src) {
                            *o = o.max(v);
                        }
                    }
                }
            }
        });
    }
    Nhwc { n: x.n, h: oh, w: ow, c, data: out }
}

/// The mean over every pixel of each image: `[n, c]`.
pub fn global_avg_pool(x: &Nhwc) -> Vec<f32> {
    let (plane, c) = (x.h * x.w, x.c);
    let mut out = vec![0f32; x.n * c];
    if plane == 0 || c == 0 {
        return out;
    }
    out.par_chunks_mut(c).enumerate().for_each(|(b, dst)| {
        for px in x.data[b * plane * c..(b + 1) * plane * c].chunks_exact(c) {
            for (o, &v) in dst.iter_mut().zip(px) {
                *o += v;
            }
        }
        let inv = 1.0 / plane as f32;
        dst.iter_mut().for_each(|o| *o *= inv);
    });
    out
}
