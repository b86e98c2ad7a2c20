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
