//! Element-wise activations, written to vectorise: no libm calls in the erf path.

/// erf for f32 as a rational approximation on `[-4, 4]` (odd degree-13 numerator over even
/// degree-8 denominator, the one XLA and Eigen use); outside that range erf is +-1 in f32.
/// Absolute error below 1e-6 everywhere (the tests check it against libm).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = p * x2 + -2.101_024e-6;
    p = p * x2 + -5.692_506_4e-5;
    p = p * x2 + -7.349_906_3e-4;
    p = p * x2 + -2.954_600e-3;
    p = p * x2 + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = q * x2 + -1.682_827e-3;
    q = q * x2 + -7.373_329e-3;
    q = q * x2 + -1.426_474e-2;
    p / q
}

/// `x * (1 + erf(x / sqrt 2)) / 2`, in place.
#[inline(always)]
pub fn gelu_erf_slice(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        let v = *x;
        *x = 0.5 * v * (1.0 + erf(v * std::f32::consts::FRAC_1_SQRT_2));
    }
}

/// The tanh approximation of GELU (as candle's `gelu`), in place.
#[inline(always)]
pub fn gelu_tanh_slice(xs: &mut [f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    for x in xs.iter_mut() {
        let v = *x;
        *x = 0.5 * v * (1.0 + (C * (v + 0.044715 * v * v * v)).tanh());
    }
}

/// `e^x` for f32 without a libm call (so loops over it vectorise): `2^n * e^r` with
/// `r = x - n ln 2` (ln 2 split in two) and Cephes' degree-6 polynomial for `e^r`. Inputs
/// are clamped to `[-87.3, 88.7]`; relative error about 2 ulp.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.7);
    let n = (x * std::f32::consts::LOG2_E + 0.5).floor();
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    // n is in [-126, 128]: split 2^n in two factors so both are normal f32s.
    let n = n as i32;
    let h = n >> 1;
    let a = f32::from_bits(((h + 127) as u32) << 23);
    let b = f32::from_bits(((n - h + 127) as u32) << 23);
    y * a * b
}
