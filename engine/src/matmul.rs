//! The one matrix multiply of the forward pass: `Y = X · Wᵀ` over F32, for
//! activations `X` (`m × k`, row-major) and a weight `W` (`n × k`) packed
//! once at load, in F32 or kept in the file's Q4_1 / Q8_0 blocks.
//!
//! # Batch invariance
//!
//! Every output element `Y[i][j]` is computed the same way whatever `m`
//! is, whichever rows share a tile, which kernel path runs, and whichever
//! thread runs it. So a token's hidden state does not depend on what else
//! is in the batch: a prompt computed in one prefill, in chunks, or token
//! by token in decode gives bit-identical KV and logits. That is what lets
//! a cached prefix (computed by another request, in another batch) replace
//! recomputation without changing a single output token. BLAS-style
//! kernels (gemm included) pick different code paths and blockings by `m`
//! and lose this.
//!
//! # F32 weights
//!
//! With F32 weights each element is one chain of fused multiply-adds over
//! `k`, in order, starting from zero. `W` is packed in panels of [`PANEL`]
//! output columns. A tile of up to [`ROWS`] rows of `X` (transposed to `k
//! × rows`) meets one panel in an outer-product loop: for each `k`,
//! broadcast one `X` value per row and FMA it with the panel's 16-wide row
//! into `rows × 16` accumulators (12 AVX2 registers at 6 rows), `k` in
//! blocks that keep a panel's block in L1 (a sum paused between blocks
//! continues the same chain). Threads split the panels; each writes its
//! own panel-major output, transposed into `Y` at the end.
//!
//! # Quantized weights
//!
//! Q4_1 and Q8_0 panels (see `quant`) multiply rows of `X` quantized to 8
//! bits per block of 32, llama.cpp's way: per block an exact integer dot
//! product, then a fixed `f32` fix-up with the scales, the blocks in
//! order. Each row is quantized by itself, integer sums are exact in any
//! order, and the fix-ups are the same on every path, so the invariance
//! holds here too (it is not the F32 weights' arithmetic, nor meant to
//! be). Threads split the panels; each runs its panels against tiles of up
//! to [`QROWS`] rows (the quantized rows regrouped by `quant::QTiles` so a
//! tile's activations for a block sit together; a block's bytes are loaded
//! and unpacked once per tile, and each row costs 8 `vpdpbusd`s a block
//! where the F32 path needs 32 FMAs), writing its columns of `Y` in place.

#[cfg(test)]
use crate::quant::QRows;
use crate::quant::{self, QBlock, QTiles, Tile, Q41, Q80, QK};
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

/// Which kernels run: the scalar ones; AVX2 + FMA (the F32 kernel, and
/// the quantized one on `vpmaddubsw`); or the AVX-512 VNNI quantized kernel
/// (with the AVX2 F32 one). All give the same bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    Scalar,
    Avx2,
    Avx512,
}

impl Isa {
    /// The fastest this CPU runs.
    pub fn best() -> Isa {
        if crate::simd::avx512_vnni() {
            Isa::Avx512
        } else if crate::simd::avx2_fma() {
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
                Isa::Avx512 => crate::simd::avx512_vnni(),
                Isa::Avx2 => crate::simd::avx2_fma(),
                Isa::Scalar => true,
            })
            .collect()
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
    let panels = n / PANEL;
    let per_task = panels.div_ceil(rayon::current_num_threads() * 4).max(1);
    match &w.data {
        Data::F32(v) => f32_matmul(x, m, n, k, v, y, per_task, isa),
        Data::Q41(b) => quant_matmul(x, n, k, b, y.chunks_exact_mut(n).collect(), per_task, isa),
        Data::Q80(b) => quant_matmul(x, n, k, b, y.chunks_exact_mut(n).collect(), per_task, isa),
    }
}

/// [`matmul`] into rows that need not be contiguous (`ys[i]`, `n` long, is
/// row `i` of `y`): the logits, each straight into the buffer it is
/// returned in (not 200 KB a row to fill, then copy out).
pub(crate) fn matmul_rows(x: &[f32], w: &Packed, ys: Vec<&mut [f32]>) {
    let (n, k, m) = (w.n, w.k, ys.len());
    assert_eq!(x.len(), m * k, "x is not {m}x{k}");
    assert!(ys.iter().all(|r| r.len() == n), "a row is not {n} long");
    if m == 0 {
        return;
    }
    let isa = Isa::best();
    let per_task = (n / PANEL)
        .div_ceil(rayon::current_num_threads() * 4)
        .max(1);
    match &w.data {
        Data::F32(_) => {
            let mut y = vec![0.0; m * n];
            matmul_with(x, m, w, &mut y, isa);
            for (r, o) in ys.into_iter().zip(y.chunks_exact(n)) {
                r.copy_from_slice(o);
            }
        }
        Data::Q41(b) => quant_matmul(x, n, k, b, ys, per_task, isa),
        Data::Q80(b) => quant_matmul(x, n, k, b, ys, per_task, isa),
    }
}

/// The F32 kernel: `X` in tiles of [`ROWS`] rows, each transposed to `k ×
/// ROWS` (rows past `m` are zero and never read back), against the panels.
#[allow(clippy::too_many_arguments)]
fn f32_matmul(
    x: &[f32],
    m: usize,
    n: usize,
    k: usize,
    v: &[f32],
    y: &mut [f32],
    per_task: usize,
    isa: Isa,
) {
    let tiles = m.div_ceil(ROWS);
    let mut xt = vec![0.0f32; tiles * k * ROWS];
    for (i, row) in x.chunks_exact(k).enumerate() {
        let tile = &mut xt[(i / ROWS) * k * ROWS..][..k * ROWS];
        for (kk, &v) in row.iter().enumerate() {
            tile[kk * ROWS + i % ROWS] = v;
        }
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
    let xt = &xt;
    yp_out
        .par_chunks_mut(per_task * m * PANEL)
        .zip(v.par_chunks(per_task * k * PANEL))
        .for_each(|(out, wp)| panels_entry(xt, m, k, wp, out, isa));
    if m == 1 {
        return;
    }
    for (p, block) in yp.chunks_exact(m * PANEL).enumerate() {
        for (i, r) in block.chunks_exact(PANEL).enumerate() {
            y[i * n + p * PANEL..][..PANEL].copy_from_slice(r);
        }
    }
}

/// The quantized kernels: `X` quantized row by row (see `quant`) and
/// regrouped in tiles of rows, then each task's panels against every tile,
/// written in place into its columns of each row of `Y` (`rows`, `n` long
/// each).
fn quant_matmul<B: quant::Kernel>(
    x: &[f32],
    n: usize,
    k: usize,
    b: &[B],
    rows: Vec<&mut [f32]>,
    per_task: usize,
    isa: Isa,
) {
    let m = rows.len();
    let xq = quant::quantize_rows(x, k, isa == Isa::Avx512);
    let xt = QTiles::new(xq, k, tile_rows(isa));
    let mut segments = row_segments(rows, n, per_task * PANEL);
    let xt = &xt;
    segments
        .par_chunks_mut(m)
        .zip(b.par_chunks(per_task * k / QK))
        .for_each(|(out, wp)| quant_entry(xt, k, wp, out, isa));
}

/// The `m` rows (of `n`) cut in stretches of `cols` columns: task `t`'s
/// stretch of row `r` at `t × m + r`, so that `par_chunks_mut(m)` hands
/// each task its columns of every row.
fn row_segments(rows: Vec<&mut [f32]>, n: usize, cols: usize) -> Vec<&mut [f32]> {
    let m = rows.len();
    let mut rows: Vec<_> = rows.into_iter().map(|r| r.chunks_mut(cols)).collect();
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

/// Rows of `X` per tile of the quantized kernels: each block's bytes are
/// loaded and unpacked once for a tile's rows. The AVX-512 kernel keeps 8
/// rows' sums in its 32 registers (a decode step of 8 sequences is one
/// tile: one pass over weights that stream from memory); AVX2's 16
/// registers hold 4.
const QROWS: usize = 8;

/// Rows per tile on the kernels of `isa`.
fn tile_rows(isa: Isa) -> usize {
    match isa {
        Isa::Avx512 => QROWS,
        Isa::Avx2 | Isa::Scalar => 4,
    }
}

/// The quantized panels in `wp` against every tile of `xt`, into `out`
/// (this task's stretch of each row), on the kernels of `isa`.
fn quant_entry<B: quant::Kernel>(
    xt: &QTiles,
    k: usize,
    wp: &[B],
    out: &mut [&mut [f32]],
    isa: Isa,
) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: `quant_512` needs AVX-512F, BW and VNNI, AVX2, FMA and
        // F16C, which `Isa::best` confirmed.
        Isa::Avx512 => return unsafe { quant_512(xt, k, wp, out) },
        // SAFETY: `quant_avx2` needs AVX2 and FMA, which `Isa::best`
        // confirmed.
        Isa::Avx2 => return unsafe { quant_avx2(xt, k, wp, out) },
        Isa::Scalar => {}
    }
    let _ = isa;
    quant_panels(xt, k, wp, out, quant::dot_tile)
}

/// The AVX2 kernel, a tile of up to 4 rows at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn quant_avx2<B: quant::Kernel>(xt: &QTiles, k: usize, wp: &[B], out: &mut [&mut [f32]]) {
    use quant::avx2::dot_tile;
    quant_panels(xt, k, wp, out, |x, wp, nb, o| match x.rows {
        4 => dot_tile::<B, 4>(x, wp, nb, o),
        3 => dot_tile::<B, 3>(x, wp, nb, o),
        2 => dot_tile::<B, 2>(x, wp, nb, o),
        _ => dot_tile::<B, 1>(x, wp, nb, o),
    })
}

/// The AVX-512 VNNI kernel, a tile of up to [`QROWS`] rows at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx2,fma,f16c")]
fn quant_512<B: quant::Kernel>(xt: &QTiles, k: usize, wp: &[B], out: &mut [&mut [f32]]) {
    use quant::avx512::dot_tile;
    quant_panels(xt, k, wp, out, |x, wp, nb, o| match x.rows {
        8 => dot_tile::<B, 8>(x, wp, nb, o),
        7 => dot_tile::<B, 7>(x, wp, nb, o),
        6 => dot_tile::<B, 6>(x, wp, nb, o),
        5 => dot_tile::<B, 5>(x, wp, nb, o),
        4 => dot_tile::<B, 4>(x, wp, nb, o),
        3 => dot_tile::<B, 3>(x, wp, nb, o),
        2 => dot_tile::<B, 2>(x, wp, nb, o),
        _ => dot_tile::<B, 1>(x, wp, nb, o),
    })
}

/// Each tile of `xt` against all the panels of `wp`: `dot` writes a
/// tile's outputs straight into its rows' stretches in `out`. (One call a
/// tile, not one a panel and tile: a decode step's rows are one tile.)
#[inline(always)]
fn quant_panels<B: QBlock>(
    xt: &QTiles,
    k: usize,
    wp: &[B],
    out: &mut [&mut [f32]],
    mut dot: impl FnMut(&Tile<'_>, &[B], usize, &mut [&mut [f32]]),
) {
    for (r0, x) in xt.tiles() {
        dot(&x, wp, k / QK, &mut out[r0..r0 + x.rows]);
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

    /// The quantized arithmetic of `quant`'s module docs, straight from
    /// the file's blocks (row-major: GGUF block `b` of output `j` at `j ×
    /// k/32 + b`) and the quantized rows: the packed kernels' oracle.
    fn reference_quant(
        dtype: GgmlDType,
        raw: &[u8],
        n: usize,
        k: usize,
        x: &QRows,
        m: usize,
    ) -> Vec<f32> {
        let nb = k / QK;
        let half = |b: &[u8], at: usize| quant::f16_to_f32(u16::from_le_bytes([b[at], b[at + 1]]));
        let mut y = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0.0f32;
                for b in 0..nb {
                    let xb = i * nb + b;
                    let xq = &x.q[xb * QK..][..QK];
                    match dtype {
                        GgmlDType::Q4_1 => {
                            let blk = &raw[(j * nb + b) * 20..][..20];
                            let sumi: i32 = (0..QK)
                                .map(|kk| {
                                    let byte = blk[4 + kk % 16];
                                    let q = if kk < 16 { byte & 0x0F } else { byte >> 4 };
                                    i32::from(q) * i32::from(xq[kk])
                                })
                                .sum();
                            acc = half(blk, 0).mul_add(sumi as f32 * x.d[xb], acc);
                            acc = half(blk, 2).mul_add(x.s[xb], acc);
                        }
                        _ => {
                            let blk = &raw[(j * nb + b) * 34..][..34];
                            let sumi: i32 = (0..QK)
                                .map(|kk| i32::from(blk[2 + kk] as i8) * i32::from(xq[kk]))
                                .sum();
                            acc = half(blk, 0).mul_add(sumi as f32 * x.d[xb], acc);
                        }
                    }
                }
                y[i * n + j] = acc;
            }
        }
        y
    }

    #[test]
    fn quantized_kernels_equal_the_reference_bit_for_bit_and_near_the_f32_product() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        // 40 panels: tasks of several panels.
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
            let xq = quant::quantize_rows(&x, k, false);
            let want_all = reference_quant(dtype, &raw, n, k, &xq, 70);
            // Every path (one tile, several, a part tile; SIMD and scalar)
            // at every m against the reference: a row's outputs are the
            // same bits whatever the batch.
            for m in (1..=17).chain([31, 70]) {
                let x = &x[..m * k];
                let want = &want_all[..m * n];
                for isa in Isa::all() {
                    // NaN: every output is written, whatever was there.
                    let mut got = vec![f32::NAN; m * n];
                    matmul_with(x, m, &q, &mut got, isa);
                    assert!(
                        got.iter()
                            .zip(want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dtype:?}, m = {m}, {isa:?}"
                    );
                }
            }
            // And near the exact product of the same weights: 8-bit
            // activations are off by at most half a step (1/254 of the
            // block's largest) each.
            let mut exact = vec![0.0; 70 * n];
            matmul_with(&x, 70, &reference, &mut exact, Isa::Scalar);
            let bound: Vec<f32> = (0..70 * n)
                .map(|e| {
                    let (i, j) = (e / n, e % n);
                    (0..k)
                        .map(|kk| (f32_values[j * k + kk] * x[i * k + kk]).abs())
                        .sum::<f32>()
                })
                .collect();
            for ((a, b), bound) in want_all.iter().zip(&exact).zip(&bound) {
                assert!(
                    (a - b).abs() <= bound / 100.0 + 1e-3,
                    "{dtype:?}: {a} vs {b} (of {bound})"
                );
            }
        }
    }

    /// Every quantized kernel gives each row, in a tile of any height
    /// (1 to 9 rows: every tile kernel, and a tile and a part), the bits
    /// it gives that row alone, and every ISA the same bits: on random
    /// weights and activations (of every magnitude, zeros included), in
    /// odd shapes (one panel, one block, panels that split unevenly into
    /// tasks, blocks fewer than the prefetch distance or many more).
    #[test]
    fn tiles_of_rows_equal_rows_alone_bit_for_bit_on_every_isa() {
        let mut rng = Rng(0xD1B5_4A32_D192_ED03);
        let shapes = [
            (PANEL, QK),
            (3 * PANEL, 3 * QK),
            (5 * PANEL, 7 * QK),
            (7 * PANEL, 2 * QK),
            (2 * PANEL, 48 * QK),
        ];
        for (n, k) in shapes {
            for dtype in [GgmlDType::Q4_1, GgmlDType::Q8_0] {
                let raw = random_blocks(dtype, n, k, &mut rng);
                let q = match dtype {
                    GgmlDType::Q4_1 => Packed::pack_q4_1(&raw, n, k),
                    _ => Packed::pack_q8_0(&raw, n, k),
                };
                let x: Vec<f32> = (0..9 * k)
                    .map(|i| {
                        let r = rng.next();
                        let v = (r % 20001) as f32 / 10000.0 - 1.0;
                        // A block of zeros now and then.
                        if (i / QK) % 11 == 5 {
                            0.0
                        } else {
                            v * [1e-5, 0.03, 1.0, 40.0][(r >> 32) as usize % 4]
                        }
                    })
                    .collect();
                let mut alone: Option<Vec<f32>> = None;
                for isa in Isa::all() {
                    let mut rows = vec![f32::NAN; 9 * n];
                    for (xr, y) in x.chunks_exact(k).zip(rows.chunks_exact_mut(n)) {
                        matmul_with(xr, 1, &q, y, isa);
                    }
                    let same = |a: &[f32], b: &[f32]| {
                        a.iter().zip(b).all(|(a, b)| a.to_bits() == b.to_bits())
                    };
                    match &alone {
                        None => alone = Some(rows.clone()),
                        Some(first) => assert!(
                            same(first, &rows),
                            "{dtype:?} {n}x{k}: rows alone differ on {isa:?}"
                        ),
                    }
                    for m in 1..=9 {
                        let mut y = vec![f32::NAN; m * n];
                        matmul_with(&x[..m * k], m, &q, &mut y, isa);
                        assert!(
                            same(&y, &rows[..m * n]),
                            "{dtype:?} {n}x{k}, m = {m}, {isa:?}"
                        );
                    }
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
