//! Agentic tool loops: many sessions sharing a long system prompt and tool
//! catalogue.
//!
//! Each session starts from the system prompt, the tool catalogue and its
//! own task. Each turn is one model call: the request's prompt is the
//! session's history, its output a tool call; the tool then runs for
//! `pause_ms` (jittered) and its result is appended, with the call, before
//! the next turn. Sessions start `session_interval_ms` apart and
//! interleave, so the cache must keep a paused session's prefix warm while
//! other sessions run.

use super::{build, Prompt, Segments, SplitMix64, Workload};
use anyhow::{ensure, Result};
use serde::Serialize;

/// Parameters of the agent workload; lengths and pauses are means, varied
/// by `±jitter`.
#[derive(Debug, Clone, Serialize)]
pub struct AgentParams {
    pub seed: u64,
    pub jitter: f64,
    /// Tokens of the system prompt every session shares.
    pub system_tokens: u64,
    pub sessions: u64,
    /// Model calls per session.
    pub turns: u64,
    /// Tokens of the tool catalogue every session shares.
    pub tools_tokens: u64,
    /// Tokens of each session's task.
    pub task_tokens: u64,
    /// Tokens of each tool call (the request's output).
    pub call_tokens: u64,
    /// Tokens of each tool result.
    pub tool_result_tokens: u64,
    /// Milliseconds between a call and the next turn (the tool runs).
    pub pause_ms: u64,
    /// Milliseconds between sessions' starts.
    pub session_interval_ms: u64,
}

impl Default for AgentParams {
    fn default() -> Self {
        Self {
            seed: 42,
            jitter: 0.5,
            system_tokens: 2000,
            sessions: 16,
            turns: 20,
            tools_tokens: 8000,
            task_tokens: 300,
            call_tokens: 100,
            tool_result_tokens: 1000,
            pause_ms: 2000,
            session_interval_ms: 500,
        }
    }
}

pub fn generate(p: &AgentParams, block_tokens: u64) -> Result<Workload> {
    ensure!(
        p.sessions > 0 && p.turns > 0,
        "agent needs sessions and turns"
    );
    let mut rng = SplitMix64::new(p.seed);
    let mut seg = Segments::default();
    let system = seg.fresh(p.system_tokens);
    let tools = seg.fresh(p.tools_tokens);
    let mut prompts = Vec::new();
    for s in 0..p.sessions {
        let mut t = s * p.session_interval_ms + rng.around(p.session_interval_ms / 2, 1.0);
        let mut history = vec![
            system,
            tools,
            seg.fresh(rng.around(p.task_tokens, p.jitter)),
        ];
        for _ in 0..p.turns {
            let call = rng.around(p.call_tokens, p.jitter).max(1);
            prompts.push(Prompt {
                timestamp: t,
                segments: history.clone(),
                output_length: call,
            });
            history.push(seg.fresh(call));
            history.push(seg.fresh(rng.around(p.tool_result_tokens, p.jitter)));
            t += rng.around(p.pause_ms, p.jitter);
        }
    }
    build("agent", serde_json::to_value(p)?, block_tokens, prompts)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::tests::ceiling;

    fn small() -> AgentParams {
        AgentParams {
            sessions: 5,
            turns: 6,
            ..AgentParams::default()
        }
    }

    #[test]
    fn deterministic_and_interleaved() {
        let a = generate(&small(), 512).unwrap().trace.requests;
        assert_eq!(a, generate(&small(), 512).unwrap().trace.requests);
        assert_ne!(
            a,
            generate(&AgentParams { seed: 1, ..small() }, 512)
                .unwrap()
                .trace
                .requests
        );
        assert_eq!(a.len(), 30);
        assert!(a.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
        // Sessions interleave: some request is not its predecessor's
        // continuation.
        assert!(a.windows(2).any(|w| {
            let full = (w[0].input_length / 512) as usize;
            w[1].hash_ids.get(..full) != Some(&w[0].hash_ids[..full])
        }));
    }

    /// Every prompt starts with the shared catalogue's full blocks; each
    /// session's turn extends its previous turn.
    #[test]
    fn sessions_share_the_catalogue_and_extend_their_history() {
        let p = small();
        let w = generate(&p, 512).unwrap();
        let shared = ((p.system_tokens + p.tools_tokens) / 512) as usize;
        let first = &w.trace.requests[0].hash_ids[..shared];
        assert!(w
            .trace
            .requests
            .iter()
            .all(|r| &r.hash_ids[..shared] == first));
        let one = generate(&AgentParams { sessions: 1, ..p }, 512).unwrap();
        for pair in one.trace.requests.windows(2) {
            let full = (pair[0].input_length / 512) as usize;
            assert_eq!(pair[1].hash_ids[..full], pair[0].hash_ids[..full]);
        }
        assert!(ceiling(&w.trace) > 0.8);
    }
}
