//! Quantized weights kept as the file stores them (Q4_1, Q8_0), repacked in
//! [`matmul`](crate::matmul)'s panels, and multiplied as llama.cpp does:
//! by activations quantized to 8 bits per block of 32, in integer dot
//! products.
//!
//! # Arithmetic
//!
//! Each row of `X` is quantized block by block ([`quantize_rows`]): a
//! block's 32 values `x` become `d × q` with `d = max|x| / 127` and `q =
//! round(x / d)` (ties to even) in `-127 ..= 127`, with `Σq` beside it.
//! A weight block (`f16` scale `dw`, and for Q4_1 an `f16` minimum `mw`)
//! times an activation block is then, per output column, one exact integer
//! sum `Σ qw × qx` and a fixed fix-up in `f32`:
//!
//! ```text
//! t   = (Σ qw × qx) as f32 × dx          (exact conversion: |Σ| < 2^24)
//! acc = fma(dw, t, acc)
//! acc = fma(mw, dx × Σqx as f32, acc)    (Q4_1 only)
//! ```
//!
//! over the blocks of `k` in order from zero. Integer sums are exact in
//! any order and the `f32` steps are the same per element on every path
//! (the AVX-512 VNNI kernel, the AVX2 one, the scalar code), so an output
//! never depends on the batch size, the tile, the
//! thread or the kernel: batch invariance holds as it does for the F32
//! path's in-order FMA chains (see `matmul`). It is not the arithmetic of
//! the F32 weights (the activations are rounded to 8 bits; the F32 weights
//! path stays exact for that, see `EngineConfigBuilder::f32_weights`), but
//! it is llama.cpp's (`Q4_1 × Q8_1`, `Q8_0 × Q8_0`), and it does a fourth
//! of the work per multiply-add: one `vpdpbusd` multiplies and sums 64
//! byte pairs, where the F32 path needs four 16-wide FMAs. That is what
//! lets a decode step of several rows cost little more than one.
//!
//! # Layout
//!
//! One [`Q41`] or [`Q80`] holds a panel's 32 values of `k` for its
//! [`PANEL`] output columns: one GGUF block per column, regrouped so that
//! a register of 16 `u32` lanes holds, per column, 4 consecutive `k`
//! values as unsigned bytes: the operand `vpdpbusd` multiplies by 4
//! activation bytes broadcast to every lane. Q4_1's nibbles need a mask
//! (and a shift for the high ones); Q8_0's signed bytes are stored plus
//! 128 (unsigned), the extra `128 × Σqx` taken off the integer sum. A
//! packed matrix is panels of `k / 32` such blocks. Bytes streamed per
//! weight: 0.625 (Q4_1) and 1.0625 (Q8_0), against 4 for F32.
//!
//! The values themselves ([`QBlock::value`], for row lookups and the F32
//! copy) are candle's dequantization bit for bit: `q × d + m` with an
//! exact product, so one rounding.

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
    /// `q[w][j]` is column `j`'s GGUF bytes `4w .. 4w + 4`: byte `b`'s low
    /// nibble is the value at `k = 4w + b`, its high nibble the one at
    /// `k = 16 + 4w + b`.
    q: [[u32; PANEL]; 4],
}

/// Q8_0 weights of one panel for 32 values of `k`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) struct Q80 {
    /// Column `j`'s scale, `f16` bits.
    d: [u16; PANEL],
    /// `q[w][j]`: column `j`'s values at `k = 4w .. 4w + 4`, one per byte,
    /// each plus 128 (as `u8`).
    q: [[u32; PANEL]; 8],
}

/// A quantized panel block: how to build it from the file's blocks, its
/// values, and the scalar reference of its integer products (the AVX-512
/// kernel computes the same).
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
    /// Column `j`'s stored byte at `k = kk` (what `vpdpbusd` multiplies).
    fn byte(&self, kk: usize, j: usize) -> u8;
    /// The integer sum's starting value for an activation block whose
    /// values sum to `sum` (Q8_0 takes off what its bias of 128 adds).
    fn init(sum: i32) -> i32;
    /// Column `j`'s scale and minimum (zero for Q8_0) as `f32`.
    fn scales(&self, j: usize) -> (f32, f32);
    /// Whether the fix-up adds the minimum's term.
    const MIN: bool;
}

fn f16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

impl QBlock for Q41 {
    const GGUF_BYTES: usize = 20;
    const MIN: bool = true;

    fn from_gguf(blocks: [&[u8]; PANEL]) -> Self {
        let mut out = Q41 {
            d: [0; PANEL],
            m: [0; PANEL],
            q: [[0; PANEL]; 4],
        };
        for (j, b) in blocks.iter().enumerate() {
            // GGUF: d, m, then byte i holds value i (low nibble) and value
            // i + 16 (high nibble): kept as they are, four bytes a lane.
            out.d[j] = f16_at(b, 0);
            out.m[j] = f16_at(b, 2);
            for w in 0..4 {
                out.q[w][j] = u32::from_le_bytes(b[4 + 4 * w..][..4].try_into().expect("4 bytes"));
            }
        }
        out
    }

    #[inline(always)]
    fn value(&self, kk: usize, j: usize) -> f32 {
        let q = self.byte(kk, j);
        // candle's `(x0 as f32) * d + m`, unfused.
        f32::from(q) * f16_to_f32(self.d[j]) + f16_to_f32(self.m[j])
    }

    #[inline(always)]
    fn byte(&self, kk: usize, j: usize) -> u8 {
        let (w, b) = ((kk % 16) / 4, kk % 4);
        let shift = 8 * b + if kk < 16 { 0 } else { 4 };
        ((self.q[w][j] >> shift) & 0x0F) as u8
    }

    #[inline(always)]
    fn init(_: i32) -> i32 {
        0
    }

    #[inline(always)]
    fn scales(&self, j: usize) -> (f32, f32) {
        (f16_to_f32(self.d[j]), f16_to_f32(self.m[j]))
    }
}

impl QBlock for Q80 {
    const GGUF_BYTES: usize = 34;
    const MIN: bool = false;

    fn from_gguf(blocks: [&[u8]; PANEL]) -> Self {
        let mut out = Q80 {
            d: [0; PANEL],
            q: [[0; PANEL]; 8],
        };
        for (j, b) in blocks.iter().enumerate() {
            out.d[j] = f16_at(b, 0);
            for w in 0..8 {
                // i8 + 128 as u8 is the bits with the sign bit flipped.
                let bytes: [u8; 4] = std::array::from_fn(|i| b[2 + 4 * w + i] ^ 0x80);
                out.q[w][j] = u32::from_le_bytes(bytes);
            }
        }
        out
    }

    #[inline(always)]
    fn value(&self, kk: usize, j: usize) -> f32 {
        let q = (self.byte(kk, j) ^ 0x80) as i8;
        f32::from(q) * f16_to_f32(self.d[j])
    }

    #[inline(always)]
    fn byte(&self, kk: usize, j: usize) -> u8 {
        (self.q[kk / 4][j] >> (8 * (kk % 4))) as u8
    }

    #[inline(always)]
    fn init(sum: i32) -> i32 {
        // Σ (q + 128) × qx − 128 × Σ qx = Σ q × qx.
        -128 * sum
    }

    #[inline(always)]
    fn scales(&self, j: usize) -> (f32, f32) {
        (f16_to_f32(self.d[j]), 0.0)
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

/// What the matmul needs of a block format: on x86-64, its AVX-512 and
/// AVX2 kernels too.
#[cfg(target_arch = "x86_64")]
pub(crate) trait Kernel: avx512::Vnni + avx2::Dot {}
#[cfg(target_arch = "x86_64")]
impl<T: avx512::Vnni + avx2::Dot> Kernel for T {}
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait Kernel: QBlock {}
#[cfg(not(target_arch = "x86_64"))]
impl<T: QBlock> Kernel for T {}

/// The rows of `X` quantized block by block (see the module docs): row
/// `r`'s block `b` is `q[(r × k/32 + b) × 32..][..32]`, with scale
/// `d[r × k/32 + b]`, `s = d × Σq` and the integer `Σq` beside it.
pub(crate) struct QRows {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<f32>,
    pub sum: Vec<i32>,
}

/// Quantizes the `m × k` row-major `x` (`k` a multiple of 32); the same
/// values whichever ISA runs it (see [`quantize_block`]).
pub(crate) fn quantize_rows(x: &[f32], k: usize, avx512: bool) -> QRows {
    assert_eq!(k % QK, 0, "{k} is not whole blocks of {QK}");
    let blocks = x.len() / QK;
    let mut out = QRows {
        q: vec![0; x.len()],
        d: vec![0.0; blocks],
        s: vec![0.0; blocks],
        sum: vec![0; blocks],
    };
    #[cfg(target_arch = "x86_64")]
    if avx512 {
        // SAFETY: the caller checked AVX-512F and BW (`simd::avx512_vnni`).
        unsafe { avx512::quantize(x, &mut out) };
        return out;
    }
    let _ = avx512;
    for (i, xb) in x.chunks_exact(QK).enumerate() {
        let q: &mut [i8; QK] = (&mut out.q[i * QK..][..QK]).try_into().expect("a block");
        (out.d[i], out.sum[i]) = quantize_block(xb.try_into().expect("a block"), q);
        out.s[i] = out.d[i] * out.sum[i] as f32;
    }
    out
}

/// One block: `d = max|x| / 127`, `q = round(x × (1/d))` (ties to even;
/// all zero when `d` is), and `Σq`.
#[inline(always)]
fn quantize_block(x: &[f32; QK], q: &mut [i8; QK]) -> (f32, i32) {
    let amax = x.iter().fold(0.0f32, |a, &v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for (q, &v) in q.iter_mut().zip(x) {
        // |v × id| ≤ 127 (plus a rounding), so the clamp only guards NaN.
        let r = (v * id).round_ties_even().clamp(-127.0, 127.0) as i32;
        *q = r as i8;
        sum += r;
    }
    (d, sum)
}

/// Quantized rows regrouped for the kernels, in tiles of up to `per` rows
/// (the last tile may hold fewer): a tile's blocks in the order of `k`,
/// each block's rows side by side, so that a kernel reads a whole tile's
/// activations for one weight block from one place, at fixed offsets.
/// The values are [`QRows`]'s, moved, never recomputed.
pub(crate) struct QTiles {
    per: usize,
    nb: usize,
    m: usize,
    q: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    sum: Vec<i32>,
}

/// One tile of [`QTiles`]: row `r`'s block `b` is `q[(b × rows + r) ×
/// 32..][..32]`, with `d`, `s` and `sum` at `b × rows + r`.
#[derive(Clone, Copy)]
pub(crate) struct Tile<'a> {
    pub rows: usize,
    pub q: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub sum: &'a [i32],
}

impl QTiles {
    /// `x` (`m` rows of `k`, from [`quantize_rows`]) in tiles of up to
    /// `per` rows. (Tiles of one row are the rows as they are: a decode
    /// step of one sequence moves nothing.)
    pub fn new(x: QRows, k: usize, per: usize) -> QTiles {
        assert!(per > 0, "tiles of no rows");
        let nb = k / QK;
        let m = x.d.len() / nb;
        if m <= 1 || per == 1 {
            let QRows { q, d, s, sum } = x;
            return QTiles {
                per,
                nb,
                m,
                q,
                d,
                s,
                sum,
            };
        }
        let mut out = QTiles {
            per,
            nb,
            m,
            q: vec![0; x.q.len()],
            d: vec![0.0; x.d.len()],
            s: vec![0.0; x.s.len()],
            sum: vec![0; x.sum.len()],
        };
        for t0 in (0..m).step_by(per) {
            let rows = (m - t0).min(per);
            for r in 0..rows {
                for b in 0..nb {
                    let (src, dst) = ((t0 + r) * nb + b, t0 * nb + b * rows + r);
                    out.q[dst * QK..][..QK].copy_from_slice(&x.q[src * QK..][..QK]);
                    out.d[dst] = x.d[src];
                    out.s[dst] = x.s[src];
                    out.sum[dst] = x.sum[src];
                }
            }
        }
        out
    }

    /// The tiles in order, each with its first row.
    pub fn tiles(&self) -> impl Iterator<Item = (usize, Tile<'_>)> + '_ {
        (0..self.m).step_by(self.per).map(|t0| {
            let rows = (self.m - t0).min(self.per);
            let (at, len) = (t0 * self.nb, rows * self.nb);
            (
                t0,
                Tile {
                    rows,
                    q: &self.q[at * QK..][..len * QK],
                    d: &self.d[at..][..len],
                    s: &self.s[at..][..len],
                    sum: &self.sum[at..][..len],
                },
            )
        })
    }
}

/// The panels in `panels` (`nb` blocks each: all of `k`) against the rows
/// of the tile `x`, scalar: row `r`'s columns `16p .. 16p + 16` (in
/// `out[r]`) get panel `p`'s fix-up chains over its blocks from zero
/// (see the module docs).
#[inline(always)]
pub(crate) fn dot_tile<B: QBlock>(x: &Tile<'_>, panels: &[B], nb: usize, out: &mut [&mut [f32]]) {
    let rows = x.rows;
    for (p, blocks) in panels.chunks_exact(nb).enumerate() {
        for (r, o) in out.iter_mut().enumerate().take(rows) {
            let mut acc = [0.0f32; PANEL];
            for (b, blk) in blocks.iter().enumerate() {
                let i = b * rows + r;
                let xq = &x.q[i * QK..][..QK];
                let (dx, sx) = (x.d[i], x.s[i]);
                let init = B::init(x.sum[i]);
                for (j, a) in acc.iter_mut().enumerate() {
                    let mut sumi = init;
                    for (kk, &qx) in xq.iter().enumerate() {
                        sumi += i32::from(blk.byte(kk, j)) * i32::from(qx);
                    }
                    let (dw, mw) = blk.scales(j);
                    let t = sumi as f32 * dx;
                    *a = dw.mul_add(t, *a);
                    if B::MIN {
                        *a = mw.mul_add(sx, *a);
                    }
                }
            }
            o[p * PANEL..][..PANEL].copy_from_slice(&acc);
        }
    }
}

/// The AVX-512 kernels: activation quantization, and the integer products
/// with VNNI's `vpdpbusd`. The values are those of the scalar code, lane
/// for lane: the same roundings, the same (exact) integer sums, the same
/// `f32` fix-ups in the same order. Every function here carries AVX-512F,
/// BW and VNNI (with AVX2, FMA and F16C); callers check them with
/// `simd::avx512_vnni` first.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{QRows, Tile, Q41, Q80, QK};
    use crate::matmul::PANEL;
    use std::arch::x86_64::*;

    /// Sixteen `f16` bits as `f32`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    fn load_f16(a: &[u16; PANEL]) -> __m512 {
        // SAFETY: `a` is 16 readable `u16`s (32 bytes); the load is
        // unaligned.
        _mm512_cvtph_ps(unsafe { _mm256_loadu_si256(a.as_ptr().cast()) })
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    fn load_u32(a: &[u32; PANEL]) -> __m512i {
        // SAFETY: `a` is 16 readable `u32`s (64 bytes); the load is
        // unaligned.
        unsafe { _mm512_loadu_si512(a.as_ptr().cast()) }
    }

    /// A block's bytes for `vpdpbusd`, its scales, per format.
    pub(crate) trait Vnni: super::QBlock {
        /// Group `g`'s bytes: per column, those at `k = 4g .. 4g + 4`.
        ///
        /// # Safety
        /// The CPU must have AVX-512F, BW and VNNI, AVX2, FMA and F16C.
        unsafe fn groups(&self) -> [__m512i; 8];
        /// `[dw, mw]` (`mw` unused for Q8_0).
        ///
        /// # Safety
        /// As for [`Vnni::groups`].
        unsafe fn scales512(&self) -> [__m512; 2];
    }

    impl Vnni for Q41 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
        unsafe fn groups(&self) -> [__m512i; 8] {
            let mask = _mm512_set1_epi8(0x0F);
            let q = self.q.map(|w| load_u32(&w));
            // Low nibbles: k = 4w + b; high: k = 16 + 4w + b.
            std::array::from_fn(|g| {
                if g < 4 {
                    _mm512_and_si512(q[g], mask)
                } else {
                    _mm512_and_si512(_mm512_srli_epi32::<4>(q[g - 4]), mask)
                }
            })
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
        unsafe fn scales512(&self) -> [__m512; 2] {
            [load_f16(&self.d), load_f16(&self.m)]
        }
    }

    impl Vnni for Q80 {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
        unsafe fn groups(&self) -> [__m512i; 8] {
            self.q.map(|w| load_u32(&w))
        }

        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
        unsafe fn scales512(&self) -> [__m512; 2] {
            [load_f16(&self.d), _mm512_setzero_ps()]
        }
    }

    /// Weight blocks ahead of the one being multiplied that a tile of 4
    /// rows or more prefetches: a decode step streams every weight from
    /// memory once, and such a tile computes long enough per block for a
    /// prefetch to land in time (with fewer rows the out-of-order window
    /// alone reaches as far ahead; they do not prefetch).
    const AHEAD: usize = 4;

    /// The rows of the tile `x` (`R` of them) against the panels in
    /// `panels` (`nb` blocks each: all of `k`), panel `p` into columns
    /// `16p ..` of `out`'s rows: [`super::dot_tile`]'s values (one
    /// call for all of a task's panels). A block's bytes are loaded and
    /// unpacked once for all `R` rows; per group of 4 bytes, one
    /// `vpdpbusd` per row, the rows' integer sums side by side (with one
    /// or two rows, each row's sum split into partial sums, added at the
    /// end: exact, and enough independent chains to hide `vpdpbusd`'s
    /// latency). Up to 8 rows keep every sum and accumulator in
    /// registers: 8 rows cost one pass over the weights, not two.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(crate) fn dot_tile<B: Vnni, const R: usize>(
        x: &Tile<'_>,
        panels: &[B],
        nb: usize,
        out: &mut [&mut [f32]],
    ) {
        assert_eq!(x.rows, R, "a tile of {} rows in the {R}-row kernel", x.rows);
        let (q, d, s, sum) = (
            &x.q[..nb * R * QK],
            &x.d[..nb * R],
            &x.s[..nb * R],
            &x.sum[..nb * R],
        );
        // Partial sums per row.
        let split = match R {
            1 => 4,
            2..=3 => 2,
            _ => 1,
        };
        for (p, blocks) in panels.chunks_exact(nb).enumerate() {
            let mut acc = [_mm512_setzero_ps(); R];
            for (b, blk) in blocks.iter().enumerate() {
                // The block's lines (and one more, as a block need not start
                // on a line).
                if R >= 4 {
                    crate::simd::prefetch(
                        blocks.as_ptr().wrapping_add(b + AHEAD).cast(),
                        std::mem::size_of::<B>() + 64,
                    );
                }
                // SAFETY: this function has the features `Vnni` needs.
                let (w, [dw, mw]) = unsafe { (blk.groups(), blk.scales512()) };
                let xq = &q[b * R * QK..][..R * QK];
                let (db, sb, ib) = (&d[b * R..][..R], &s[b * R..][..R], &sum[b * R..][..R]);
                let mut sumi = [[_mm512_setzero_si512(); 4]; R];
                for (si, &i) in sumi.iter_mut().zip(ib) {
                    si[0] = _mm512_set1_epi32(B::init(i));
                }
                for (g, wg) in w.iter().enumerate() {
                    for (r, si) in sumi.iter_mut().enumerate() {
                        let xg = &xq[r * QK + 4 * g..][..4];
                        let xg = _mm512_set1_epi32(i32::from_le_bytes([
                            xg[0] as u8,
                            xg[1] as u8,
                            xg[2] as u8,
                            xg[3] as u8,
                        ]));
                        let c = &mut si[g % split];
                        *c = _mm512_dpbusd_epi32(*c, *wg, xg);
                    }
                }
                for (r, (a, si)) in acc.iter_mut().zip(&sumi).enumerate() {
                    let total = si[1..split]
                        .iter()
                        .fold(si[0], |t, &p| _mm512_add_epi32(t, p));
                    let t = _mm512_mul_ps(_mm512_cvtepi32_ps(total), _mm512_set1_ps(db[r]));
                    *a = _mm512_fmadd_ps(dw, t, *a);
                    if B::MIN {
                        *a = _mm512_fmadd_ps(mw, _mm512_set1_ps(sb[r]), *a);
                    }
                }
            }
            for (o, a) in out[..R].iter_mut().zip(&acc) {
                let o = &mut o[p * PANEL..][..PANEL];
                // SAFETY: `o` is 16 writable `f32`s; the store is unaligned.
                unsafe { _mm512_storeu_ps(o.as_mut_ptr(), *a) };
            }
        }
    }

    /// [`super::quantize_rows`] for all of `x`, 32 values (two registers)
    /// a block: the same operations per value as the scalar
    /// `quantize_block` (a max is exact, so its order does not matter; so
    /// is an integer sum).
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
    pub(crate) fn quantize(x: &[f32], out: &mut QRows) {
        for (i, xb) in x.chunks_exact(QK).enumerate() {
            // SAFETY: `xb` is 32 readable `f32`s; the loads are unaligned.
            let v = unsafe {
                [
                    _mm512_loadu_ps(xb.as_ptr()),
                    _mm512_loadu_ps(xb[16..].as_ptr()),
                ]
            };
            let amax =
                _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])));
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if d != 0.0 { 1.0 / d } else { 0.0 });
            let (lo, hi) = (_mm512_set1_ps(-127.0), _mm512_set1_ps(127.0));
            let q = v.map(|v| {
                let r = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(
                    _mm512_mul_ps(v, id),
                );
                _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(r, lo), hi))
            });
            let sum = _mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
            for (h, q) in q.into_iter().enumerate() {
                let dst = &mut out.q[i * QK + 16 * h..][..16];
                // SAFETY: `dst` is 16 writable bytes; the store is
                // unaligned.
                unsafe { _mm_storeu_si128(dst.as_mut_ptr().cast(), _mm512_cvtepi32_epi8(q)) };
            }
            out.d[i] = d;
            out.sum[i] = sum;
            out.s[i] = d * sum as f32;
        }
    }
}

/// The AVX2 kernel, for CPUs without AVX-512 VNNI: the integer sums with
/// `vpmaddubsw` (unsigned × signed bytes, pairs summed to `i16`) and
/// `vpmaddwd` (to `i32`), then the scalar code's fix-ups, lane for lane.
/// The sums are exact (no `i16` saturates: see each format), so they are
/// the scalar code's integers, and the results its bits. Every function
/// here carries AVX2 and FMA; callers check them with `simd::avx2_fma`
/// first.
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::{QBlock, Tile, Q41, Q80, QK};
    use crate::matmul::PANEL;
    use std::arch::x86_64::*;

    /// A block's bytes for `vpmaddubsw`, per format.
    pub(crate) trait Dot: QBlock {
        /// Half `h`'s (columns `8h .. 8h + 8`) group `g`: per column, the
        /// bytes at `k = 4g .. 4g + 4`.
        ///
        /// # Safety
        /// The CPU must have AVX2 and FMA.
        unsafe fn groups(&self, h: usize) -> [__m256i; 8];
        /// Per column of the half, `Σ w × x` over the block, `x` the 8
        /// groups of 4 activation bytes.
        ///
        /// # Safety
        /// As for [`Dot::groups`].
        unsafe fn dot(w: &[__m256i; 8], x: &[i32; 8]) -> __m256i;
    }

    /// Eight `u32`s.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn load_u32(a: &[u32; PANEL], h: usize) -> __m256i {
        let a = &a[8 * h..][..8];
        // SAFETY: `a` is 8 readable `u32`s (32 bytes); the load is unaligned.
        unsafe { _mm256_loadu_si256(a.as_ptr().cast()) }
    }

    impl Dot for Q41 {
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn groups(&self, h: usize) -> [__m256i; 8] {
            let mask = _mm256_set1_epi8(0x0F);
            let q = self.q.map(|w| load_u32(&w, h));
            // Low nibbles: k = 4w + b; high: k = 16 + 4w + b.
            let mut out = [_mm256_setzero_si256(); 8];
            for (w, q) in q.into_iter().enumerate() {
                out[w] = _mm256_and_si256(q, mask);
                out[w + 4] = _mm256_and_si256(_mm256_srli_epi32::<4>(q), mask);
            }
            out
        }

        /// Nibbles (≤ 15) times bytes (≥ -127): a pair is at most 3810 in
        /// size, all 8 groups' pairs 30480, inside `i16`.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn dot(w: &[__m256i; 8], x: &[i32; 8]) -> __m256i {
            let mut pairs = _mm256_setzero_si256();
            for (w, &x) in w.iter().zip(x) {
                let p = _mm256_maddubs_epi16(*w, _mm256_set1_epi32(x));
                pairs = _mm256_add_epi16(pairs, p);
            }
            _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))
        }
    }

    impl Dot for Q80 {
        /// The signed values (the stored bytes less 128).
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn groups(&self, h: usize) -> [__m256i; 8] {
            let bias = _mm256_set1_epi8(-128);
            self.q.map(|w| _mm256_xor_si256(load_u32(&w, h), bias))
        }

        /// `|w| × (x with w's sign)`: `|w|` ≤ 128 unsigned, the other at
        /// most 127 in size, a pair at most 32512, inside `i16`.
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn dot(w: &[__m256i; 8], x: &[i32; 8]) -> __m256i {
            let ones = _mm256_set1_epi16(1);
            let mut sum = _mm256_setzero_si256();
            for (w, &x) in w.iter().zip(x) {
                let x = _mm256_sign_epi8(_mm256_set1_epi32(x), *w);
                let p = _mm256_maddubs_epi16(_mm256_abs_epi8(*w), x);
                sum = _mm256_add_epi32(sum, _mm256_madd_epi16(p, ones));
            }
            sum
        }
    }

    /// The rows of the tile `x` (`R` of them, at most 4: the registers
    /// hold no more) against the panels in `panels` (`nb` blocks each: all
    /// of `k`), panel `p` into columns `16p ..` of `out`'s rows:
    /// [`super::dot_tile`]'s values, one half of a panel at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) fn dot_tile<B: Dot, const R: usize>(
        x: &Tile<'_>,
        panels: &[B],
        nb: usize,
        out: &mut [&mut [f32]],
    ) {
        assert_eq!(x.rows, R, "a tile of {} rows in the {R}-row kernel", x.rows);
        let (q, d, s) = (&x.q[..nb * R * QK], &x.d[..nb * R], &x.s[..nb * R]);
        for (p, blocks) in panels.chunks_exact(nb).enumerate() {
            dot_panel::<B, R>(q, d, s, blocks, out, p * PANEL);
        }
    }

    /// One panel of [`dot_tile`].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn dot_panel<B: Dot, const R: usize>(
        q: &[i8],
        d: &[f32],
        s: &[f32],
        blocks: &[B],
        out: &mut [&mut [f32]],
        col: usize,
    ) {
        for h in 0..2 {
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, blk) in blocks.iter().enumerate() {
                // SAFETY: this function has the features `Dot` needs.
                let w = unsafe { blk.groups(h) };
                let mut dw = [0.0f32; 8];
                let mut mw = [0.0f32; 8];
                for j in 0..8 {
                    (dw[j], mw[j]) = blk.scales(8 * h + j);
                }
                // SAFETY: `dw` and `mw` are 8 readable `f32`s each.
                let (dw, mw) =
                    unsafe { (_mm256_loadu_ps(dw.as_ptr()), _mm256_loadu_ps(mw.as_ptr())) };
                for (r, a) in acc.iter_mut().enumerate() {
                    let i = b * R + r;
                    let xq = &q[i * QK..][..QK];
                    let x4: [i32; 8] = std::array::from_fn(|g| {
                        i32::from_le_bytes([
                            xq[4 * g] as u8,
                            xq[4 * g + 1] as u8,
                            xq[4 * g + 2] as u8,
                            xq[4 * g + 3] as u8,
                        ])
                    });
                    // SAFETY: as above.
                    let sumi = unsafe { B::dot(&w, &x4) };
                    let t = _mm256_mul_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(d[i]));
                    *a = _mm256_fmadd_ps(dw, t, *a);
                    if B::MIN {
                        *a = _mm256_fmadd_ps(mw, _mm256_set1_ps(s[i]), *a);
                    }
                }
            }
            for (o, a) in out[..R].iter_mut().zip(&acc) {
                let o = &mut o[col + 8 * h..][..8];
                // SAFETY: `o` is 8 writable `f32`s; the store is unaligned.
                unsafe { _mm256_storeu_ps(o.as_mut_ptr(), *a) };
            }
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

    /// The SIMD quantizer gives the scalar one's bytes and scales, on
    /// values of every magnitude, zeros and ties included.
    #[test]
    fn activation_quantization_is_the_same_on_every_isa() {
        let mut x: Vec<f32> = (0..64 * QK)
            .map(|i| {
                let v = ((i as u32).wrapping_mul(2654435761) % 20001) as f32 / 10000.0 - 1.0;
                v * [1e-6, 1e-2, 1.0, 37.0][i / QK % 4]
            })
            .collect();
        // A zero block, and one whose values land on halves (127 / 254
        // steps: ties).
        x[..QK].fill(0.0);
        for (i, v) in x[QK..2 * QK].iter_mut().enumerate() {
            *v = (i as f32 - 16.0) * 0.5;
        }
        let want = quantize_rows(&x, 4 * QK, false);
        // Each value is within half a step of its quantized value.
        for (i, xb) in x.chunks_exact(QK).enumerate() {
            for (kk, &v) in xb.iter().enumerate() {
                let back = f32::from(want.q[i * QK + kk]) * want.d[i];
                assert!((back - v).abs() <= want.d[i] * 0.5 + 1e-12, "{v} vs {back}");
            }
        }
        if crate::simd::avx512_vnni() {
            let got = quantize_rows(&x, 4 * QK, true);
            assert_eq!(got.q, want.q);
            assert_eq!(got.sum, want.sum);
            for (a, b) in [(&got.d, &want.d), (&got.s, &want.s)] {
                assert!(a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()));
            }
        }
    }
}
