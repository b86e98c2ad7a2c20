//! The one matrix multiply of the forward pass: `Y = X · Wᵀ` over F32, for
//! activations `X` (`m × k`, row-major) and a weight `W` (`n × k`) packed
//! once at load.
//!
//! # Batch invariance
//!
//! Every output element `Y[i][j]` is one chain of fused multiply-adds over
//! `k`, in order, starting from zero — the same chain whatever `m` is,
//! whichever rows share a tile, and whichever thread runs it. So a token's
//! hidden state does not depend on what else is in the batch: a prompt
//! computed in one prefill, in chunks, or token by token in decode gives
//! bit-identical KV and logits. That is what lets a cached prefix (computed
//! by another request, in another batch) replace recomputation without
//! changing a single output token. BLAS-style kernels (gemm included) pick
//! different code paths and blockings by `m` and lose this.
//!
//! # Kernel
//!
//! `W` is packed in panels of [`PANEL`] output columns, each panel `k ×
//! PANEL` contiguous. A tile of up to [`ROWS`] rows of `X` (transposed to
//! `k × rows`) meets one panel in an outer-product loop: for each `k`,
//! broadcast one `X` value per row and FMA it with the panel's 16-wide row
//! into `rows × 16` accumulators (12 AVX2 registers at 6 rows), `k` in
//! blocks that keep a panel's block in L1 (a sum paused between blocks
//! continues the same chain). Threads
//! split the panels; each writes its own panel-major output, transposed
//! into `Y` at the end.

use rayon::prelude::*;

/// Output columns per packed panel.
pub(crate) const PANEL: usize = 16;
/// Rows of `X` per register tile.
const ROWS: usize = 6;

/// A weight matrix `W` (`n × k`) packed for [`matmul`].
pub(crate) struct Packed {
    n: usize,
    k: usize,
    /// Panel `p` is `data[p*k*PANEL..][..k*PANEL]`, element `(kk, j)` at
    /// `kk*PANEL + j` holding `W[p*PANEL + j][kk]`.
    data: Vec<f32>,
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Packed({}x{})", self.n, self.k)
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
        Packed { n, k, data }
    }

    /// The matrices stacked by output columns (`[A; B; ...]`), for fused
    /// projections; all must share `k`.
    pub fn concat(parts: &[Packed]) -> Packed {
        let k = parts[0].k;
        assert!(parts.iter().all(|p| p.k == k), "fused weights differ in k");
        Packed {
            n: parts.iter().map(|p| p.n).sum(),
            k,
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
        }
    }

    /// Row `r` of `W` (an embedding lookup when `W` is the embedding).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let panel = &self.data[(r / PANEL) * self.k * PANEL..][..self.k * PANEL];
        for (o, chunk) in out.iter_mut().zip(panel.chunks_exact(PANEL)) {
            *o = chunk[r % PANEL];
        }
    }
}

/// `y = x · wᵀ`: `x` is `m × k`, `y` is `m × n`, both row-major. See the
/// module docs for why every element is computed the same way whatever `m`.
pub(crate) fn matmul(x: &[f32], m: usize, w: &Packed, y: &mut [f32]) {
    let (n, k) = (w.n, w.k);
    assert_eq!(x.len(), m * k, "x is not {m}x{k}");
    assert_eq!(y.len(), m * n, "y is not {m}x{n}");
    if m == 0 {
        return;
    }
    // X in tiles of ROWS rows, each transposed to k × ROWS (rows past m are
    // zero and never read back).
    let tiles = m.div_ceil(ROWS);
    let mut xt = vec![0.0f32; tiles * k * ROWS];
    for (i, row) in x.chunks_exact(k).enumerate() {
        let tile = &mut xt[(i / ROWS) * k * ROWS..][..k * ROWS];
        for (kk, &v) in row.iter().enumerate() {
            tile[kk * ROWS + i % ROWS] = v;
        }
    }
    // Panel-major output: panel p's m × PANEL block at p*m*PANEL.
    let panels = n / PANEL;
    let mut yp = vec![0.0f32; m * n];
    let per_task = panels.div_ceil(rayon::current_num_threads() * 4).max(1);
    yp.par_chunks_mut(per_task * m * PANEL)
        .zip(w.data.par_chunks(per_task * k * PANEL))
        .for_each(|(out, wp)| panels_entry(&xt, m, k, wp, out));
    for (p, block) in yp.chunks_exact(m * PANEL).enumerate() {
        for (i, r) in block.chunks_exact(PANEL).enumerate() {
            y[i * n + p * PANEL..][..PANEL].copy_from_slice(r);
        }
    }
}

/// [`panels`], with AVX2 and FMA where the CPU has them (same results; see
/// `simd`).
fn panels_entry(xt: &[f32], m: usize, k: usize, wp: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        fn fast(xt: &[f32], m: usize, k: usize, wp: &[f32], out: &mut [f32]) {
            panels(xt, m, k, wp, out)
        }
        // SAFETY: `fast` needs AVX2 and FMA, which `avx2_fma` confirmed.
        unsafe { fast(xt, m, k, wp, out) };
        return;
    }
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
            let wb = &panel[k0 * PANEL..k1 * PANEL];
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
            k0 = k1;
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
            let mut y = vec![0.0; m * n];
            matmul(&x[..m * k], m, &packed, &mut y);
            // Bit-identical to the reference, so identical across batch sizes.
            assert_eq!(y, full[..m * n], "m = {m}");
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
}
