//! Inner products of a few query vectors with many stored rows: `out[i][j] = q_i · r_j`. The
//! exact-search hot loop of the knowledge base. Register tiles of up to 4 queries x 4 rows keep
//! 16 accumulators live, so each row chunk loaded from memory feeds 4 FMAs and each query chunk
//! 4. Rows are the outer loop: each row is read from memory once per batch of queries.
use crate::gemm::{isa, Isa};

/// `out[i * n + j] = queries[i] · rows[j]` for `nq` queries and `n = rows.len() / d` rows.
pub fn inner_products(queries: &[f32], nq: usize, rows: &[f32], d: usize, out: &mut [f32]) {
    inner_products_with_isa(queries, nq, rows, d, out, isa())
}

/// [`inner_products`] with a given instruction set, for tests: panics if the CPU lacks it.
#[doc(hidden)]
pub fn inner_products_with_isa(queries: &[f32], nq: usize, rows: &[f32], d: usize, out: &mut [f32], isa: Isa) {
    assert!(d > 0, "inner_products: d must be positive");
    assert_eq!(queries.len(), nq * d, "inner_products: queries is not [nq, d]");
    assert_eq!(rows.len() % d, 0, "inner_products: rows is not [n, d]");
    let n = rows.len() / d;
    assert_eq!(out.len(), nq * n, "inner_products: out is not [nq, n]");
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => {
            assert!(std::is_x86_feature_detected!("avx512f"), "this CPU cannot run AVX-512");
            // SAFETY: the CPU has AVX-512F; slices were checked to be [nq,d], [n,d], [nq,n].
            unsafe { x86::all_avx512(queries.as_ptr(), nq, rows.as_ptr(), n, d, out.as_mut_ptr()) }
        }
        _ => portable(queries, rows, d, out),
    }
}

fn portable(queries: &[f32], rows: &[f32], d: usize, out: &mut [f32]) {
    let n = rows.len() / d;
    for (i, q) in queries.chunks_exact(d).enumerate() {
        for (j, r) in rows.chunks_exact(d).enumerate() {
            out[i * n + j] = dot(q, r);
        }
    }
}

/// A dot product with 16 independent lanes, which the compiler turns into vector code.
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// All tiles: 4 x 4 in the body, narrower at the edges. Rows outside, queries inside: four
    /// rows (6 KiB at d = 384) stay in L1 while every query tile passes over them, so each row
    /// is read from memory once per batch however many queries it has.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn all_avx512(q: *const f32, nq: usize, r: *const f32, n: usize, d: usize, out: *mut f32) {
        let mut j = 0;
        while j < n {
            let rj = (n - j).min(4);
            let mut i = 0;
            while i < nq {
                let qi = (nq - i).min(4);
                let (qp, rp, op) = (q.add(i * d), r.add(j * d), out.add(i * n + j));
                match (qi, rj) {
                    (4, 4) => tile::<4, 4>(qp, rp, d, op, n),
                    (4, _) => edge::<4>(qp, rp, rj, d, op, n),
                    (3, 4) => tile::<3, 4>(qp, rp, d, op, n),
                    (3, _) => edge::<3>(qp, rp, rj, d, op, n),
                    (2, 4) => tile::<2, 4>(qp, rp, d, op, n),
                    (2, _) => edge::<2>(qp, rp, rj, d, op, n),
                    (_, 4) => tile::<1, 4>(qp, rp, d, op, n),
                    _ => edge::<1>(qp, rp, rj, d, op, n),
                }
                i += qi;
            }
            j += rj;
        }
    }

    #[target_feature(enable = "avx512f")]
    unsafe fn edge<const Q: usize>(q: *const f32, r: *const f32, rows: usize, d: usize, out: *mut f32, ldo: usize) {
        for j in 0..rows {
            tile::<Q, 1>(q, r.add(j * d), d, out.add(j), ldo);
        }
    }

    /// `out[i * ldo + j] = q_i · r_j` for a Q x R tile.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn tile<const Q: usize, const R: usize>(q: *const f32, r: *const f32, d: usize, out: *mut f32, ldo: usize) {
        let mut acc = [[_mm512_setzero_ps(); R]; Q];
        let full = d / 16 * 16;
        let mut k = 0;
        while k < full {
            let rv: [__m512; R] = std::array::from_fn(|j| _mm512_loadu_ps(r.add(j * d + k)));
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let qv = _mm512_loadu_ps(q.add(i * d + k));
                for j in 0..R {
                    acc_i[j] = _mm512_fmadd_ps(qv, rv[j], acc_i[j]);
                }
            }
            k += 16;
        }
        if k < d {
            let m: __mmask16 = ((1u32 << (d - k)) - 1) as __mmask16;
            let rv: [__m512; R] = std::array::from_fn(|j| _mm512_maskz_loadu_ps(m, r.add(j * d + k)));
            for (i, acc_i) in acc.iter_mut().enumerate() {
                let qv = _mm512_maskz_loadu_ps(m, q.add(i * d + k));
                for j in 0..R {
                    acc_i[j] = _mm512_fmadd_ps(qv, rv[j], acc_i[j]);
                }
            }
        }
        for (i, acc_i) in acc.iter().enumerate() {
            for (j, a) in acc_i.iter().enumerate() {
                *out.add(i * ldo + j) = _mm512_reduce_add_ps(*a);
            }
        }
    }
}
