//! Multi-round chat, the shape of LMCache's multi-round QA benchmark.
//!
//! `users` conversations of `rounds` rounds each. Every prompt starts with
//! the system prompt all users share, then the user's own context (if
//! any); round `r`'s prompt is round `r-1`'s prompt, its answer and a new
//! question, so each round re-sends the whole history. Users start
//! `user_interval_ms` apart (plus jitter) and wait `think_ms` between
//! rounds, so conversations interleave.

use super::{build, Prompt, Segments, SplitMix64, Workload};
use anyhow::{ensure, Result};
use serde::Serialize;

/// Parameters of the chat workload; lengths are means, varied by
/// `±jitter`.
#[derive(Debug, Clone, Serialize)]
pub struct ChatParams {
    pub seed: u64,
    pub jitter: f64,
    /// Tokens of the system prompt every user shares.
    pub system_tokens: u64,
    pub users: u64,
    pub rounds: u64,
    /// Tokens of each user's own context after the system prompt.
    pub user_context_tokens: u64,
    pub question_tokens: u64,
    /// Tokens of each answer: the request's output, then part of the history.
    pub answer_tokens: u64,
    /// Milliseconds between a user's rounds.
    pub think_ms: u64,
    /// Milliseconds between users' first rounds.
    pub user_interval_ms: u64,
}

impl Default for ChatParams {
    fn default() -> Self {
        Self {
            seed: 42,
            jitter: 0.5,
            system_tokens: 1000,
            users: 20,
            rounds: 10,
            user_context_tokens: 2000,
            question_tokens: 100,
            answer_tokens: 200,
            think_ms: 10_000,
            user_interval_ms: 1000,
        }
    }
}

pub fn generate(p: &ChatParams, block_tokens: u64) -> Result<Workload> {
    ensure!(p.users > 0 && p.rounds > 0, "chat needs users and rounds");
    let mut rng = SplitMix64::new(p.seed);
    let mut seg = Segments::default();
    let system = seg.fresh(p.system_tokens);
    let mut prompts = Vec::new();
    for u in 0..p.users {
        let mut t = u * p.user_interval_ms + rng.around(p.user_interval_ms / 2, 1.0);
        let mut history = vec![system];
        history.push(seg.fresh(rng.around(p.user_context_tokens, p.jitter)));
        for _ in 0..p.rounds {
            history.push(seg.fresh(rng.around(p.question_tokens, p.jitter).max(1)));
            let answer = rng.around(p.answer_tokens, p.jitter).max(1);
            prompts.push(Prompt {
                timestamp: t,
                segments: history.clone(),
                output_length: answer,
            });
            history.push(seg.fresh(answer));
            t += rng.around(p.think_ms, p.jitter);
        }
    }
    build("chat", serde_json::to_value(p)?, block_tokens, prompts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::tests::ceiling;

    fn small() -> ChatParams {
        ChatParams {
            users: 6,
            rounds: 8,
            ..ChatParams::default()
        }
    }

    #[test]
    fn same_seed_same_workload_other_seed_other() {
        let a = generate(&small(), 512).unwrap().trace.requests;
        let b = generate(&small(), 512).unwrap().trace.requests;
        assert_eq!(a, b);
        let c = generate(
            &ChatParams {
                seed: 43,
                ..small()
            },
            512,
        )
        .unwrap()
        .trace
        .requests;
        assert_ne!(a, c);
        assert_eq!(a.len(), 48);
    }

    /// Each round's full blocks are the next round's first blocks; the
    /// system prompt's full blocks start every prompt.
    #[test]
    fn rounds_extend_the_previous_prompt() {
        let p = ChatParams {
            users: 1,
            rounds: 6,
            ..ChatParams::default()
        };
        let w = generate(&p, 256).unwrap();
        let reqs = &w.trace.requests;
        let system_blocks = (p.system_tokens / 256) as usize;
        for pair in reqs.windows(2) {
            let full = (pair[0].input_length / 256) as usize;
            assert_eq!(pair[1].hash_ids[..full], pair[0].hash_ids[..full]);
            assert!(pair[1].input_length > pair[0].input_length + pair[0].output_length);
            assert!(pair[1].timestamp >= pair[0].timestamp);
        }
        for r in reqs {
            assert_eq!(r.hash_ids.len() as u64, r.input_length.div_ceil(256));
        }
        // Two users share the system prompt's full blocks, nothing after
        // them (the first two requests are two users' first rounds).
        let w = generate(&ChatParams { users: 2, ..p }, 256).unwrap();
        let (x, y) = (&w.trace.requests[0].hash_ids, &w.trace.requests[1].hash_ids);
        let shared = x.iter().zip(y).take_while(|(a, b)| a == b).count();
        assert_eq!(shared, system_blocks);
    }

    /// Many rounds per user: nearly every block was seen before.
    #[test]
    fn long_conversations_have_a_high_ceiling() {
        let many = generate(
            &ChatParams {
                users: 4,
                rounds: 30,
                ..ChatParams::default()
            },
            512,
        )
        .unwrap();
        let few = generate(
            &ChatParams {
                users: 120,
                rounds: 1,
                ..ChatParams::default()
            },
            512,
        )
        .unwrap();
        let (hi, lo) = (ceiling(&many.trace), ceiling(&few.trace));
        assert!(hi > 0.85, "ceiling {hi}");
        // One round each: only the shared system prompt hits.
        assert!(lo < 0.35, "ceiling {lo}");
    }
}
