//! The llama forward pass over a batch of sequence chunks: RMSNorm, RoPE,
//! grouped-query attention over each sequence's pages, SwiGLU.
//!
//! The rows of all chunks go through the matrix multiplies together; each
//! row's attention reads its own sequence's pages (cached blocks in place,
//! and the pages the sequence computed). Every computation here is
//! row-local and in a fixed order (see [`matmul`](crate::matmul) on batch
//! invariance), so a token's results never depend on the batch around it
//! or on whether its prefix came from the cache.

use crate::exp::{exp, exp_sub};
use crate::kv::{KvLayout, PrivatePages};
use crate::matmul::{matmul, matmul_rows};
use crate::model::{Model, MAX_GROUP};
use rayon::prelude::*;

/// One sequence's part of a forward batch.
#[derive(Debug)]
pub(crate) struct Chunk<'a> {
    /// The tokens to run, at positions `start..start + tokens.len()`.
    pub tokens: &'a [u32],
    pub start: usize,
    /// Positions whose KV is already in the pages (cached, or computed in
    /// an earlier step): rows below it are recomputed for their logits
    /// only and do not write KV.
    pub kv_len: usize,
    /// The cached pages, `0..cached.len()`, read in place.
    pub cached: &'a [&'a [f32]],
    /// Pages from `cached.len()` on.
    pub private: &'a mut PrivatePages,
    /// Whether to return the logits of the last token.
    pub logits: bool,
}

/// Rows below which a per-row loop is not worth splitting across threads.
const PAR_ROWS: usize = 8;

/// Runs the chunks; returns, per chunk, the logits of its last token if asked.
pub(crate) fn forward(
    model: &Model,
    layout: &KvLayout,
    chunks: &mut [Chunk<'_>],
) -> Vec<Option<Vec<f32>>> {
    // The whole pass on a worker of the pool: one hand-off per step instead
    // of one per parallel loop (a dozen per layer), and the loops too small
    // to split run inline.
    rayon::scope(|_| forward_in_pool(model, layout, chunks))
}

fn forward_in_pool(
    model: &Model,
    layout: &KvLayout,
    chunks: &mut [Chunk<'_>],
) -> Vec<Option<Vec<f32>>> {
    let c = &model.config;
    let (h, hd, ps) = (c.hidden, c.head_dim, layout.page_size);
    let q_dim = c.heads * hd;
    let kv_dim = c.kv_heads * hd;
    let qkv_dim = q_dim + 2 * kv_dim;
    let rows: Vec<(usize, usize)> = chunks
        .iter()
        .enumerate()
        .flat_map(|(i, ch)| (0..ch.tokens.len()).map(move |r| (i, ch.start + r)))
        .collect();
    let m = rows.len();
    for ch in chunks.iter_mut() {
        debug_assert!(ch.start <= ch.kv_len, "a gap before the chunk");
        debug_assert_eq!(ch.private.first_page(), ch.cached.len());
        let end = ch.start + ch.tokens.len();
        if end > ch.kv_len {
            ch.private.ensure((end - 1) / ps);
        }
    }

    let mut x = vec![0.0f32; m * h];
    let tokens = chunks.iter().flat_map(|ch| ch.tokens.iter());
    for (row, &t) in x.chunks_exact_mut(h).zip(tokens) {
        model.embed.row(t as usize, row);
    }
    let mut hbuf = vec![0.0f32; m * h];
    let mut qkv = vec![0.0f32; m * qkv_dim];
    let mut att = vec![0.0f32; m * q_dim];
    let mut proj = vec![0.0f32; m * h];
    let mut gu = vec![0.0f32; m * 2 * c.ffn];
    let mut act = vec![0.0f32; m * c.ffn];
    let scale = 1.0 / (hd as f32).sqrt();

    for (li, layer) in model.layers.iter().enumerate() {
        rms_norm(&x, &layer.attn_norm, c.rms_eps, &mut hbuf);
        matmul(&hbuf, m, &layer.qkv, &mut qkv);
        qkv.par_chunks_mut(qkv_dim)
            .with_min_len(PAR_ROWS)
            .zip(&rows)
            .for_each(|(r, &(_, pos))| {
                let (q, rest) = r.split_at_mut(q_dim);
                model.rope.apply(q, pos);
                model.rope.apply(&mut rest[..kv_dim], pos);
                // Scaling by 1/√head_dim (a power of two here) is exact.
                q.iter_mut().for_each(|v| *v *= scale);
            });
        // New K and V into the sequences' own pages, the sequences side by
        // side (a decode step's rows are each another sequence's).
        let mut starts = Vec::with_capacity(chunks.len());
        let mut row0 = 0;
        for ch in chunks.iter() {
            starts.push(row0);
            row0 += ch.tokens.len();
        }
        let qkv_ref = &qkv;
        chunks.par_iter_mut().zip(&starts).for_each(|(ch, &row0)| {
            let qkv = qkv_ref;
            for r in 0..ch.tokens.len() {
                let pos = ch.start + r;
                if pos < ch.kv_len {
                    continue;
                }
                let kvrow = &qkv[(row0 + r) * qkv_dim + q_dim..][..2 * kv_dim];
                let (page, slot) = (pos / ps, pos % ps);
                let block = ch.private.page_mut(page);
                for head in 0..c.kv_heads {
                    let k = &kvrow[head * hd..][..hd];
                    let kt = &mut block[layout.k_offset(li, head)..][..hd * ps];
                    for (d, &v) in k.iter().enumerate() {
                        kt[d * ps + slot] = v;
                    }
                    let v = &kvrow[kv_dim + head * hd..][..hd];
                    block[layout.v_offset(li, head) + slot * hd..][..hd].copy_from_slice(v);
                }
            }
        });
        // Attention, row by row and KV head by KV head (the query heads
        // that share it go together, so each page is read once), each row
        // over its own sequence's pages. With too few rows to keep the
        // threads busy (a decode step), query heads go one by one instead:
        // the same arithmetic per head, and the pages a group shares stay
        // in the shared cache between its heads.
        let pages: Vec<Vec<&[f32]>> = chunks
            .iter()
            .map(|ch| {
                let last = ch.start + ch.tokens.len() - 1;
                (0..=last / ps)
                    .map(|p| {
                        if p < ch.cached.len() {
                            ch.cached[p]
                        } else {
                            ch.private.page(p)
                        }
                    })
                    .collect()
            })
            .collect();
        let geom = AttnGeom {
            layout,
            layer: li,
            head_dim: hd,
        };
        let group = c.group();
        let per_task = if m * c.kv_heads >= 4 * rayon::current_num_threads() {
            group
        } else {
            1
        };
        let tasks_per_row = c.heads / per_task;
        let (qkv, rows, pages) = (&qkv, &rows, &pages);
        att.par_chunks_mut(per_task * hd)
            .with_min_len(1)
            .enumerate()
            .for_each(|(i, out)| {
                let (r, head) = (i / tasks_per_row, i % tasks_per_row * per_task);
                let (ch, pos) = rows[r];
                let q = &qkv[r * qkv_dim + head * hd..][..per_task * hd];
                attend_entry(&geom, &pages[ch], head / group, q, pos, out)
            });
        matmul(&att, m, &layer.out, &mut proj);
        add(&mut x, &proj);
        rms_norm(&x, &layer.ffn_norm, c.rms_eps, &mut hbuf);
        matmul(&hbuf, m, &layer.gate_up, &mut gu);
        // (The SiLU's exps are worth splitting at half as many rows.)
        act.par_chunks_mut(c.ffn)
            .with_min_len(PAR_ROWS / 2)
            .zip(gu.par_chunks(2 * c.ffn))
            .for_each(|(a, g)| silu_entry(a, g));
        matmul(&act, m, &layer.down, &mut proj);
        add(&mut x, &proj);
    }

    // Logits of the last row of each chunk that asks.
    let mut wanted = Vec::new();
    let mut row0 = 0;
    for ch in chunks.iter() {
        row0 += ch.tokens.len();
        if ch.logits {
            wanted.push(row0 - 1);
        }
    }
    let mut last = vec![0.0f32; wanted.len() * h];
    for (dst, &r) in last.chunks_exact_mut(h).zip(&wanted) {
        dst.copy_from_slice(&x[r * h..][..h]);
    }
    let mut normed = vec![0.0f32; last.len()];
    rms_norm(&last, &model.output_norm, c.rms_eps, &mut normed);
    let mut logits: Vec<Vec<f32>> = wanted.iter().map(|_| vec![0.0; c.vocab]).collect();
    matmul_rows(
        &normed,
        &model.embed,
        logits.iter_mut().map(|l| &mut l[..]).collect(),
    );
    let mut rows = logits.into_iter();
    chunks
        .iter()
        .map(|ch| ch.logits.then(|| rows.next().expect("one row per chunk")))
        .collect()
}

/// `y = x / rms(x) × w`, row by row, as ggml computes it (sum of squares
/// in f64, then two multiplies).
fn rms_norm(x: &[f32], w: &[f32], eps: f32, y: &mut [f32]) {
    let h = w.len();
    // (Its serial f64 sums are worth splitting at half as many rows.)
    y.par_chunks_mut(h)
        .with_min_len(PAR_ROWS / 2)
        .zip(x.par_chunks(h))
        .for_each(|(y, x)| {
            let sum: f64 = x.iter().map(|&v| f64::from(v * v)).sum();
            let mean = (sum / h as f64) as f32;
            let s = 1.0 / (mean + eps).sqrt();
            for ((y, &x), &w) in y.iter_mut().zip(x).zip(w) {
                *y = (x * s) * w;
            }
        });
}

/// `a = SiLU(gate) × up` for one row (`g` is its gate, then its up), with
/// AVX-512 or AVX2 where the CPU has them (the same divisions and
/// products, so the same results; see `simd`).
fn silu_entry(a: &mut [f32], g: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512_vnni() {
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn fast512(a: &mut [f32], g: &[f32]) {
            silu(a, g)
        }
        // SAFETY: `fast512` needs AVX-512F, AVX2 and FMA, which
        // `avx512_vnni` confirmed.
        return unsafe { fast512(a, g) };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        fn fast(a: &mut [f32], g: &[f32]) {
            silu(a, g)
        }
        // SAFETY: `fast` needs AVX2 and FMA, which `avx2_fma` confirmed.
        return unsafe { fast(a, g) };
    }
    silu(a, g)
}

#[inline(always)]
fn silu(a: &mut [f32], g: &[f32]) {
    // e^-gate first, eight at a time.
    let (gate, up) = g.split_at(a.len());
    for (a, &g) in a.iter_mut().zip(gate) {
        *a = -g;
    }
    exp_sub(a, 0.0);
    for ((a, &g), &u) in a.iter_mut().zip(gate).zip(up) {
        *a = g / (1.0 + *a) * u;
    }
}

fn add(x: &mut [f32], y: &[f32]) {
    for (a, &b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// What the attention of one row needs to find its heads in a block.
struct AttnGeom<'a> {
    layout: &'a KvLayout,
    layer: usize,
    head_dim: usize,
}

/// [`attend`], with AVX2 and FMA where the CPU has them (same results; see
/// `simd`), for the page size and the query heads per KV head at hand.
fn attend_entry(
    g: &AttnGeom<'_>,
    pages: &[&[f32]],
    kvh: usize,
    q: &[f32],
    pos: usize,
    out: &mut [f32],
) {
    macro_rules! by_group {
        ($f:ident, $ps:literal) => {
            match q.len() / g.head_dim {
                3 => $f::<$ps, 3>(g, pages, kvh, q, pos, out),
                1 => $f::<$ps, 1>(g, pages, kvh, q, pos, out),
                2 => $f::<$ps, 2>(g, pages, kvh, q, pos, out),
                4 => $f::<$ps, 4>(g, pages, kvh, q, pos, out),
                5 => $f::<$ps, 5>(g, pages, kvh, q, pos, out),
                6 => $f::<$ps, 6>(g, pages, kvh, q, pos, out),
                7 => $f::<$ps, 7>(g, pages, kvh, q, pos, out),
                8 => $f::<$ps, 8>(g, pages, kvh, q, pos, out),
                n => unreachable!("{n} query heads per KV head; at most {MAX_GROUP} load"),
            }
        };
    }
    macro_rules! by_page_size {
        ($f:ident) => {
            match g.layout.page_size {
                16 => by_group!($f, 16),
                32 => by_group!($f, 32),
                8 => by_group!($f, 8),
                64 => by_group!($f, 64),
                ps => unreachable!("page size {ps} is checked at engine start"),
            }
        };
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512_vnni() {
        // A page of 16 keys' scores is one 512-bit register per head.
        #[target_feature(enable = "avx512f,avx2,fma")]
        fn fast512<const PS: usize, const G: usize>(
            g: &AttnGeom<'_>,
            pages: &[&[f32]],
            kvh: usize,
            q: &[f32],
            pos: usize,
            out: &mut [f32],
        ) {
            attend::<PS, G>(g, pages, kvh, q, pos, out)
        }
        // SAFETY: `fast512` needs AVX-512F, AVX2 and FMA, which
        // `avx512_vnni` confirmed.
        unsafe { by_page_size!(fast512) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx2_fma() {
        #[target_feature(enable = "avx2,fma")]
        fn fast<const PS: usize, const G: usize>(
            g: &AttnGeom<'_>,
            pages: &[&[f32]],
            kvh: usize,
            q: &[f32],
            pos: usize,
            out: &mut [f32],
        ) {
            attend::<PS, G>(g, pages, kvh, q, pos, out)
        }
        // SAFETY: `fast` needs AVX2 and FMA, which `avx2_fma` confirmed.
        unsafe { by_page_size!(fast) };
        return;
    }
    by_page_size!(attend)
}

/// Page sizes the attention kernel is built for.
pub(crate) const PAGE_SIZES: [usize; 4] = [8, 16, 32, 64];

/// One row's attention for one KV head: its `G` query heads `q` (pre-scaled,
/// after RoPE) against the keys at positions `0..=pos`, page by page with
/// an online softmax, into `out` (`G × head_dim`). The query heads sharing
/// the KV head go together, so each page is read once. The order of every
/// sum is fixed by `pos` alone.
#[inline(always)]
fn attend<const PS: usize, const G: usize>(
    g: &AttnGeom<'_>,
    pages: &[&[f32]],
    kvh: usize,
    q: &[f32],
    pos: usize,
    out: &mut [f32],
) {
    let hd = g.head_dim;
    // `out` holds the weighted sums of values until the end.
    let acc = &mut out[..G * hd];
    acc.fill(0.0);
    let mut max = [f32::NEG_INFINITY; G];
    let mut sum = [0.0f32; G];
    for (p, block) in pages.iter().enumerate().take(pos / PS + 1) {
        let valid = (pos + 1 - p * PS).min(PS);
        let kt = &block[g.layout.k_offset(g.layer, kvh)..][..hd * PS];
        let v = &block[g.layout.v_offset(g.layer, kvh)..][..hd * PS];
        // Scores: an outer product over dimensions, keys in lanes (all G
        // heads' sums stay in registers).
        let mut s = [[0.0f32; PS]; G];
        scores::<PS, G>(kt, q, hd, &mut s);
        // Online softmax: rescale what came before to the new max.
        for gi in 0..G {
            let page_max = s[gi][..valid]
                .iter()
                .copied()
                .fold(f32::NEG_INFINITY, f32::max);
            let new_max = max[gi].max(page_max);
            let corr = exp(max[gi] - new_max);
            if corr != 1.0 {
                sum[gi] *= corr;
                acc[gi * hd..][..hd].iter_mut().for_each(|a| *a *= corr);
            }
            max[gi] = new_max;
            exp_sub(&mut s[gi][..valid], new_max);
            for &st in &s[gi][..valid] {
                sum[gi] += st;
            }
        }
        // Weighted values, along dimensions: each stretch of dimensions
        // stays in registers over the page's tokens (every sum still runs
        // over the tokens in order).
        for (gi, sg) in s.iter().enumerate() {
            let a = &mut acc[gi * hd..][..hd];
            let mut d0 = 0;
            d0 += weigh::<8>(&sg[..valid], v, hd, &mut a[d0..]);
            d0 += weigh::<1>(&sg[..valid], v, hd, &mut a[d0..]);
            weigh_rest(&sg[..valid], v, hd, d0, a);
        }
    }
    for gi in 0..G {
        for o in &mut acc[gi * hd..][..hd] {
            *o /= sum[gi];
        }
    }
}

/// `s[g][t]`: query head `g` (`q[g × hd..]`) against the page's keys `t`
/// (`kt`, dimension-major), each one FMA chain over the dimensions in
/// order.
#[inline(always)]
fn scores<const PS: usize, const G: usize>(
    kt: &[f32],
    q: &[f32],
    hd: usize,
    out: &mut [[f32; PS]; G],
) {
    let mut s = [[0.0f32; PS]; G];
    for (d, krow) in kt.chunks_exact(PS).enumerate() {
        let krow: &[f32; PS] = krow.try_into().expect("a K row");
        for (gi, sg) in s.iter_mut().enumerate() {
            let qd = q[gi * hd + d];
            for t in 0..PS {
                sg[t] = qd.mul_add(krow[t], sg[t]);
            }
        }
    }
    *out = s;
}

/// `a[j] += p[t] × v[t][d0 + j]` over the tokens `t` in order (`v`
/// token-major, rows of `hd`; `a` starts at dimension `d0`), for as many
/// whole stretches of `8 × N` dimensions as `a` holds (kept in `N` vector
/// registers over the tokens); returns the dimensions done.
#[inline(always)]
fn weigh<const N: usize>(p: &[f32], v: &[f32], hd: usize, a: &mut [f32]) -> usize {
    let d0 = hd - a.len();
    let mut done = 0;
    for chunk in a.chunks_exact_mut(8 * N) {
        let mut r = [[0.0f32; 8]; N];
        for (r, c) in r.iter_mut().zip(chunk.chunks_exact(8)) {
            r.copy_from_slice(c);
        }
        for (t, &pt) in p.iter().enumerate() {
            let vs = &v[t * hd + d0 + done..][..8 * N];
            for (r, vs) in r.iter_mut().zip(vs.chunks_exact(8)) {
                for j in 0..8 {
                    r[j] = pt.mul_add(vs[j], r[j]);
                }
            }
        }
        for (r, c) in r.iter().zip(chunk.chunks_exact_mut(8)) {
            c.copy_from_slice(r);
        }
        done += 8 * N;
    }
    done
}

/// [`weigh`] for the dimensions `d0..` left over, one at a time.
#[inline(always)]
fn weigh_rest(p: &[f32], v: &[f32], hd: usize, d0: usize, a: &mut [f32]) {
    for (t, &pt) in p.iter().enumerate() {
        for (a, &vv) in a[d0..].iter_mut().zip(&v[t * hd + d0..(t + 1) * hd]) {
            *a = pt.mul_add(vv, *a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct OldGeom<'a> {
        layout: &'a KvLayout,
        layer: usize,
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
    }

    #[inline(always)]
    /// The attention as it was first written (one row, all heads, one
    /// loop order), the oracle of the rewritten kernel.
    fn reference_attend<const PS: usize>(
        g: &OldGeom<'_>,
        pages: &[&[f32]],
        q: &[f32],
        pos: usize,
        out: &mut [f32],
    ) {
        let hd = g.head_dim;
        let group = g.heads / g.kv_heads;
        let mut acc = vec![0.0f32; group * hd];
        for kvh in 0..g.kv_heads {
            let qs = &q[kvh * group * hd..][..group * hd];
            let mut max = [f32::NEG_INFINITY; MAX_GROUP];
            let mut sum = [0.0f32; MAX_GROUP];
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (p, block) in pages.iter().enumerate().take(pos / PS + 1) {
                let valid = (pos + 1 - p * PS).min(PS);
                let kt = &block[g.layout.k_offset(g.layer, kvh)..][..hd * PS];
                let v = &block[g.layout.v_offset(g.layer, kvh)..][..hd * PS];
                // Scores: an outer product over dimensions, keys in lanes.
                let mut s = [[0.0f32; PS]; MAX_GROUP];
                for (d, krow) in kt.chunks_exact(PS).enumerate() {
                    let krow: &[f32; PS] = krow.try_into().expect("a K row");
                    for (gi, sg) in s.iter_mut().enumerate().take(group) {
                        let qd = qs[gi * hd + d];
                        for t in 0..PS {
                            sg[t] = qd.mul_add(krow[t], sg[t]);
                        }
                    }
                }
                // Online softmax: rescale what came before to the new max.
                for gi in 0..group {
                    let page_max = s[gi][..valid]
                        .iter()
                        .copied()
                        .fold(f32::NEG_INFINITY, f32::max);
                    let new_max = max[gi].max(page_max);
                    let corr = crate::exp::exp(max[gi] - new_max);
                    if corr != 1.0 {
                        sum[gi] *= corr;
                        acc[gi * hd..][..hd].iter_mut().for_each(|a| *a *= corr);
                    }
                    max[gi] = new_max;
                    for st in &mut s[gi][..valid] {
                        *st = crate::exp::exp(*st - new_max);
                        sum[gi] += *st;
                    }
                }
                // Weighted values, along dimensions.
                // (Head by head, so one head's sums stay in registers over the page.)
                for (gi, sg) in s.iter().enumerate().take(group) {
                    let a = &mut acc[gi * hd..][..hd];
                    for (&pt, vrow) in sg[..valid].iter().zip(v.chunks_exact(hd)) {
                        for (a, &vv) in a.iter_mut().zip(vrow) {
                            *a = pt.mul_add(vv, *a);
                        }
                    }
                }
            }
            for gi in 0..group {
                let o = &mut out[(kvh * group + gi) * hd..][..hd];
                for (o, &a) in o.iter_mut().zip(&acc[gi * hd..][..hd]) {
                    *o = a / sum[gi];
                }
            }
        }
    }

    fn values(len: usize, seed: u64) -> Vec<f32> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0
            })
            .collect()
    }

    /// The attention kernel (by KV head, sums in registers) gives bit for
    /// bit what the first one gave, at every position of several pages, for
    /// several page sizes and groupings.
    #[test]
    fn attention_equals_the_reference_bit_for_bit() {
        for (ps, kv_heads, group, head_dim) in [(16, 3, 3, 64), (8, 2, 4, 40), (32, 1, 1, 72)] {
            let layout = KvLayout {
                layers: 2,
                kv_heads,
                head_dim,
                page_size: ps,
            };
            let blocks: Vec<Vec<f32>> = (0..4)
                .map(|p| values(layout.page_floats(), 11 + p))
                .collect();
            let pages: Vec<&[f32]> = blocks.iter().map(|b| &b[..]).collect();
            let heads = kv_heads * group;
            let q = values(heads * head_dim, 5);
            for pos in (0..4 * ps).step_by(3) {
                let mut want = vec![0.0; heads * head_dim];
                let old = OldGeom {
                    layout: &layout,
                    layer: 1,
                    heads,
                    kv_heads,
                    head_dim,
                };
                match ps {
                    8 => reference_attend::<8>(&old, &pages, &q, pos, &mut want),
                    16 => reference_attend::<16>(&old, &pages, &q, pos, &mut want),
                    _ => reference_attend::<32>(&old, &pages, &q, pos, &mut want),
                }
                let geom = AttnGeom {
                    layout: &layout,
                    layer: 1,
                    head_dim,
                };
                // A KV head's query heads together, or one by one.
                for per_task in [group, 1] {
                    let mut got = vec![0.0; heads * head_dim];
                    let td = per_task * head_dim;
                    for (i, out) in got.chunks_exact_mut(td).enumerate() {
                        let kvh = i * per_task / group;
                        attend_entry(&geom, &pages, kvh, &q[i * td..][..td], pos, out);
                    }
                    assert!(
                        got.iter()
                            .zip(&want)
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "page size {ps}, group {group}, {per_task} per task, pos {pos}"
                    );
                }
            }
        }
    }

    #[test]
    #[ignore = "a benchmark"]
    fn bench_attention() {
        #[target_feature(enable = "avx2,fma")]
        fn old(g: &OldGeom<'_>, pages: &[&[f32]], q: &[f32], pos: usize, out: &mut [f32]) {
            reference_attend::<16>(g, pages, q, pos, out)
        }
        let layout = KvLayout {
            layers: 30,
            kv_heads: 3,
            head_dim: 64,
            page_size: 16,
        };
        let blocks: Vec<Vec<f32>> = (0..66)
            .map(|p| values(layout.page_floats(), 11 + p))
            .collect();
        let pages: Vec<&[f32]> = blocks.iter().map(|b| &b[..]).collect();
        let q = values(9 * 64, 5);
        let mut out = vec![0.0; 9 * 64];
        assert!(crate::simd::avx2_fma(), "the benchmark needs AVX2 and FMA");
        // Every layer in turn, as a decode step reads them.
        let (mut to, mut tn) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..10 {
            let t = std::time::Instant::now();
            for layer in 0..30 {
                let og = OldGeom {
                    layout: &layout,
                    layer,
                    heads: 9,
                    kv_heads: 3,
                    head_dim: 64,
                };
                // SAFETY: checked above: the CPU has AVX2 and FMA.
                unsafe { old(&og, &pages, &q, 1050, &mut out) };
            }
            to = to.min(t.elapsed().as_secs_f64() / 30.0);
            let t = std::time::Instant::now();
            for layer in 0..30 {
                let ng = AttnGeom {
                    layout: &layout,
                    layer,
                    head_dim: 64,
                };
                for (kvh, o) in out.chunks_exact_mut(192).enumerate() {
                    attend_entry(&ng, &pages, kvh, &q[kvh * 192..][..192], 1050, o);
                }
            }
            tn = tn.min(t.elapsed().as_secs_f64() / 30.0);
        }
        println!(
            "one row at 1050 positions, per layer (all 30 in turn): old {:.1} us, new {:.1} us",
            to * 1e6,
            tn * 1e6
        );
    }
}
