//! Quantized weights kept as the file stores them (Q4_1, Q8_0), repacked in
//! [`matmul`](crate::matmul)'s panels and dequantized inside the kernel to
//! exactly the `f32` values that candle's dequantizer gives.
//!
//! # Exactness
//!
//! candle dequantizes a Q4_1 block (`f16` scale `d`, `f16` minimum `m`,
//! 32 nibbles `q`) as `q as f32 * d + m` (a multiply, then an add), and a
//! Q8_0 block (`f16` scale `d`, 32 `i8` values `q`) as `q as f32 * d`. The
//! product `q × d` is exact in `f32` in both (`q` has at most 8 significant
//! bits, an `f16` at most 11, and an `f16`'s exponent range is far inside
//! `f32`'s), so the only rounding is the add, and a fused multiply-add
//! `fma(q, d, m)` rounds the same exact sum once: the same bits, zeros'
//! signs included. `f16 → f32` is exact whoever converts it (F16C or
//! [`f16_to_f32`]). So every weight the kernels use is bit for bit the
//! weight of the F32 path, and the FMA chains over it are the same chains:
//! the outputs are bit-identical to multiplying by the dequantized F32
//! matrix, whatever `m`, whichever path (tests below check both on random
//! blocks, and `model`'s tests on every weight of the real model).
//!
//! # Layout
//!
//! One [`Q41`] or [`Q80`] holds a panel's 32 values of `k` for its
//! [`PANEL`] output columns: one GGUF block per column, regrouped so that a
//! `k` step's 16 column values come out of two 256-bit registers with a
//! shift and a mask (Q4_1) or one sign extension (Q8_0). A packed matrix is
//! panels of `k / 32` such blocks. Bytes streamed per weight: 0.625 (Q4_1)
//! and 1.0625 (Q8_0), against 4 for F32.

use crate::matmul::PANEL;

/// Values of `k` per quantized block.
pub(crate) const QK: usize = 32;

/// Q4_1 weights of one panel for 32 values of `k`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Q41 {
    /// Column `j`'s scale, `f16` bits.
    d: [u16; PANEL],
    /// Column `j`'s minimum, `f16` bits.
    m: [u16; PANEL],
    /// `q[w][j]` holds column `j`'s nibbles for `k = 8w .. 8w + 8`, the
    /// one for `8w + s` in bits `4s .. 4s + 4`.
    q: [[u32; PANEL]; 4],
}

/// Q8_0 weights of one panel for 32 values of `k`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Q80 {
    /// Column `j`'s scale, `f16` bits.
    d: [u16; PANEL],
    /// `q[kk][j]`: column `j` at `k = kk`.
    q: [[i8; PANEL]; QK],
}

/// A quantized panel block: how to build it from the file's blocks and how
/// to dequantize it (the scalar reference; the AVX2 kernels compute the
/// same values).
pub(crate) trait QBlock: Copy + Send + Sync + 'static {
    /// Bytes of one GGUF block (32 values of one row).
    const GGUF_BYTES: usize;
    /// The panel block from one GGUF block per output column.
    fn from_gguf(blocks: [&[u8]; PANEL]) -> Self;
    /// Column `j`'s value at `k = kk`, as candle dequantizes it.
    fn value(&self, kk: usize, j: usize) -> f32;
    /// All 32 × 16 values, `out[kk * PANEL + j]`.
    fn dequant(&self, out: &mut [f32]) {
        for (kk, row) in out[..QK * PANEL].chunks_exact_mut(PANEL).enumerate() {
            for (j, o) in row.iter_mut().enumerate() {
                *o = self.value(kk, j);
            }
        }
    }
}

fn f16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl QBlock for Q41 {
    const GGUF_BYTES: usize = 20;

    fn from_gguf(blocks: [&[u8]; PANEL]) -> Self {
        let mut out = Q41 {
            d: [0; PANEL],
            m: [0; PANEL],
            q: [[0; PANEL]; 4],
        };
        for (j, b) in blocks.iter().enumerate() {
            // GGUF: d, m, then byte i holds value i (low nibble) and value
            // i + 16 (high nibble).
            out.d[j] = f16_at(b, 0);
            out.m[j] = f16_at(b, 2);
            for kk in 0..QK {
                let byte = b[4 + kk % 16];
                let q = if kk < 16 { byte & 0x0F } else { byte >> 4 };
                out.q[kk / 8][j] |= u32::from(q) << (4 * (kk % 8));
            }
        }
        out
    }

    #[inline(always)]
    fn value(&self, kk: usize, j: usize) -> f32 {
        let q = (self.q[kk / 8][j] >> (4 * (kk % 8))) & 0x0F;
        // candle's `(x0 as f32) * d + m`, unfused.
        (q as f32) * f16_to_f32(self.d[j]) + f16_to_f32(self.m[j])
    }
}

impl QBlock for Q80 {
    const GGUF_BYTES: usize = 34;

    fn from_gguf(blocks: [&[u8]; PANEL]) -> Self {
        let mut out = Q80 {
            d: [0; PANEL],
            q: [[0; PANEL]; QK],
        };
        for (j, b) in blocks.iter().enumerate() {
            out.d[j] = f16_at(b, 0);
            for kk in 0..QK {
                out.q[kk][j] = b[2 + kk] as i8;
            }
        }
        out
    }

    #[inline(always)]
    fn value(&self, kk: usize, j: usize) -> f32 {
        f32::from(self.q[kk][j]) * f16_to_f32(self.d[j])
    }
}

/// Packs a row-major `n × k` matrix of GGUF blocks (`n` rows of `k / 32`
/// blocks of `B::GGUF_BYTES`) into panels of `B`.
pub(crate) fn pack<B: QBlock>(raw: &[u8], n: usize, k: usize) -> Vec<B> {
    assert_eq!(k % QK, 0, "{k} is not whole blocks of {QK}");
    assert_eq!(n % PANEL, 0, "{n} output columns are not whole panels");
    let per_row = k / QK;
    assert_eq!(raw.len(), n * per_row * B::GGUF_BYTES, "{n}x{k} blocks");
    let mut out = Vec::with_capacity(n / PANEL * per_row);
    for p in 0..n / PANEL {
        for b in 0..per_row {
            let blocks: [&[u8]; PANEL] = std::array::from_fn(|j| {
                &raw[((p * PANEL + j) * per_row + b) * B::GGUF_BYTES..][..B::GGUF_BYTES]
            });
            out.push(B::from_gguf(blocks));
        }
    }
    out
}

/// An IEEE half's bits as `f32` (exact: every `f16` is an `f32`).
#[inline(always)]
pub(crate) fn f16_to_f32(h: u16) -> f32 {
    let sign = u32::from(h & 0x8000) << 16;
    let exp = u32::from(h >> 10) & 0x1F;
    let man = u32::from(h & 0x3FF);
    let bits = match exp {
        0 if man == 0 => sign,
        0 => {
            // Subnormal: man × 2^-24, normal in f32.
            let v = man as f32 * (1.0 / 16_777_216.0);
            return if sign != 0 { -v } else { v };
        }
        0x1F => sign | 0x7F80_0000 | (man << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
    };
    f32::from_bits(bits)
}

/// What the matmul needs of a block format: on x86-64, its AVX2 and
/// AVX-512 kernels too.
#[cfg(target_arch = "x86_64")]
pub(crate) trait Kernel: avx2::Steps + avx512::Steps {}
#[cfg(target_arch = "x86_64")]
impl<T: avx2::Steps + avx512::Steps> Kernel for T {}
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait Kernel: QBlock {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: QBlock> Kernel for T {}

/// The AVX2 + FMA + F16C kernels. Every function here carries those target
/// features; callers check them with `simd::avx2_fma_f16c` first.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{Q41, Q80, QK};
    use crate::matmul::PANEL;
    use std::arch::x86_64::*;

    /// Eight `u32`s.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load_u32(a: &[u32; PANEL], half: usize) -> __m256i {
        let a = &a[half * 8..][..8];
        // SAFETY: `a` is 8 readable `u32`s (32 bytes); the load is unaligned.
        unsafe { _mm256_loadu_si256(a.as_ptr().cast()) }
    }

    /// Eight `f16` bits as `f32`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load_f16(a: &[u16; PANEL], half: usize) -> __m256 {
        let a = &a[half * 8..][..8];
        // SAFETY: `a` is 8 readable `u16`s (16 bytes); the load is unaligned.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(a.as_ptr().cast()) })
    }

    /// Eight `i8`s as `f32`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load_i8(a: &[i8; PANEL], half: usize) -> __m256 {
        let a = &a[half * 8..][..8];
        // SAFETY: `a` is 8 readable bytes; `_mm_loadl_epi64` reads exactly 8,
        // unaligned.
        let q = unsafe { _mm_loadl_epi64(a.as_ptr().cast()) };
        _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load(x: &[f32]) -> __m256 {
        let x = &x[..8];
        // SAFETY: `x` is 8 readable `f32`s; the load is unaligned.
        unsafe { _mm256_loadu_ps(x.as_ptr()) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn store(out: &mut [f32], v: __m256) {
        let out = &mut out[..8];
        // SAFETY: `out` is 8 writable `f32`s; the store is unaligned.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) }
    }

    /// A block's 32 `k` steps: `GROUPS` groups of `STEPS` steps, each
    /// step's 16 column values in two registers, one per half of the panel
    /// (columns `8h .. 8h + 8`), which the kernels may take together or one
    /// at a time.
    pub(crate) trait Steps: super::QBlock {
        /// The block's scales (and minimums) as `f32`, kept in L1 rather
        /// than in registers: the FMAs read them as memory operands.
        type Scales: Copy;
        /// One group's quantized values for one half, in a register.
        type Group: Copy;
        const GROUPS: usize;
        const STEPS: usize;
        /// # Safety
        /// The CPU must have AVX2, FMA and F16C.
        unsafe fn scales(&self) -> Self::Scales;
        /// # Safety
        /// As for [`Steps::scales`].
        unsafe fn group(&self, g: usize, h: usize) -> Self::Group;
        /// Half `h`'s values at `k = g × STEPS + s` of the block; called for
        /// `s` in order (it may consume `grp`, half `h`'s group, as it goes).
        ///
        /// # Safety
        /// As for [`Steps::scales`].
        unsafe fn step(
            &self,
            sc: &Self::Scales,
            grp: &mut Self::Group,
            g: usize,
            s: usize,
            h: usize,
        ) -> __m256;
    }

    impl Steps for Q41 {
        /// `[d, m]`.
        type Scales = [[f32; PANEL]; 2];
        /// `q[g]`'s 8 columns of the half.
        type Group = __m256i;
        const GROUPS: usize = 4;
        const STEPS: usize = 8;

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn scales(&self) -> Self::Scales {
            let mut sc = [[0.0; PANEL]; 2];
            for (o, v) in sc.iter_mut().zip([&self.d, &self.m]) {
                store(&mut o[..8], load_f16(v, 0));
                store(&mut o[8..], load_f16(v, 1));
            }
            sc
        }

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn group(&self, g: usize, h: usize) -> Self::Group {
            load_u32(&self.q[g], h)
        }

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn step(
            &self,
            [d, m]: &Self::Scales,
            grp: &mut Self::Group,
            _: usize,
            _: usize,
            h: usize,
        ) -> __m256 {
            // The low nibble is this step's; shift the next one down.
            let q = _mm256_and_si256(*grp, _mm256_set1_epi32(0x0F));
            *grp = _mm256_srli_epi32::<4>(*grp);
            // q × d is exact, so this is candle's q × d + m.
            _mm256_fmadd_ps(_mm256_cvtepi32_ps(q), load(&d[8 * h..]), load(&m[8 * h..]))
        }
    }

    impl Steps for Q80 {
        type Scales = [f32; PANEL];
        type Group = ();
        const GROUPS: usize = 4;
        const STEPS: usize = 8;

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn scales(&self) -> Self::Scales {
            let mut d = [0.0; PANEL];
            store(&mut d[..8], load_f16(&self.d, 0));
            store(&mut d[8..], load_f16(&self.d, 1));
            d
        }

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn group(&self, _: usize, _: usize) -> Self::Group {}

        #[inline]
        #[target_feature(enable = "avx2,fma,f16c")]
        unsafe fn step(
            &self,
            d: &Self::Scales,
            _: &mut (),
            g: usize,
            s: usize,
            h: usize,
        ) -> __m256 {
            let q = &self.q[g * Self::STEPS + s];
            // q × d is exact, as candle's.
            _mm256_mul_ps(load_i8(q, h), load(&d[8 * h..]))
        }
    }

    /// Dequantizes `blocks` (consecutive blocks of one panel) into `out`
    /// (`blocks.len() × 32 × PANEL`, `k`-major).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn dequant<B: Steps>(blocks: &[B], out: &mut [f32]) {
        for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK * PANEL)) {
            // SAFETY: this function has the features `Steps` needs.
            let sc = unsafe { b.scales() };
            for g in 0..B::GROUPS {
                // SAFETY: as above.
                let mut grp = [0, 1].map(|h| unsafe { b.group(g, h) });
                for s in 0..B::STEPS {
                    // SAFETY: as above.
                    let w = [0, 1].map(|h| unsafe { b.step(&sc, &mut grp[h], g, s, h) });
                    let kk = g * B::STEPS + s;
                    store(&mut o[kk * PANEL..], w[0]);
                    store(&mut o[kk * PANEL + 8..], w[1]);
                }
            }
        }
    }

    /// `R` rows of `X` (`xt`, `k`-major: row `r` at `k` is `xt[k × R +
    /// r]`) against one whole panel (`blocks`: all of `k`), dequantizing
    /// each step in registers. `out` (`R × PANEL`) gets, per element, the
    /// FMA chain over `k` from zero, in order.
    ///
    /// (Several panels side by side, for more independent chains at small
    /// `R`, measured slower here: the step is bound by its dequantizing
    /// uops, not by the FMA latency.)
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn direct<B: Steps, const R: usize>(xt: &[f32], blocks: &[B], out: &mut [f32]) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for (b, blk) in blocks.iter().enumerate() {
            // SAFETY: this function has the features `Steps` needs.
            let sc = unsafe { blk.scales() };
            for g in 0..B::GROUPS {
                // SAFETY: as above.
                let mut grp = [0, 1].map(|h| unsafe { blk.group(g, h) });
                let xg = &xt[(b * QK + g * B::STEPS) * R..][..B::STEPS * R];
                for (s, xs) in xg.chunks_exact(R).enumerate() {
                    // SAFETY: as above.
                    let w = [0, 1].map(|h| unsafe { blk.step(&sc, &mut grp[h], g, s, h) });
                    for (a, &x) in acc.iter_mut().zip(xs) {
                        let x = _mm256_set1_ps(x);
                        a[0] = _mm256_fmadd_ps(x, w[0], a[0]);
                        a[1] = _mm256_fmadd_ps(x, w[1], a[1]);
                    }
                }
            }
        }
        for (o, a) in out.chunks_exact_mut(PANEL).zip(&acc) {
            store(&mut o[..8], a[0]);
            store(&mut o[8..], a[1]);
        }
    }

    /// As [`direct`], one half of the panel (8 columns) at a time over the
    /// whole of `k`: `R` accumulators instead of `2R`, so up to 8 rows fit
    /// the 16 registers beside the dequantizing ones, and each step's
    /// dequantization feeds `R` FMAs. The second half reads the panel's
    /// blocks again, from L1 (a panel is at most 15 KiB here). Every
    /// element is still one FMA chain over `k`, in order, from zero.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(crate) fn direct_halves<B: Steps, const R: usize>(
        xt: &[f32],
        blocks: &[B],
        out: &mut [f32],
    ) {
        for h in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, blk) in blocks.iter().enumerate() {
                // SAFETY: this function has the features `Steps` needs.
                let sc = unsafe { blk.scales() };
                for g in 0..B::GROUPS {
                    // SAFETY: as above.
                    let mut grp = unsafe { blk.group(g, h) };
                    let xg = &xt[(b * QK + g * B::STEPS) * R..][..B::STEPS * R];
                    for (s, xs) in xg.chunks_exact(R).enumerate() {
                        // SAFETY: as above.
                        let w = unsafe { blk.step(&sc, &mut grp, g, s, h) };
                        for (a, &x) in acc.iter_mut().zip(xs) {
                            *a = _mm256_fmadd_ps(_mm256_set1_ps(x), w, *a);
                        }
                    }
                }
            }
            for (o, a) in out.chunks_exact_mut(PANEL).zip(&acc) {
                store(&mut o[8 * h..], *a);
            }
        }
    }
}

/// The AVX-512 kernel of decode's few rows: a block's 16 columns are one
/// 512-bit register, so a step's dequantization is half the instructions
/// of AVX2's, the `x` values broadcast inside the FMAs, and 32 registers
/// hold an accumulator for each of up to 16 rows (more independent chains
/// than the FMA latency needs). The values are those of the AVX2 and
/// scalar kernels, lane for lane: the same `f16` conversions, the same
/// `q × d (+ m)`, the same FMA chains. Every function here carries
/// AVX-512F (with AVX2, FMA and F16C); callers check them with
/// `simd::avx512` first.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{Q41, Q80, QK};
    use crate::matmul::PANEL;
    use std::arch::x86_64::*;

    /// A block's 32 `k` steps: `GROUPS` groups of `STEPS` steps, each
    /// step's 16 column values in one register.
    pub(crate) trait Steps: super::QBlock {
        /// The block's scales (and minimums), in registers.
        type Scales: Copy;
        /// One group's quantized values, in a register.
        type Group: Copy;
        const GROUPS: usize;
        const STEPS: usize;
        /// # Safety
        /// The CPU must have AVX-512F, AVX2, FMA and F16C.
        unsafe fn scales(&self) -> Self::Scales;
        /// # Safety
        /// As for [`Steps::scales`].
        unsafe fn group(&self, g: usize) -> Self::Group;
        /// The values at `k = g × STEPS + s` of the block; called for `s` in
        /// order (it may consume `grp` as it goes).
        ///
        /// # Safety
        /// As for [`Steps::scales`].
        unsafe fn step(
            &self,
            sc: &Self::Scales,
            grp: &mut Self::Group,
            g: usize,
            s: usize,
        ) -> __m512;
    }

    /// Sixteen `f16` bits as `f32`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    fn load_f16(a: &[u16; PANEL]) -> __m512 {
        // SAFETY: `a` is 16 readable `u16`s (32 bytes); the load is
        // unaligned.
        _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(a.as_ptr().cast()) })
    }

    impl Steps for Q41 {
        /// `[d, m]`.
        type Scales = [__m512; 2];
        /// `q[g]`.
        type Group = __m512i;
        const GROUPS: usize = 4;
        const STEPS: usize = 8;

        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn scales(&self) -> Self::Scales {
            [load_f16(&self.d), load_f16(&self.m)]
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn group(&self, g: usize) -> Self::Group {
            // SAFETY: `q[g]` is 16 readable `u32`s (64 bytes); the load is
            // unaligned.
            unsafe { _mm512_loadu_si512(self.q[g].as_ptr().cast()) }
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn step(
            &self,
            [d, m]: &Self::Scales,
            grp: &mut Self::Group,
            _: usize,
            _: usize,
        ) -> __m512 {
            // The low nibble is this step's; shift the next one down.
            let q = _mm512_and_si512(*grp, _mm512_set1_epi32(0x0F));
            *grp = _mm512_srli_epi32::<4>(*grp);
            // q × d is exact, so this is candle's q × d + m.
            _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), *d, *m)
        }
    }

    impl Steps for Q80 {
        type Scales = __m512;
        type Group = ();
        const GROUPS: usize = 4;
        const STEPS: usize = 8;

        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn scales(&self) -> Self::Scales {
            load_f16(&self.d)
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn group(&self, _: usize) -> Self::Group {}

        #[inline]
        #[target_feature(enable = "avx512f,avx2,fma,f16c")]
        unsafe fn step(&self, d: &Self::Scales, _: &mut (), g: usize, s: usize) -> __m512 {
            let q = &self.q[g * Self::STEPS + s];
            // SAFETY: `q` is 16 readable bytes; the load is unaligned.
            let q = unsafe { _mm_loadu_si128(q.as_ptr().cast()) };
            // q × d is exact, as candle's.
            _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q)), *d)
        }
    }

    /// `R` rows of `X` (`xt`, `k`-major: row `r` at `k` is `xt[k × R +
    /// r]`) against one whole panel (`blocks`: all of `k`), dequantizing
    /// each step in registers. `out` (`R × PANEL`) gets, per element, the
    /// FMA chain over `k` from zero, in order.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(crate) fn direct<B: Steps, const R: usize>(xt: &[f32], blocks: &[B], out: &mut [f32]) {
        let mut acc = [_mm512_setzero_ps(); R];
        for (b, blk) in blocks.iter().enumerate() {
            // SAFETY: this function has the features `Steps` needs.
            let sc = unsafe { blk.scales() };
            for g in 0..B::GROUPS {
                // SAFETY: as above.
                let mut grp = unsafe { blk.group(g) };
                let xg = &xt[(b * QK + g * B::STEPS) * R..][..B::STEPS * R];
                for (s, xs) in xg.chunks_exact(R).enumerate() {
                    // SAFETY: as above.
                    let w = unsafe { blk.step(&sc, &mut grp, g, s) };
                    for (a, &x) in acc.iter_mut().zip(xs) {
                        *a = _mm512_fmadd_ps(_mm512_set1_ps(x), w, *a);
                    }
                }
            }
        }
        for (o, a) in out.chunks_exact_mut(PANEL).zip(&acc) {
            let o = &mut o[..PANEL];
            // SAFETY: `o` is 16 writable `f32`s; the store is unaligned.
            unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *a) };
        }
    }
}

/// candle's dequantization of `raw` (`n × k` of `dtype`), row-major: the
/// tests' oracle.
#[cfg(test)]
pub(crate) fn candle_dequant(
    dtype: candle_core::quantized::GgmlDType,
    raw: &[u8],
    n: usize,
    k: usize,
) -> Vec<f32> {
    use candle_core::Device;
    candle_core::quantized::ggml_file::qtensor_from_ggml(dtype, raw, vec![n, k], &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    #[test]
    fn f16_conversion_is_exact_for_every_half() {
        // A Q8_0 block with q = 1 dequantizes to its scale.
        let mut raw = Vec::new();
        for h in 0..=u16::MAX {
            raw.extend_from_slice(&h.to_le_bytes());
            raw.extend_from_slice(&[1u8; QK]);
        }
        let want = candle_dequant(GgmlDType::Q8_0, &raw, 1 << 16, QK);
        for h in 0..=u16::MAX {
            let (got, want) = (f16_to_f32(h), want[usize::from(h) * QK]);
            assert!(
                got.to_bits() == want.to_bits() || (got.is_nan() && want.is_nan()),
                "{h:#06x}: {got} vs {want}"
            );
        }
    }
}
