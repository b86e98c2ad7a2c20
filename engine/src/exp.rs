//! `exp` for `f32`, computed exactly as glibc's `expf` computes it on an
//! x86-64 CPU with FMA (`__expf_fma`, the algorithm glibc has had since
//! 2.28), eight at a time with AVX2.
//!
//! The attention's softmax used to call the C library's `expf` one value
//! at a time; this is the same function, bit for bit (a test compares it
//! with the C library over every non-positive `f32`, the softmax's
//! inputs), without a call per value and without depending on which C
//! library, or which of its variants, a machine picks.
//!
//! The algorithm: `x · 32/ln 2 = k + r` with `k` rounded to an integer by
//! adding `1.5 · 2^52` (one FMA, as `__expf_fma` fuses it), then `exp(x) =
//! 2^(k/32) · 2^(r/32)`, the first from a 32-entry table with `k / 32` added
//! to its exponent, the second a cubic in `r`; all in `f64`, rounded once to
//! `f32` at the end. Arguments at or beyond ±88 take the C library's special
//! cases (overflow, underflow, `-inf`, NaN).

/// `32 / ln 2`.
const INV_LN2_N: f64 = f64::from_bits(0x4047_1547_652b_82fe);
/// `1.5 · 2^52`: adding it rounds to an integer in the low bits.
const SHIFT: f64 = f64::from_bits(0x4338_0000_0000_0000);
/// The cubic's coefficients, for `r` scaled by 32.
const C0: f64 = f64::from_bits(0x3ebc_6af8_4b91_2394);
const C1: f64 = f64::from_bits(0x3f2e_bfce_50fa_c4f3);
const C2: f64 = f64::from_bits(0x3f96_2e42_ff0c_52d6);

/// `bits(2^(i/32)) - (i << 47)`, so that adding `k << 47` gives
/// `2^(k/32)`.
static T: [u64; 32] = [
    0x3ff0000000000000,
    0x3fefd9b0d3158574,
    0x3fefb5586cf9890f,
    0x3fef9301d0125b51,
    0x3fef72b83c7d517b,
    0x3fef54873168b9aa,
    0x3fef387a6e756238,
    0x3fef1e9df51fdee1,
    0x3fef06fe0a31b715,
    0x3feef1a7373aa9cb,
    0x3feedea64c123422,
    0x3feece086061892d,
    0x3feebfdad5362a27,
    0x3feeb42b569d4f82,
    0x3feeab07dd485429,
    0x3feea47eb03a5585,
    0x3feea09e667f3bcd,
    0x3fee9f75e8ec5f74,
    0x3feea11473eb0187,
    0x3feea589994cce13,
    0x3feeace5422aa0db,
    0x3feeb737b0cdc5e5,
    0x3feec49182a3f090,
    0x3feed503b23e255d,
    0x3feee89f995ad3ad,
    0x3feeff76f2fb5e47,
    0x3fef199bdd85529c,
    0x3fef3720dcef9069,
    0x3fef5818dcfba487,
    0x3fef7c97337b9b5f,
    0x3fefa4afa2a490da,
    0x3fefd0765b6e4540,
];

/// The top 12 bits of `|x|` from which the special cases start (`|x| ≥
/// 88`).
const SPECIAL_TOP: u32 = 0x42b;

/// `e^x`, bit for bit glibc's `__expf_fma`.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    if (x.to_bits() >> 20) & 0x7ff >= SPECIAL_TOP {
        special(x)
    } else {
        core(x)
    }
}

/// The main path (`|x| < 88`, and the part of the special range that
/// takes it).
#[inline(always)]
fn core(x: f32) -> f32 {
    let xd = f64::from(x);
    let z = INV_LN2_N.mul_add(xd, SHIFT);
    let ki = z.to_bits();
    let kd = z - SHIFT;
    let r = INV_LN2_N.mul_add(xd, -kd);
    let s = f64::from_bits(T[(ki % 32) as usize].wrapping_add(ki << 47));
    let z = r.mul_add(C0, C1);
    let r2 = r * r;
    let y = r.mul_add(C2, 1.0);
    let y = z.mul_add(r2, y);
    (y * s) as f32
}

/// `|x| ≥ 88`, infinities and NaN, as the C library answers them.
#[cold]
fn special(x: f32) -> f32 {
    if x == f32::NEG_INFINITY {
        0.0
    } else if (x.to_bits() >> 20) & 0x7ff >= 0x7f8 {
        x + x
    } else if x > f32::from_bits(0x42b1_7217) {
        // Overflow: 2^97 · 2^97.
        f32::INFINITY
    } else if x < f32::from_bits(0xc2cf_f1b4) {
        // Underflow: 2^-95 · 2^-95.
        0.0
    } else if x < f32::from_bits(0xc2ce_8ecf) {
        // May underflow: 1.25·2^-75 squared, the least subnormal.
        f32::from_bits(1)
    } else {
        core(x)
    }
}

/// `xs[i] = exp(xs[i] - sub)`, eight at a time where the CPU has AVX2 and
/// FMA (the same values either way).
#[inline(always)]
pub(crate) fn exp_sub(xs: &mut [f32], sub: f32) {
    #[cfg(target_arch = "x86_64")]
    let done = if crate::simd::avx2_fma() {
        // SAFETY: `avx2::exp_sub` needs AVX2 and FMA, which `avx2_fma`
        // confirmed.
        unsafe { avx2::exp_sub(xs, sub) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for x in &mut xs[done..] {
        *x = exp(*x - sub);
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{C0, C1, C2, INV_LN2_N, SHIFT, SPECIAL_TOP, T};
    use std::arch::x86_64::*;

    /// [`super::exp_sub`] on the whole groups of eight; returns how many
    /// values it did.
    #[target_feature(enable = "avx2,fma")]
    pub(super) fn exp_sub(xs: &mut [f32], sub: f32) -> usize {
        let sub = _mm256_set1_ps(sub);
        for c in xs.chunks_exact_mut(8) {
            // SAFETY: `c` is 8 readable `f32`s; the load is unaligned.
            let x = _mm256_sub_ps(unsafe { _mm256_loadu_ps(c.as_ptr()) }, sub);
            // The special cases, one by one (rare: arguments at or below
            // -88), else all eight at once.
            let top = _mm256_and_si256(
                _mm256_srli_epi32::<20>(_mm256_castps_si256(x)),
                _mm256_set1_epi32(0x7ff),
            );
            let special = _mm256_cmpgt_epi32(top, _mm256_set1_epi32(SPECIAL_TOP as i32 - 1));
            let mut lanes = _mm256_movemask_ps(_mm256_castsi256_ps(special));
            // SAFETY: `c` is 8 writable `f32`s; the store is unaligned.
            unsafe { _mm256_storeu_ps(c.as_mut_ptr(), exp8(x)) };
            if lanes != 0 {
                let mut args = [0.0f32; 8];
                // SAFETY: `args` is 8 writable `f32`s; the store is
                // unaligned.
                unsafe { _mm256_storeu_ps(args.as_mut_ptr(), x) };
                while lanes != 0 {
                    let i = lanes.trailing_zeros() as usize;
                    c[i] = super::special(args[i]);
                    lanes &= lanes - 1;
                }
            }
        }
        xs.len() / 8 * 8
    }

    /// `super::core` on eight lanes, as two halves of four `f64`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        let lo = core4(_mm256_cvtps_pd(_mm256_castps256_ps128(x)));
        let hi = core4(_mm256_cvtps_pd(_mm256_extractf128_ps::<1>(x)));
        _mm256_set_m128(hi, lo)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn core4(xd: __m256d) -> __m128 {
        let inv = _mm256_set1_pd(INV_LN2_N);
        let shift = _mm256_set1_pd(SHIFT);
        let z = _mm256_fmadd_pd(inv, xd, shift);
        let ki = _mm256_castpd_si256(z);
        let kd = _mm256_sub_pd(z, shift);
        let r = _mm256_fmsub_pd(inv, xd, kd);
        let idx = _mm256_and_si256(ki, _mm256_set1_epi64x(31));
        // SAFETY: every index is in 0..32, and `T` has 32 entries of 8 bytes.
        let t = unsafe { _mm256_i64gather_epi64::<8>(T.as_ptr().cast(), idx) };
        let s = _mm256_castsi256_pd(_mm256_add_epi64(t, _mm256_slli_epi64::<47>(ki)));
        let z = _mm256_fmadd_pd(r, _mm256_set1_pd(C0), _mm256_set1_pd(C1));
        let r2 = _mm256_mul_pd(r, r);
        let y = _mm256_fmadd_pd(r, _mm256_set1_pd(C2), _mm256_set1_pd(1.0));
        let y = _mm256_fmadd_pd(z, r2, y);
        _mm256_cvtpd_ps(_mm256_mul_pd(y, s))
    }
}

#[cfg(test)]
// The C library to compare with: glibc on x86-64.
#[cfg(all(target_arch = "x86_64", target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    fn same(a: f32, b: f32) -> bool {
        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
    }

    /// The scalar and the AVX2 paths against the C library's `expf` (glibc
    /// on x86-64 with FMA, which the engine called before) on every
    /// `step`-th non-positive `f32` (the softmax's arguments), every
    /// `8 × step`-th positive one, and the special values.
    fn against_glibc(step: usize) {
        if !crate::simd::avx2_fma() {
            eprintln!("SKIPPED: glibc picks its FMA-free expf on this CPU");
            return;
        }
        let mut batch = Vec::with_capacity(1 << 16);
        let check = |batch: &mut Vec<f32>| {
            let mut fast = batch.clone();
            exp_sub(&mut fast, 0.0);
            for (&x, &y) in batch.iter().zip(&fast) {
                let want = x.exp();
                assert!(same(exp(x), want), "{x:e} ({:#x}): scalar", x.to_bits());
                assert!(same(y, want), "{x:e} ({:#x}): AVX2", x.to_bits());
            }
            batch.clear();
        };
        let negatives = (0x8000_0000u32..=0xff80_0000)
            .step_by(step)
            .map(f32::from_bits);
        let positives = (0..0x7f80_0000u32).step_by(8 * step).map(f32::from_bits);
        let specials = [
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -f32::NAN,
            0.0,
            -0.0,
            -87.9,
            -88.0,
            -103.0,
            -103.5,
            -104.0,
            88.5,
            89.0,
        ];
        for x in negatives.chain(positives).chain(specials) {
            batch.push(x);
            if batch.len() == batch.capacity() {
                check(&mut batch);
            }
        }
        check(&mut batch);
    }

    #[test]
    fn equals_glibcs_expf_bit_for_bit() {
        against_glibc(61);
    }

    /// Every non-positive `f32` (about a minute).
    #[test]
    #[ignore = "exhaustive"]
    fn equals_glibcs_expf_bit_for_bit_exhaustively() {
        against_glibc(1);
    }
}
