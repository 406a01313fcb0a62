//! The channels-last conv and pools against naive loops over NCHW (accumulated in f64).
//! Tolerance: max abs error within 1e-5 of the largest reference value (f32 sums of up to
//! ~600 products in a different order; measured errors are around 1e-7 relative).
use concierge_kernels::conv::{global_avg_pool, max_pool, Buffers, ConvSpec, Nhwc, PackedConv};
use concierge_kernels::gemm::Act;

const REL_TOL: f32 = 1e-5;

/// Deterministic values in [-1, 1).
fn values(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// NCHW `[n, c_out, oh, ow]` of `conv(x) + bias`, zero-padded.
fn conv_reference(x: &[f32], n: usize, h: usize, w: usize, s: &ConvSpec, weight: &[f32], bias: &[f32]) -> Vec<f32> {
    let (oh, ow) = s.out_hw(h, w);
    let mut out = vec![0f32; n * s.c_out * oh * ow];
    for b in 0..n {
        for co in 0..s.c_out {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = bias[co] as f64;
                    for ci in 0..s.c_in {
                        for ky in 0..s.kh {
                            for kx in 0..s.kw {
                                let iy = (oy * s.stride + ky) as isize - s.pad[0] as isize;
                                let ix = (ox * s.stride + kx) as isize - s.pad[2] as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                    continue;
                                }
                                let xv = x[((b * s.c_in + ci) * h + iy as usize) * w + ix as usize] as f64;
                                acc += xv * weight[((co * s.c_in + ci) * s.kh + ky) * s.kw + kx] as f64;
                            }
                        }
                    }
                    out[((b * s.c_out + co) * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
    }
    out
}

fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let diff = got.iter().zip(want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max);
    assert!(got.iter().all(|v| v.is_finite()), "non-finite output");
    diff / scale.max(1e-30)
}

#[test]
fn conv_matches_naive_reference() {
    // (batch, h, w, spec): 1x1 stride 1 and 2, 3x3 stride 1 and 2, the 7x7 stem with asymmetric
    // padding; channel counts off multiples of 16, and some past one 64-wide panel.
    let spec = |c_in, c_out, k, stride, pad| ConvSpec { c_in, c_out, kh: k, kw: k, stride, pad };
    let cases = [
        (2, 9, 7, spec(5, 19, 1, 1, [0; 4])),
        (3, 9, 11, spec(19, 70, 1, 2, [0; 4])),
        (2, 8, 8, spec(13, 21, 3, 1, [1; 4])),
        (2, 9, 10, spec(24, 33, 3, 2, [1; 4])),
        (2, 30, 30, spec(70, 40, 3, 1, [1; 4])), // several patch blocks
        (2, 17, 20, spec(3, 64, 7, 2, [2, 3, 1, 3])),
        (1, 4, 5, spec(7, 130, 3, 1, [0, 2, 2, 0])),
        (1, 1, 1, spec(9, 3, 1, 1, [0; 4])),
        (2, 5, 6, ConvSpec { c_in: 6, c_out: 10, kh: 1, kw: 3, stride: 1, pad: [0, 0, 1, 1] }),
    ];
    let mut bufs = Buffers::default();
    for (i, &(n, h, w, s)) in cases.iter().enumerate() {
        let x = values(n * s.c_in * h * w, i as u64);
        let weight = values(s.c_out * s.c_in * s.kh * s.kw, 100 + i as u64);
        let bias = values(s.c_out, 200 + i as u64);
        let conv = PackedConv::new(s, &weight, &bias);
        let want = conv_reference(&x, n, h, w, &s, &weight, &bias);
        let (oh, ow) = s.out_hw(h, w);
        let input = Nhwc::from_nchw(&x, n, s.c_in, h, w);
        let skip = Nhwc::from_nchw(&values(want.len(), 300 + i as u64), n, s.c_out, oh, ow);
        let skip_nchw = skip.to_nchw();
        let relu = |v: f32| v.max(0.0);

        let got = conv.forward(&input, Act::None, None, false, &mut bufs);
        assert_eq!((got.n, got.h, got.w, got.c), (n, oh, ow, s.c_out));
        let err = rel_err(&got.to_nchw(), &want);
        println!("{s:?} on {n}x{h}x{w}: {err:.1e}");
        assert!(err < REL_TOL, "{s:?} on {n}x{h}x{w}: {err}");
        bufs.give(got.data);

        // relu(conv + bias) + skip, and relu(conv + bias + skip).
        let got = conv.forward(&input, Act::Relu, Some(&skip), false, &mut bufs).to_nchw();
        let want_before: Vec<f32> = want.iter().zip(&skip_nchw).map(|(&y, &r)| relu(y) + r).collect();
        assert!(rel_err(&got, &want_before) < REL_TOL, "{s:?} act then residual");
        let got = conv.forward(&input, Act::Relu, Some(&skip), true, &mut bufs).to_nchw();
        let want_after: Vec<f32> = want.iter().zip(&skip_nchw).map(|(&y, &r)| relu(y + r)).collect();
        assert!(rel_err(&got, &want_after) < REL_TOL, "{s:?} residual then act");
    }
}

#[test]
fn layouts_round_trip() {
    let (n, c, h, w) = (2, 5, 3, 4);
    let x = values(n * c * h * w, 7);
    let t = Nhwc::from_nchw(&x, n, c, h, w);
    // Image 1, row 2, column 3, channel 4.
    let (b, y, xx, ch) = (1, 2, 3, 4);
    assert_eq!(t.data[((b * h + y) * w + xx) * c + ch], x[((b * c + ch) * h + y) * w + xx]);
    assert_eq!(t.to_nchw(), x);
}

#[test]
fn max_pool_pads_with_minus_infinity() {
    let mut bufs = Buffers::default();
    for (n, c, h, w, pad) in [(2, 19, 9, 9, [1; 4]), (1, 70, 8, 11, [0, 1, 0, 1]), (3, 3, 7, 6, [2, 0, 1, 2])] {
        // Negative values only, so a zero-padded pool would differ at the border.
        let x: Vec<f32> = values(n * c * h * w, 11).iter().map(|v| v - 2.0).collect();
        let got = max_pool(&Nhwc::from_nchw(&x, n, c, h, w), 3, 2, pad, &mut bufs);
        let (oh, ow) = ((h + pad[0] + pad[1] - 3) / 2 + 1, (w + pad[2] + pad[3] - 3) / 2 + 1);
        assert_eq!((got.h, got.w), (oh, ow));
        let mut want = vec![f32::NEG_INFINITY; n * c * oh * ow];
        for b in 0..n {
            for ch in 0..c {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let o = &mut want[((b * c + ch) * oh + oy) * ow + ox];
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let iy = (oy * 2 + ky) as isize - pad[0] as isize;
                                let ix = (ox * 2 + kx) as isize - pad[2] as isize;
                                if iy >= 0 && ix >= 0 && iy < h as isize && ix < w as isize {
                                    *o = o.max(x[((b * c + ch) * h + iy as usize) * w + ix as usize]);
                                }
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(got.to_nchw(), want, "pool {n}x{c}x{h}x{w} pad {pad:?}");
    }
}

#[test]
fn global_avg_pool_is_the_mean_per_channel() {
    let (n, c, h, w) = (3, 21, 7, 5);
    let x = values(n * c * h * w, 5);
    let got = global_avg_pool(&Nhwc::from_nchw(&x, n, c, h, w));
    let want: Vec<f32> =
        x.chunks_exact(h * w).map(|p| (p.iter().map(|&v| v as f64).sum::<f64>() / (h * w) as f64) as f32).collect();
    assert!(rel_err(&got, &want) < 1e-6);
}
