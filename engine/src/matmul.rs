//! The one matrix multiply of the forward pass: `Y = X · Wᵀ` over F32, for
//! activations `X` (`m × k`, row-major) and a weight `W` (`n × k`) packed
//! once at load, in F32 or kept in the file's Q4_1 / Q8_0 blocks.
//!
//! # Batch invariance
//!
//! Every output element `Y[i][j]` is one chain of fused multiply-adds over
//! `k`, in order, starting from zero — the same chain whatever `m` is,
//! whichever rows share a tile, which kernel path runs, and whichever
//! thread runs it. So a token's hidden state does not depend on what else
//! is in the batch: a prompt computed in one prefill, in chunks, or token
//! by token in decode gives bit-identical KV and logits. That is what lets
//! a cached prefix (computed by another request, in another batch) replace
//! recomputation without changing a single output token. BLAS-style
//! kernels (gemm included) pick different code paths and blockings by `m`
//! and lose this.
//!
//! # Kernel
//!
//! `W` is packed in panels of [`PANEL`] output columns. A tile of up to
//! [`ROWS`] rows of `X` (transposed to `k × rows`) meets one panel in an
//! outer-product loop: for each `k`, broadcast one `X` value per row and
//! FMA it with the panel's 16-wide row into `rows × 16` accumulators (12
//! AVX2 registers at 6 rows), `k` in blocks that keep a panel's block in
//! L1 (a sum paused between blocks continues the same chain). Threads split
//! the panels; each writes its own panel-major output, transposed into `Y`
//! at the end.
//!
//! A quantized panel (see `quant`) is dequantized on the fly to exactly the
//! `f32` values of the F32 path, so the chains and their results are the
//! same bit for bit while a decode step streams a sixth of the bytes. For
//! a decode step's few rows (up to [`DIRECT_ROWS_512`] with AVX-512, up to
//! [`DIRECT_ROWS`] with AVX2 alone), each `k` step's 16 weights are
//! dequantized in registers and go straight into the FMAs of every row,
//! all rows in one pass over the panel (`X` then is one tile of all `m`
//! rows): the dequantization is paid once per step of a batch, not once
//! per row. With AVX-512 a step's 16 weights are one register and each row
//! one accumulator; AVX2 takes up to 4 rows on the whole panel, and 5 to 8
//! rows on one half of it, then the other (16 registers hold no more). With
//! more rows (prefill), each `k` block of a panel is dequantized once into
//! an L1 scratch and every tile of rows runs the F32 kernel over it.

use crate::quant::{self, QBlock, Q41, Q80, QK};
use rayon::prelude::*;

/// Output columns per packed panel.
pub(crate) const PANEL: usize = 16;
/// Rows of `X` per register tile.
const ROWS: usize = 6;

/// A weight matrix `W` (`n × k`) packed for [`matmul`].
pub(crate) struct Packed {
    n: usize,
    k: usize,
    data: Data,
}

/// A packed matrix's panels, in the precision the file gave.
enum Data {
    /// Panel `p` is `v[p*k*PANEL..][..k*PANEL]`, element `(kk, j)` at
    /// `kk*PANEL + j` holding `W[p*PANEL + j][kk]`.
    F32(Vec<f32>),
    /// Panel `p` is `v[p*k/QK..][..k/QK]`, one block per 32 values of `k`.
    Q41(Vec<Q41>),
    Q80(Vec<Q80>),
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let format = match self.data {
            Data::F32(_) => "F32",
            Data::Q41(_) => "Q4_1",
            Data::Q80(_) => "Q8_0",
        };
        write!(f, "Packed({}x{} {format})", self.n, self.k)
    }
}

impl Packed {
    /// Packs the row-major `n × k` matrix `w`; `n` must be a multiple of
    /// [`PANEL`].
    pub fn pack(w: &[f32], n: usize, k: usize) -> Packed {
        assert_eq!(
            w.len(),
            n * k,
            "weight of {} values is not {n}x{k}",
            w.len()
        );
        assert_eq!(n % PANEL, 0, "{n} output columns are not whole panels");
        let mut data = vec![0.0; n * k];
        for (p, panel) in data.chunks_exact_mut(k * PANEL).enumerate() {
            for j in 0..PANEL {
                let row = &w[(p * PANEL + j) * k..][..k];
                for (kk, &v) in row.iter().enumerate() {
                    panel[kk * PANEL + j] = v;
                }
            }
        }
        Packed {
            n,
            k,
            data: Data::F32(data),
        }
    }

    /// Packs a row-major `n × k` matrix of Q4_1 blocks as the GGUF file
    /// stores them, keeping it quantized (see `quant`).
    pub fn pack_q4_1(raw: &[u8], n: usize, k: usize) -> Packed {
        Packed {
            n,
            k,
            data: Data::Q41(quant::pack(raw, n, k)),
        }
    }

    /// As [`Packed::pack_q4_1`], for Q8_0 blocks.
    pub fn pack_q8_0(raw: &[u8], n: usize, k: usize) -> Packed {
        Packed {
            n,
            k,
            data: Data::Q80(quant::pack(raw, n, k)),
        }
    }

    /// The same matrix in F32 (the values the kernels multiply by).
    pub fn to_f32(&self) -> Packed {
        fn unpack<B: QBlock>(blocks: &[B], k: usize) -> Vec<f32> {
            let mut out = vec![0.0; blocks.len() * QK * PANEL];
            // Blocks of a panel are consecutive and so are their values.
            for (b, o) in blocks.iter().zip(out.chunks_exact_mut(QK * PANEL)) {
                b.dequant(o);
            }
            debug_assert_eq!(out.len() % (k * PANEL), 0);
            out
        }
        let data = match &self.data {
            Data::F32(v) => v.clone(),
            Data::Q41(b) => unpack(b, self.k),
            Data::Q80(b) => unpack(b, self.k),
        };
        Packed {
            n: self.n,
            k: self.k,
            data: Data::F32(data),
        }
    }

    /// The matrices stacked by output columns (`[A; B; ...]`), for fused
    /// projections; all must share `k`. Parts of different precisions
    /// stack in F32.
    pub fn concat(parts: &[Packed]) -> Packed {
        let k = parts[0].k;
        assert!(parts.iter().all(|p| p.k == k), "fused weights differ in k");
        let n = parts.iter().map(|p| p.n).sum();
        let data = match &parts[0].data {
            Data::Q41(_) if parts.iter().all(|p| matches!(p.data, Data::Q41(_))) => Data::Q41(
                parts
                    .iter()
                    .flat_map(|p| match &p.data {
                        Data::Q41(v) => v.iter().copied(),
                        _ => unreachable!(),
                    })
                    .collect(),
            ),
            Data::Q80(_) if parts.iter().all(|p| matches!(p.data, Data::Q80(_))) => Data::Q80(
                parts
                    .iter()
                    .flat_map(|p| match &p.data {
                        Data::Q80(v) => v.iter().copied(),
                        _ => unreachable!(),
                    })
                    .collect(),
            ),
            _ => Data::F32(
                parts
                    .iter()
                    .flat_map(|p| match p.to_f32().data {
                        Data::F32(v) => v,
                        _ => unreachable!(),
                    })
                    .collect(),
            ),
        };
        Packed { n, k, data }
    }

    /// Output columns.
    #[cfg(test)]
    pub fn n(&self) -> usize {
        self.n
    }

    /// Inner dimension.
    #[cfg(test)]
    pub fn k(&self) -> usize {
        self.k
    }

    /// Whether the panels are kept quantized.
    #[cfg(test)]
    pub fn is_quantized(&self) -> bool {
        !matches!(self.data, Data::F32(_))
    }

    /// Whether two packed matrices hold the same values, bit for bit, once
    /// dequantized.
    #[cfg(test)]
    pub fn same_bits(&self, other: &Packed) -> bool {
        match (self.to_f32().data, other.to_f32().data) {
            (Data::F32(a), Data::F32(b)) => {
                (self.n, self.k) == (other.n, other.k)
                    && a.iter().zip(&b).all(|(a, b)| a.to_bits() == b.to_bits())
            }
            _ => unreachable!("to_f32 gives F32"),
        }
    }

    /// Row `r` of `W` (an embedding lookup when `W` is the embedding).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let (p, j) = (r / PANEL, r % PANEL);
        match &self.data {
            Data::F32(v) => {
                let panel = &v[p * self.k * PANEL..][..self.k * PANEL];
                for (o, chunk) in out.iter_mut().zip(panel.chunks_exact(PANEL)) {
                    *o = chunk[j];
                }
            }
            Data::Q41(b) => quant_row(&b[p * self.k / QK..][..self.k / QK], j, out),
            Data::Q80(b) => quant_row(&b[p * self.k / QK..][..self.k / QK], j, out),
        }
    }
}

fn quant_row<B: QBlock>(panel: &[B], j: usize, out: &mut [f32]) {
    for (b, o) in panel.iter().zip(out.chunks_exact_mut(QK)) {
        for (kk, o) in o.iter_mut().enumerate() {
            *o = b.value(kk, j);
        }
    }
}

/// Which kernels run: the scalar ones, AVX2 + FMA (+ F16C for the
/// quantized ones), or those and AVX-512F for the quantized direct kernel.
/// All give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    /// The fastest this CPU runs.
    pub fn best() -> Isa {
        if crate::simd::avx512() {
            Isa::Avx512
        } else if crate::simd::avx2_fma_f16c() {
            Isa::Avx2
        } else {
            Isa::Scalar
        }
    }

    /// Every one this CPU runs, fastest first (for tests that hold them
    /// to the same bits).
    #[cfg(test)]
    pub fn all() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Scalar]
            .into_iter()
            .filter(|&isa| match isa {
                Isa::Avx512 => crate::simd::avx512(),
                Isa::Avx2 => crate::simd::avx2_fma_f16c(),
                Isa::Scalar => true,
            })
            .collect()
    }

    /// Rows up to which a quantized matmul runs the direct kernels (see
    /// [`DIRECT_ROWS`]).
    fn direct_rows(self) -> usize {
        match self {
            Isa::Scalar => 0,
            Isa::Avx2 => DIRECT_ROWS,
            Isa::Avx512 => DIRECT_ROWS_512,
        }
    }
}

/// `y = x · wᵀ`: `x` is `m × k`, `y` is `m × n`, both row-major. See the
/// module docs for why every element is computed the same way whatever `m`.
pub(crate) fn matmul(x: &[f32], m: usize, w: &Packed, y: &mut [f32]) {
    matmul_with(x, m, w, y, Isa::best())
}

/// [`matmul`] on the kernels of `isa`.
pub(crate) fn matmul_with(x: &[f32], m: usize, w: &Packed, y: &mut [f32], isa: Isa) {
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "x is not {m}x{k}");
    assert_eq!(y.len(), m * n, "y is not {m}x{n}");
    if m == 0 {
        return;
    }
    // X in tiles of ROWS rows, each transposed to k × ROWS (rows past m are
    // zero and never read back); for the direct quantized kernels, one tile
    // of all m rows.
    let direct = is_direct(m, w, isa);
    let width = if direct { m } else { ROWS };
    let tiles = m.div_ceil(width);
    let mut xt = vec![0.0f32; tiles * k * width];
    for (i, row) in x.chunks_exact(k).enumerate() {
        let tile = &mut xt[(i / width) * k * width..][..k * width];
        for (kk, &v) in row.iter().enumerate() {
            tile[kk * width + i % width] = v;
        }
    }
    let panels = n / PANEL;
    let per_task = panels.div_ceil(rayon::current_num_threads() * 4).max(1);
    if direct {
        direct_into(&xt, m, w, y, per_task, isa);
        return;
    }
    // Panel-major output: panel p's m × PANEL block at p*m*PANEL (for one
    // row, that is `y` itself; the kernels write every output, so it need
    // not be zero).
    let mut yp = if m == 1 {
        Vec::new()
    } else {
        vec![0.0f32; m * n]
    };
    let yp_out = if m == 1 { &mut *y } else { &mut yp[..] };
    let out = yp_out.par_chunks_mut(per_task * m * PANEL);
    let xt = &xt;
    match &w.data {
        Data::F32(v) => out
            .zip(v.par_chunks(per_task * k * PANEL))
            .for_each(|(out, wp)| panels_entry(xt, m, k, wp, out, isa)),
        Data::Q41(b) => out
            .zip(b.par_chunks(per_task * k / QK))
            .for_each(|(out, wp)| quant_entry(xt, m, k, wp, out, isa)),
        Data::Q80(b) => out
            .zip(b.par_chunks(per_task * k / QK))
            .for_each(|(out, wp)| quant_entry(xt, m, k, wp, out, isa)),
    }
    if m == 1 {
        return;
    }
    for (p, block) in yp.chunks_exact(m * PANEL).enumerate() {
        for (i, r) in block.chunks_exact(PANEL).enumerate() {
            y[i * n + p * PANEL..][..PANEL].copy_from_slice(r);
        }
    }
}

/// The direct kernels, each task writing its panels' columns of every row
/// of `y` in place (no panel-major buffer to allocate, fill and transpose:
/// 1.5 MB for the logits of 8 rows).
fn direct_into(xt: &[f32], m: usize, w: &Packed, y: &mut [f32], per_task: usize, isa: Isa) {
    let k = w.k;
    let mut segments = row_segments(y, w.n, m, per_task * PANEL);
    let tasks = segments.par_chunks_mut(m);
    match &w.data {
        Data::Q41(b) => tasks
            .zip(b.par_chunks(per_task * k / QK))
            .for_each(|(out, wp)| direct_entry(xt, m, k, wp, out, isa)),
        Data::Q80(b) => tasks
            .zip(b.par_chunks(per_task * k / QK))
            .for_each(|(out, wp)| direct_entry(xt, m, k, wp, out, isa)),
        Data::F32(_) => unreachable!("F32 weights have no direct kernel"),
    }
}

/// `y` (`m` rows of `n`) cut in stretches of `cols` columns: task `t`'s
/// stretch of row `r` at `t × m + r`, so that `par_chunks_mut(m)` hands
/// each task its columns of every row.
fn row_segments(y: &mut [f32], n: usize, m: usize, cols: usize) -> Vec<&mut [f32]> {
    let mut rows: Vec<_> = y.chunks_exact_mut(n).map(|r| r.chunks_mut(cols)).collect();
    let tasks = n.div_ceil(cols);
    let mut segments = Vec::with_capacity(tasks * m);
    for _ in 0..tasks {
        segments.extend(
            rows.iter_mut()
                .map(|r| r.next().expect("a stretch per task")),
        );
    }
    segments
}

/// The direct kernel of `isa` over the panels in `wp`, into `out` (this
/// task's stretch of each row).
fn direct_entry<B: quant::Kernel>(
    xt: &[f32],
    m: usize,
    k: usize,
    wp: &[B],
    out: &mut [&mut [f32]],
    isa: Isa,
) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `direct_512` needs AVX-512F, AVX2, FMA and F16C, which
        // `Isa::best` confirmed.
        Isa::Avx512 => unsafe { direct_512(xt, m, k, wp, out) },
        // SAFETY: `direct_avx2` needs AVX2, FMA and F16C, which `Isa::best`
        // confirmed.
        Isa::Avx2 => unsafe { direct_avx2(xt, m, k, wp, out) },
        Isa::Scalar => unreachable!("the scalar ISA has no direct kernel"),
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!(
        "{isa:?} has no direct kernel here ({m}x{k}, {} blocks, {} rows)",
        wp.len(),
        out.len()
    )
}

/// A panel's `R × PANEL` outputs (`tile`) into the rows' stretches, at
/// panel `pi` of the stretch.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn scatter(tile: &[f32], pi: usize, out: &mut [&mut [f32]]) {
    for (row, t) in out.iter_mut().zip(tile.chunks_exact(PANEL)) {
        row[pi * PANEL..][..PANEL].copy_from_slice(t);
    }
}

/// [`panels`], with AVX2 and FMA where asked (same results; see `simd`).
fn panels_entry(xt: &[f32], m: usize, k: usize, wp: &[f32], out: &mut [f32], isa: Isa) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        #[target_feature(enable = "avx2,fma")]
        fn fast(xt: &[f32], m: usize, k: usize, wp: &[f32], out: &mut [f32]) {
            panels(xt, m, k, wp, out)
        }
        // SAFETY: `fast` needs AVX2 and FMA, which `Isa::best` confirmed
        // for every ISA but the scalar one.
        unsafe { fast(xt, m, k, wp, out) };
        return;
    }
    let _ = isa;
    panels(xt, m, k, wp, out)
}

/// Rows up to which the quantized kernel dequantizes each `k` step in
/// registers, straight into the FMAs; past it, it dequantizes a panel's
/// `k` block once into L1 and runs the F32 tiles over it.
const DIRECT_ROWS: usize = 8;
/// [`DIRECT_ROWS`] with AVX-512: its 32 registers hold an accumulator for
/// each of 12 rows beside the dequantizing ones (measured here: from 14
/// rows on, LLVM spills and the kernel runs at half speed).
const DIRECT_ROWS_512: usize = 12;
/// Rows up to which the AVX2 direct kernel takes the whole panel (16
/// columns, `2R` accumulators) at once; past it, one half at a time (`R`
/// accumulators), which leaves room for the dequantizing registers.
/// (Measured here, one core: at 4 rows whole 61 GFLOP/s, halves 55; at 8
/// rows halves 72, against 57 through the L1 scratch.)
#[cfg(target_arch = "x86_64")]
const WHOLE_PANEL_ROWS: usize = 4;

/// Whether [`quant_entry`] runs the direct kernels (which read `X` as one
/// tile of all `m` rows).
fn is_direct(m: usize, w: &Packed, isa: Isa) -> bool {
    !matches!(w.data, Data::F32(_)) && m <= isa.direct_rows()
}

/// The quantized panels in `wp` against all rows through the L1 scratch,
/// into the panel-major `out`.
fn quant_entry<B: quant::Kernel>(
    xt: &[f32],
    m: usize,
    k: usize,
    wp: &[B],
    out: &mut [f32],
    isa: Isa,
) {
    #[cfg(target_arch = "x86_64")]
    if isa != Isa::Scalar {
        // SAFETY: `quant_fast` needs AVX2, FMA and F16C, which `Isa::best`
        // confirmed for every ISA but the scalar one.
        unsafe { quant_fast(xt, m, k, wp, out) };
        return;
    }
    let _ = isa;
    quant_panels(xt, m, k, wp, out, |blocks, scratch| {
        for (b, s) in blocks.iter().zip(scratch.chunks_exact_mut(QK * PANEL)) {
            b.dequant(s);
        }
    })
}

/// The panels through the L1 scratch, dequantized with AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn quant_fast<B: quant::Kernel>(xt: &[f32], m: usize, k: usize, wp: &[B], out: &mut [f32]) {
    quant_panels(xt, m, k, wp, out, |blocks, scratch| {
        quant::avx2::dequant(blocks, scratch)
    })
}

/// The panels against all `m` rows (at most [`DIRECT_ROWS`]) with the
/// AVX2 direct kernels.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn direct_avx2<B: quant::Kernel>(xt: &[f32], m: usize, k: usize, wp: &[B], out: &mut [&mut [f32]]) {
    let mut tile = [0.0f32; DIRECT_ROWS * PANEL];
    for (pi, panel) in wp.chunks_exact(k / QK).enumerate() {
        direct_rows(xt, m, panel, &mut tile[..m * PANEL]);
        scatter(&tile[..m * PANEL], pi, out);
    }
}

/// The panels against all `m` rows (at most [`DIRECT_ROWS_512`]) with the
/// AVX-512 direct kernel.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma,f16c")]
fn direct_512<B: quant::Kernel>(xt: &[f32], m: usize, k: usize, wp: &[B], out: &mut [&mut [f32]]) {
    use quant::avx512::direct;
    let mut tile = [0.0f32; DIRECT_ROWS_512 * PANEL];
    for (pi, panel) in wp.chunks_exact(k / QK).enumerate() {
        let o = &mut tile[..m * PANEL];
        match m {
            12 => direct::<B, 12>(xt, panel, o),
            11 => direct::<B, 11>(xt, panel, o),
            10 => direct::<B, 10>(xt, panel, o),
            9 => direct::<B, 9>(xt, panel, o),
            8 => direct::<B, 8>(xt, panel, o),
            7 => direct::<B, 7>(xt, panel, o),
            6 => direct::<B, 6>(xt, panel, o),
            5 => direct::<B, 5>(xt, panel, o),
            4 => direct::<B, 4>(xt, panel, o),
            3 => direct::<B, 3>(xt, panel, o),
            2 => direct::<B, 2>(xt, panel, o),
            _ => direct::<B, 1>(xt, panel, o),
        }
        scatter(o, pi, out);
    }
}

/// One panel against `m` (at most [`DIRECT_ROWS`]) rows, dequantized in
/// registers.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
fn direct_rows<B: quant::Kernel>(xt: &[f32], m: usize, panel: &[B], o: &mut [f32]) {
    use quant::avx2::{direct, direct_halves};
    if m <= WHOLE_PANEL_ROWS {
        match m {
            4 => direct::<B, 4>(xt, panel, o),
            3 => direct::<B, 3>(xt, panel, o),
            2 => direct::<B, 2>(xt, panel, o),
            _ => direct::<B, 1>(xt, panel, o),
        }
        return;
    }
    match m {
        8 => direct_halves::<B, 8>(xt, panel, o),
        7 => direct_halves::<B, 7>(xt, panel, o),
        6 => direct_halves::<B, 6>(xt, panel, o),
        5 => direct_halves::<B, 5>(xt, panel, o),
        4 => direct_halves::<B, 4>(xt, panel, o),
        3 => direct_halves::<B, 3>(xt, panel, o),
        2 => direct_halves::<B, 2>(xt, panel, o),
        _ => direct_halves::<B, 1>(xt, panel, o),
    }
}

/// Each panel of `wp`, a `k` block at a time: `dequant` writes the block's
/// F32 values into an L1 scratch, which every tile of rows then meets as
/// the F32 path would.
#[inline(always)]
fn quant_panels<B: QBlock>(
    xt: &[f32],
    m: usize,
    k: usize,
    wp: &[B],
    out: &mut [f32],
    mut dequant: impl FnMut(&[B], &mut [f32]),
) {
    let mut scratch = [0.0f32; K_BLOCK * PANEL];
    for (panel, o) in wp.chunks_exact(k / QK).zip(out.chunks_exact_mut(m * PANEL)) {
        let mut k0 = 0;
        while k0 < k {
            let k1 = (k0 + K_BLOCK).min(k);
            let wb = &mut scratch[..(k1 - k0) * PANEL];
            dequant(&panel[k0 / QK..k1 / QK], wb);
            tiles(xt, m, k, k0, k1, wb, o);
            k0 = k1;
        }
    }
}

/// Rows of `k` per block: a panel's block (12 KiB) stays in L1 while every
/// tile of `X` passes it.
const K_BLOCK: usize = 192;

/// All rows against the panels in `wp`, into the panel-major `out`.
#[inline(always)]
fn panels(xt: &[f32], m: usize, k: usize, wp: &[f32], out: &mut [f32]) {
    for (panel, o) in wp
        .chunks_exact(k * PANEL)
        .zip(out.chunks_exact_mut(m * PANEL))
    {
        let mut k0 = 0;
        while k0 < k {
            let k1 = (k0 + K_BLOCK).min(k);
            tiles(xt, m, k, k0, k1, &panel[k0 * PANEL..k1 * PANEL], o);
            k0 = k1;
        }
    }
}

/// Every tile of rows against one panel's block `k0..k1` (`wb`, `(k1 -
/// k0) × PANEL`), continuing the sums in `o` (the panel's `m × PANEL`).
#[inline(always)]
fn tiles(xt: &[f32], m: usize, k: usize, k0: usize, k1: usize, wb: &[f32], o: &mut [f32]) {
    for (t, tile) in xt.chunks_exact(k * ROWS).enumerate() {
        let rows = (m - t * ROWS).min(ROWS);
        let xb = &tile[k0 * ROWS..k1 * ROWS];
        let o = &mut o[t * ROWS * PANEL..][..rows * PANEL];
        let first = k0 == 0;
        match rows {
            6 => tile_kernel::<6>(xb, wb, o, first),
            5 => tile_kernel::<5>(xb, wb, o, first),
            4 => tile_kernel::<4>(xb, wb, o, first),
            3 => tile_kernel::<3>(xb, wb, o, first),
            2 => tile_kernel::<2>(xb, wb, o, first),
            _ => tile_kernel::<1>(xb, wb, o, first),
        }
    }
}

/// `R` rows of a transposed tile block (`kb × ROWS`) times one panel block
/// (`kb × PANEL`) into `out` (`R × PANEL`): from zero on the first block,
/// else continuing the sums already in `out`. Each element is one in-order
/// FMA chain over the whole of `k` (a chain paused in memory between
/// blocks is the same chain: `f32` in a register is `f32` in memory).
#[inline(always)]
fn tile_kernel<const R: usize>(tile: &[f32], panel: &[f32], out: &mut [f32], first: bool) {
    let mut acc = [[0.0f32; PANEL]; R];
    if !first {
        for (a, o) in acc.iter_mut().zip(out.chunks_exact(PANEL)) {
            a.copy_from_slice(o);
        }
    }
    for (xs, ws) in tile.chunks_exact(ROWS).zip(panel.chunks_exact(PANEL)) {
        let ws: &[f32; PANEL] = ws.try_into().expect("a panel row");
        for r in 0..R {
            let a = xs[r];
            for j in 0..PANEL {
                acc[r][j] = a.mul_add(ws[j], acc[r][j]);
            }
        }
    }
    for (o, a) in out.chunks_exact_mut(PANEL).zip(&acc) {
        o.copy_from_slice(a);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;

    fn naive(x: &[f32], m: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut y = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f32;
                for kk in 0..k {
                    acc = x[i * k + kk].mul_add(w[j * k + kk], acc);
                }
                y[i * n + j] = acc;
            }
        }
        y
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) % 1000) as f32 / 500.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_in_order_fma_chain_bit_for_bit_for_every_m() {
        let (n, k) = (48, 2 * K_BLOCK + 37);
        let w = values(n * k, 7);
        let packed = Packed::pack(&w, n, k);
        let x = values(13 * k, 3);
        let full = naive(&x, 13, &w, n, k);
        for m in 1..=13 {
            for isa in Isa::all() {
                let mut y = vec![f32::NAN; m * n];
                matmul_with(&x[..m * k], m, &packed, &mut y, isa);
                // Bit-identical to the reference, so identical across batch
                // sizes.
                assert_eq!(y, full[..m * n], "m = {m}, {isa:?}");
            }
        }
    }

    /// A xorshift stream.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        /// An `f16`'s bits: mostly weight-like scales of either sign, and
        /// now and then a zero of either sign or a subnormal.
        fn half(&mut self) -> [u8; 2] {
            let r = self.next();
            let bits: u16 = match r % 16 {
                0 => 0x0000,
                1 => 0x8000,
                2 => (r >> 8) as u16 & 0x83FF,
                // Exponent fields 0 ..= 15 (subnormals, 2^-14 ..= 2^0),
                // either sign.
                _ => ((r >> 8) as u16 & 0x83FF) | ((((r >> 20) % 16) as u16) << 10),
            };
            bits.to_le_bytes()
        }
    }

    /// Random GGUF blocks of `dtype` for an `n × k` matrix.
    fn random_blocks(dtype: GgmlDType, n: usize, k: usize, rng: &mut Rng) -> Vec<u8> {
        let mut raw = Vec::new();
        for _ in 0..n * k / QK {
            match dtype {
                GgmlDType::Q4_1 => {
                    raw.extend_from_slice(&rng.half());
                    raw.extend_from_slice(&rng.half());
                    raw.extend((0..16).map(|_| rng.next() as u8));
                }
                GgmlDType::Q8_0 => {
                    raw.extend_from_slice(&rng.half());
                    raw.extend((0..QK).map(|_| rng.next() as u8));
                }
                _ => unreachable!(),
            }
        }
        raw
    }

    #[test]
    fn quantized_kernels_equal_the_f32_kernel_on_candles_values_bit_for_bit() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        // 40 panels: tasks of several panels, so the direct kernel runs
        // panels side by side and one by one.
        let (n, k) = (40 * PANEL, 2 * K_BLOCK + 3 * QK);
        let x = values(70 * k, 5);
        for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
            let raw = random_blocks(dtype, n, k, &mut rng);
            let f32_values = crate::quant::candle_dequant(dtype, &raw, n, k);
            let reference = Packed::pack(&f32_values, n, k);
            let q = match dtype {
                GgmlDType::Q4_1 => Packed::pack_q4_1(&raw, n, k),
                _ => Packed::pack_q8_0(&raw, n, k),
            };
            // The values themselves, and a row lookup.
            match (&q.to_f32().data, &reference.data) {
                (Data::F32(a), Data::F32(b)) => assert!(
                    a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{dtype:?}: dequantized values differ"
                ),
                _ => unreachable!(),
            }
            let mut row = vec![0.0; k];
            q.row(21, &mut row);
            assert!(row
                .iter()
                .zip(&f32_values[21 * k..])
                .all(|(a, b)| a.to_bits() == b.to_bits()));
            // Every path (direct, through the scratch; SIMD and scalar) at
            // every m against the F32 kernel.
            for m in (1..=17).chain([31, 70]) {
                let x = &x[..m * k];
                let mut want = vec![0.0; m * n];
                matmul_with(x, m, &reference, &mut want, Isa::Scalar);
                for isa in Isa::all() {
                    // NaN: every output is written, whatever was there.
                    let mut got = vec![f32::NAN; m * n];
                    matmul_with(x, m, &q, &mut got, isa);
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dtype:?}, m = {m}, {isa:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn concat_and_row_lookup() {
        let (k, n1, n2) = (5, 16, 32);
        let a = values(n1 * k, 1);
        let b = values(n2 * k, 2);
        let fused = Packed::concat(&[Packed::pack(&a, n1, k), Packed::pack(&b, n2, k)]);
        let mut row = vec![0.0; k];
        fused.row(3, &mut row);
        assert_eq!(row, a[3 * k..4 * k]);
        fused.row(n1 + 20, &mut row);
        assert_eq!(row, b[20 * k..21 * k]);
    }

    /// CPU time of this process so far (all threads), in seconds.
    fn cpu_seconds() -> f64 {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return f64::NAN;
        };
        let nanos: u64 = tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("schedstat")).ok())
            .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
            .sum();
        nanos as f64 * 1e-9
    }

    /// GFLOP per CPU-second of the quantized kernels by rows, on every ISA
    /// this CPU has, and of the F32 kernel on the same values (robust to a
    /// busy machine; with RAYON_NUM_THREADS=1, one core's figures):
    /// `cargo test --release -p engine --lib bench_quant_rows -- --ignored --nocapture`.
    #[test]
    #[ignore = "a benchmark"]
    fn bench_quant_rows() {
        let mut rng = Rng(7);
        let shapes = [
            ("down", GgmlDType::Q4_1, 576, 1536),
            ("gate_up/4", GgmlDType::Q4_1, 768, 576),
            ("lm_head/8", GgmlDType::Q8_0, 6144, 576),
        ];
        println!("threads: {}", rayon::current_num_threads());
        for (name, dtype, n, k) in shapes {
            let raw = random_blocks(dtype, n, k, &mut rng);
            let q = match dtype {
                GgmlDType::Q4_1 => Packed::pack_q4_1(&raw, n, k),
                _ => Packed::pack_q8_0(&raw, n, k),
            };
            let f = q.to_f32();
            let runs = Isa::all()
                .into_iter()
                .filter(|&isa| isa != Isa::Scalar)
                .map(|isa| (format!("{name} {isa:?}"), &q, isa))
                .chain([("  as F32".to_string(), &f, Isa::best())]);
            for (label, w, isa) in runs {
                let mut line = format!("{label:18}");
                for m in [1, 2, 4, 6, 8, 10, 12, 14, 16, 32] {
                    let x = values(m * k, 1);
                    let mut y = vec![0.0; m * n];
                    let reps = (3e8 / (m * n * k) as f64).ceil() as usize;
                    let mut best = 0.0f64;
                    for _ in 0..5 {
                        let c = cpu_seconds();
                        // On a worker of the pool, as the forward pass runs.
                        rayon::scope(|_| {
                            for _ in 0..reps {
                                matmul_with(&x, m, w, &mut y, isa);
                            }
                        });
                        let g = 2.0 * (reps * m * n * k) as f64 / (cpu_seconds() - c) / 1e9;
                        best = best.max(g);
                    }
                    line += &format!(" {m}:{best:5.1}");
                }
                println!("{line}");
            }
        }
    }

    /// Times the quantized kernels against the F32 kernel on the model's
    /// shapes (same values, same bits):
    /// `cargo test --release -p engine --lib bench_matmul -- --ignored --nocapture`.
    #[test]
    #[ignore = "a benchmark"]
    fn bench_matmul() {
        let mut rng = Rng(7);
        // Thirty copies of a layer's matrix, as in the model, so that the
        // weights stream from memory as they do in a forward pass.
        let shapes = [
            ("gate_up", GgmlDType::Q4_1, 3072, 576, 30),
            ("down", GgmlDType::Q4_1, 576, 1536, 30),
            ("lm_head", GgmlDType::Q8_0, 49152, 576, 1),
        ];
        println!("threads: {}", rayon::current_num_threads());
        for (name, dtype, n, k, copies) in shapes {
            let q: Vec<Packed> = (0..copies)
                .map(|_| {
                    let raw = random_blocks(dtype, n, k, &mut rng);
                    match dtype {
                        GgmlDType::Q4_1 => Packed::pack_q4_1(&raw, n, k),
                        _ => Packed::pack_q8_0(&raw, n, k),
                    }
                })
                .collect();
            let f: Vec<Packed> = q.iter().map(Packed::to_f32).collect();
            for m in [1, 2, 4, 6, 8, 12, 64] {
                if name == "lm_head" && m > 8 {
                    continue;
                }
                let x = values(m * k, 1);
                let mut y = vec![0.0; m * n];
                // Each ~0.1 s of repetitions, F32 and quantized taking
                // turns; the best of seven each (the machine is shared).
                let reps = (1e8 / (m * n * k) as f64).ceil() as usize;
                let mut time = |ws: &[Packed]| {
                    let t = std::time::Instant::now();
                    for r in 0..reps {
                        matmul(&x, m, &ws[r % ws.len()], &mut y);
                    }
                    t.elapsed().as_secs_f64() / reps as f64
                };
                let (mut tf, mut tq) = (f64::INFINITY, f64::INFINITY);
                for _ in 0..7 {
                    tf = tf.min(time(&f));
                    tq = tq.min(time(&q));
                }
                let gflops = |t: f64| 2.0 * (m * n * k) as f64 / t / 1e9;
                println!(
                    "{name:8} {n:5}x{k:4} m={m:3}: F32 {:8.1} us {:6.1} GFLOP/s | {dtype:?} {:8.1} us {:6.1} GFLOP/s | x{:.2}",
                    tf * 1e6,
                    gflops(tf),
                    tq * 1e6,
                    gflops(tq),
                    tf / tq
                );
            }
        }
    }
}
