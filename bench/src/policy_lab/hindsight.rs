//! What knowing part of the future is worth: bounds that locate the online
//! candidates' distance to Belady.
//!
//! On the bundled trace at 3M tokens (Belady 0.550; `return-odds`, online,
//! 0.616 of it):
//! - `oracle-alive` is told at each use whether a block will be used again,
//!   not when, and is LRU otherwise: 0.810. Knowing *whether* is most of
//!   Belady's edge.
//! - `oracle-first-use` is `return-odds` told which first-use blocks never
//!   come back: 0.668. Perfect knowledge of new documents adds 0.052.
//! - `fitted-belady` ranks as `return-odds` with, per class, the share of
//!   uses whose next use Belady serves from the cache, fitted in hindsight
//!   on the other documents: 0.657 (a Hawkeye-style learner of Belady's
//!   choices is bounded by it).
//! - The rest lies with documents already used twice: whether they come
//!   again (0.79–0.85 at every use count, output length, gap and time) and
//!   when. [`next_gap_by_rate`] (`policy-lab --gaps`) shows that a
//!   document's past rate of use does not predict its next gap: its
//!   thirds by rate have median next gaps of about 350 requests each.

use super::{LabPolicy, Lru, ReturnOdds, World, NONE};

/// Told whether a block will be used again (never when): blocks that will
/// not go first, by recency; the rest by recency.
#[derive(Debug, Default)]
pub struct OracleAlive {
    lru: Lru,
}

impl LabPolicy for OracleAlive {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], hit: usize) {
        self.lru.on_request(w, t, req, hit);
    }
    fn key(&self, w: &World, b: u32, t: usize) -> u64 {
        // Recency keys are request indices, below 2^32.
        let alive = w.next_use(b, t) != NONE;
        (u64::from(alive) << 32) | self.lru.key(w, b, t)
    }
}

/// `return-odds`, told which blocks used once will never be used again:
/// those go first, by recency.
#[derive(Debug)]
pub struct OracleFirstUse {
    odds: ReturnOdds,
    uses: Vec<u32>,
    last: Vec<u32>,
}

impl OracleFirstUse {
    pub fn new(w: &World) -> Self {
        Self {
            odds: ReturnOdds::online(w),
            uses: vec![0; w.blocks()],
            last: vec![0; w.blocks()],
        }
    }
}

impl LabPolicy for OracleFirstUse {
    fn on_request(&mut self, w: &World, t: usize, req: &[u32], hit: usize) {
        self.odds.on_request(w, t, req, hit);
        for &b in req {
            self.uses[b as usize] += 1;
            self.last[b as usize] = t as u32;
        }
    }
    fn key(&self, w: &World, b: u32, t: usize) -> u64 {
        if self.uses[b as usize] == 1 && w.next_use(b, t) == NONE {
            // Below every odds key: those are floats' bits, from 1e9 up.
            u64::from(self.last[b as usize])
        } else {
            self.odds.key(w, b, t)
        }
    }
}

/// `return-odds` ranking with per-class odds that Belady at `capacity`
/// serves a use's next use, fitted in hindsight on the other documents.
pub fn fitted_belady(w: &World, capacity: u64) -> ReturnOdds {
    let hits = belady_hits(w, capacity);
    // A block sits at the same depth in every request (ids form a tree);
    // parents get smaller ids than their children.
    let mut depth = vec![0usize; w.blocks()];
    for b in 0..w.blocks() {
        let p = w.parent[b];
        if p != NONE {
            depth[b] = depth[p as usize] + 1;
        }
    }
    ReturnOdds::fitted_to(w, move |b, next| depth[b as usize] < hits[next as usize])
}

/// How many leading blocks of each request Belady serves at `capacity`.
pub fn belady_hits(w: &World, capacity: u64) -> Vec<usize> {
    struct Recorder(Vec<usize>);
    impl LabPolicy for Recorder {
        fn on_request(&mut self, _: &World, _: usize, _: &[u32], hit: usize) {
            self.0.push(hit);
        }
        fn key(&self, w: &World, b: u32, t: usize) -> u64 {
            super::Belady.key(w, b, t)
        }
    }
    let mut rec = Recorder(Vec::with_capacity(w.reqs.len()));
    super::simulate(w, &mut rec, capacity);
    rec.0
}

/// One third of [`next_gap_by_rate`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateThird {
    /// Median past rate: returns per request since the document's first use.
    pub rate: f64,
    /// Median requests to the next use.
    pub gap: f64,
    pub uses: usize,
}

/// Uses of documents (families) already used at least `min_uses` times
/// (2 or more) that are followed by another use, split in thirds by the
/// document's past rate (returns so far per request since its first use),
/// with the median gap to the next use in each: lowest rate first. Uses in
/// the trace's last quarter are left out, since only their short gaps are
/// seen. If past rates predicted the next use, the gaps would fall from
/// the first third to the last.
pub fn next_gap_by_rate(w: &World, min_uses: usize) -> Option<[RateThird; 3]> {
    assert!(min_uses >= 2, "a rate needs a return");
    let mut times: Vec<Vec<usize>> = vec![Vec::new(); w.blocks()];
    for (t, req) in w.reqs.iter().enumerate() {
        times[w.root[req[0] as usize] as usize].push(t);
    }
    let cut = w.reqs.len() * 3 / 4;
    let mut rows: Vec<(f64, usize)> = Vec::new();
    for v in times.iter().filter(|v| v.len() > min_uses) {
        for j in min_uses - 1..v.len() - 1 {
            if v[j] >= cut {
                break;
            }
            rows.push((j as f64 / (v[j] - v[0]) as f64, v[j + 1] - v[j]));
        }
    }
    if rows.len() < 3 {
        return None;
    }
    rows.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n = rows.len();
    Some(std::array::from_fn(|i| {
        let third = &rows[i * n / 3..(i + 1) * n / 3];
        let mut gaps: Vec<usize> = third.iter().map(|r| r.1).collect();
        gaps.sort_unstable();
        RateThird {
            rate: third[third.len() / 2].0,
            gap: gaps[gaps.len() / 2] as f64,
            uses: third.len(),
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy_lab::{candidate, simulate, Belady};

    /// Documents that come back at steady, different periods (as many uses
    /// at each period): the past rate tells the next gap, and the thirds
    /// show it.
    #[test]
    fn steady_rates_predict_the_next_gap() {
        // (period, phase): phases never coincide.
        let docs = [
            (10, 1),
            (20, 5),
            (20, 15),
            (40, 3),
            (40, 13),
            (40, 23),
            (40, 33),
        ];
        let mut reqs = Vec::new();
        for t in 0..3000u32 {
            let doc = (0u32..)
                .zip(docs)
                .find(|(_, (period, phase))| t % period == *phase)
                .map(|(d, _)| d);
            reqs.push(match doc {
                Some(d) => vec![d * 10, d * 10 + 1],
                None => vec![1_000 + t],
            });
        }
        let w = World::new(&reqs);
        let thirds = next_gap_by_rate(&w, 2).unwrap();
        let gaps: Vec<f64> = thirds.iter().map(|t| t.gap).collect();
        assert_eq!(gaps, [40.0, 20.0, 10.0]);
        assert!(thirds[0].rate < thirds[2].rate);
    }

    #[test]
    fn belady_hits_add_up_to_the_bound() {
        let reqs: Vec<Vec<u32>> = (0..300u32)
            .map(|i| (0..(i % 4 + 1)).map(|d| (i % 7) * 10 + d).collect())
            .collect();
        let w = World::new(&reqs);
        let hits = belady_hits(&w, 8);
        let bound = simulate(&w, &mut Belady, 8).hit_blocks;
        assert_eq!(hits.iter().sum::<usize>() as u64, bound);
        assert!(bound > 0);
    }

    /// Block a is used again, b never: LRU evicts a (older), the oracle b.
    #[test]
    fn the_alive_oracle_keeps_what_returns() {
        let w = World::new(&[vec![1], vec![2], vec![3], vec![1]]);
        let rate = |name: &str| {
            let mut p = candidate(name, &w, 2).unwrap();
            simulate(&w, p.as_mut(), 2).hit_blocks
        };
        assert_eq!(rate("lru"), 0);
        assert_eq!(rate("oracle-alive"), 1);
    }

    /// The bundled trace at 3M tokens: told whether each block returns, LRU
    /// passes 0.7 of Belady; told it for new documents only, or fitted to
    /// Belady's choices per class, the odds ranking stays under 0.7.
    #[test]
    fn on_the_bundled_trace_whether_documents_used_twice_return_is_the_gap() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/traces/synthetic_trace.jsonl");
        let trace = crate::trace::Trace::load(&path).unwrap();
        let w = World::with_output(
            &trace.as_tokens().unwrap(),
            trace.requests.iter().map(|r| r.output_length).collect(),
        );
        let cap = 5859;
        let of_belady = |name: &str| {
            let mut p = candidate(name, &w, cap).unwrap();
            simulate(&w, p.as_mut(), cap).hit_rate() / simulate(&w, &mut Belady, cap).hit_rate()
        };
        let (alive, first) = (of_belady("oracle-alive"), of_belady("oracle-first-use"));
        let (fitted, odds) = (of_belady("fitted-belady"), of_belady("return-odds"));
        assert!(alive > 0.75, "oracle-alive {alive}");
        assert!(
            first > odds && first < 0.7,
            "oracle-first-use {first}, odds {odds}"
        );
        assert!(fitted < 0.7, "fitted-belady {fitted}");
    }
}
