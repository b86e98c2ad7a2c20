//! Long-document QA: a few long documents queried repeatedly.
//!
//! Each query is the system prompt, one document (chosen with a Zipf skew:
//! document `k`, counted from 1, with weight `1 / k^zipf`) and a short
//! question of its own; queries arrive `query_interval_ms` apart
//! (jittered). The documents' blocks are the reusable part.

use super::{build, Prompt, Segments, SplitMix64, Workload};
use anyhow::{ensure, Result};
use serde::Serialize;

/// Parameters of the document-QA workload; lengths are means, varied by
/// `±jitter` (each document's length is drawn once).
#[derive(Debug, Clone, Serialize)]
pub struct DocQaParams {
    pub seed: u64,
    pub jitter: f64,
    /// Tokens of the system prompt every query shares.
    pub system_tokens: u64,
    pub documents: u64,
    pub doc_tokens: u64,
    pub queries: u64,
    /// Zipf exponent of document popularity (0: uniform).
    pub zipf: f64,
    pub question_tokens: u64,
    /// Tokens of each answer (the request's output).
    pub answer_tokens: u64,
    pub query_interval_ms: u64,
}

impl Default for DocQaParams {
    fn default() -> Self {
        Self {
            seed: 42,
            jitter: 0.5,
            system_tokens: 200,
            documents: 8,
            doc_tokens: 20_000,
            queries: 200,
            zipf: 1.0,
            question_tokens: 100,
            answer_tokens: 200,
            query_interval_ms: 500,
        }
    }
}

pub fn generate(p: &DocQaParams, block_tokens: u64) -> Result<Workload> {
    ensure!(
        p.documents > 0 && p.queries > 0,
        "docqa needs documents and queries"
    );
    ensure!(
        p.zipf >= 0.0 && p.zipf.is_finite(),
        "the Zipf exponent must be >= 0"
    );
    let mut rng = SplitMix64::new(p.seed);
    let mut seg = Segments::default();
    let system = seg.fresh(p.system_tokens);
    let docs: Vec<_> = (0..p.documents)
        .map(|_| seg.fresh(rng.around(p.doc_tokens, p.jitter).max(1)))
        .collect();
    let weights: Vec<f64> = (1..=p.documents)
        .map(|k| (k as f64).powf(-p.zipf))
        .collect();
    let total: f64 = weights.iter().sum();
    let mut t = 0;
    let mut prompts = Vec::new();
    for _ in 0..p.queries {
        let mut x = rng.unit() * total;
        let d = weights
            .iter()
            .position(|w| {
                x -= w;
                x < 0.0
            })
            .unwrap_or(docs.len() - 1);
        prompts.push(Prompt {
            timestamp: t,
            segments: vec![
                system,
                docs[d],
                seg.fresh(rng.around(p.question_tokens, p.jitter).max(1)),
            ],
            output_length: rng.around(p.answer_tokens, p.jitter).max(1),
        });
        t += rng.around(p.query_interval_ms, p.jitter);
    }
    build("docqa", serde_json::to_value(p)?, block_tokens, prompts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::tests::ceiling;

    #[test]
    fn deterministic_skewed_and_shared() {
        let p = DocQaParams {
            queries: 400,
            ..DocQaParams::default()
        };
        let a = generate(&p, 512).unwrap().trace;
        assert_eq!(a.requests, generate(&p, 512).unwrap().trace.requests);
        // Documents are told apart by their first block after the system prompt.
        let mut counts = std::collections::HashMap::new();
        for r in &a.requests {
            *counts.entry(r.hash_ids[1]).or_insert(0u32) += 1;
        }
        assert_eq!(counts.len(), 8);
        let mut c: Vec<u32> = counts.into_values().collect();
        c.sort_unstable();
        // Zipf 1 over 8: the top document draws ~37%, the last ~5%.
        assert!(c[7] > 110 && c[0] < 40, "{c:?}");
        // 8 documents, 400 queries: all but the first reading of each
        // document hits nearly all of it.
        assert!(ceiling(&a) > 0.9);
        let uniform = generate(&DocQaParams { zipf: 0.0, ..p }, 512).unwrap();
        assert_ne!(uniform.trace.requests, a.requests);
    }
}
