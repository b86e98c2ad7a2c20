//! Choosing the instruction set for the hot loops, once per process.
//!
//! Most kernels are written once, in plain Rust with `f32::mul_add`, as
//! `#[inline(always)]` functions, and each entry point compiles them twice:
//! as is, and inlined into a `#[target_feature(enable = "avx2,fma")]`
//! function (where LLVM vectorizes them), picked by [`avx2_fma`]. Both
//! compute the same FMAs in the same order (`mul_add` is an exact fused
//! multiply-add either way), so results never depend on which one ran:
//! only speed does. The quantized matmul (its AVX2 and AVX-512 VNNI
//! kernels: see [`avx512_vnni`]) and `exp` are written more than once
//! instead, as intrinsics and as a scalar reference, with the same
//! operations per value (and exact integer sums); tests hold them to the
//! same bits.

use std::sync::OnceLock;

/// Whether this CPU has AVX2 and FMA (checked once).
pub(crate) fn avx2_fma() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether this CPU has AVX-512F, BW and VNNI beside AVX2, FMA and F16C
/// (the quantized matmul's kernel and its activation quantizer), checked
/// once.
pub(crate) fn avx512_vnni() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            avx2_fma()
                && std::arch::is_x86_feature_detected!("f16c")
                && std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Asks the cache for the lines of `len` bytes from `p` (a hint for what
/// a loop reads next, where the hardware's prefetcher would wait for a few
/// misses first). A prefetch never faults and changes no value, so `p`
/// need not point into anything, and the results never depend on it.
#[inline(always)]
pub(crate) fn prefetch(p: *const u8, len: usize) {
    #[cfg(target_arch = "x86_64")]
    for line in (0..len).step_by(64) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: every x86-64 CPU has SSE, and a prefetch reads nothing
        // the program sees and never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, len);
}
