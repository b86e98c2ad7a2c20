//! Generated workloads, written as Mooncake-format traces.
//!
//! Three generators, each deterministic for a seed (its own SplitMix64, no
//! `rand`):
//! - [`chat`]: multi-round chat, the shape of LMCache's multi-round QA
//!   benchmark: users × rounds over a shared system prompt, each round's
//!   prompt the previous prompt plus its answer plus a new question.
//! - [`agent`]: agentic tool loops: sessions sharing a long system prompt
//!   and tool catalogue, each turn appending the model's tool call and the
//!   tool's result, with pauses between turns, sessions interleaved.
//! - [`docqa`]: long-document QA: a few long documents, queried with a
//!   Zipf skew, a short question appended to each.
//!
//! A generator describes each prompt as a list of [`Segment`]s (runs of
//! tokens named by content) and [`BlockNamer`] turns the prompts, in
//! arrival order, into block hash ids the way Mooncake traces name them:
//! one id per block of `block_tokens` tokens (the last block may be
//! partial), where a block's id depends on its content and on its parent
//! block's id, so identical prefixes get identical ids and every new block
//! a new one (ids are handed out from 0 in order of first appearance).

pub mod agent;
pub mod chat;
pub mod docqa;

use crate::trace::{Trace, TraceRequest};
use anyhow::{ensure, Result};
use serde::Serialize;
use std::collections::HashMap;

/// SplitMix64 (Steele, Lea, Flood 2014): a tiny, well-mixed 64-bit PRNG.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// `mean`, varied uniformly by up to `±jitter × mean` (jitter in [0, 1]).
    pub fn around(&mut self, mean: u64, jitter: f64) -> u64 {
        let j = jitter.clamp(0.0, 1.0);
        let lo = mean as f64 * (1.0 - j);
        let hi = mean as f64 * (1.0 + j);
        (lo + (hi - lo) * self.unit()).round() as u64
    }
}

/// The SplitMix64 finalizer: a bijective 64-bit mix.
pub fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A run of `len` tokens whose content is named `id`: two segments with
/// the same id are the same tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub id: u64,
    pub len: u64,
}

/// Hands out fresh segment ids.
#[derive(Debug, Default)]
pub struct Segments(u64);

impl Segments {
    /// A new segment of `len` tokens, unlike any other.
    pub fn fresh(&mut self, len: u64) -> Segment {
        self.0 += 1;
        Segment { id: self.0, len }
    }
}

/// One generated request before its blocks are named.
#[derive(Debug, Clone)]
pub struct Prompt {
    /// Arrival time, milliseconds from the start.
    pub timestamp: u64,
    pub segments: Vec<Segment>,
    pub output_length: u64,
}

impl Prompt {
    pub fn input_length(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }
}

/// Names blocks of prompts: see the module docs.
#[derive(Debug)]
pub struct BlockNamer {
    block_tokens: u64,
    ids: HashMap<(u64, u64), u64>,
}

/// The parent of a prompt's first block.
const ROOT: u64 = u64::MAX;

impl BlockNamer {
    pub fn new(block_tokens: u64) -> Self {
        assert!(block_tokens > 0, "blocks hold at least one token");
        Self {
            block_tokens,
            ids: HashMap::new(),
        }
    }

    /// The prompt's block ids, one per `block_tokens` tokens (rounded up).
    pub fn name(&mut self, segments: &[Segment]) -> Vec<u64> {
        let mut out = Vec::new();
        let mut parent = ROOT;
        let mut seg = 0;
        let mut offset = 0; // into segments[seg]
        loop {
            // The block's content: the pieces of segments it covers.
            let mut content = mix(0x0B10_C4ED);
            let mut filled = 0;
            while filled < self.block_tokens && seg < segments.len() {
                let s = segments[seg];
                let take = (s.len - offset).min(self.block_tokens - filled);
                if take > 0 {
                    content = mix(content ^ s.id);
                    content = mix(content ^ offset);
                    content = mix(content ^ take);
                    filled += take;
                    offset += take;
                }
                if offset == s.len {
                    seg += 1;
                    offset = 0;
                }
            }
            if filled == 0 {
                return out;
            }
            let next = self.ids.len() as u64;
            let id = *self.ids.entry((parent, content)).or_insert(next);
            out.push(id);
            parent = id;
        }
    }
}

/// A generated workload: its parameters and its requests in arrival order.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    pub name: &'static str,
    pub block_tokens: u64,
    /// The generator's parameters, for reports.
    pub params: serde_json::Value,
    #[serde(skip)]
    pub trace: Trace,
}

/// Sorts prompts by arrival (stable: ties keep generation order) and names
/// their blocks.
pub fn build(
    name: &'static str,
    params: serde_json::Value,
    block_tokens: u64,
    mut prompts: Vec<Prompt>,
) -> Result<Workload> {
    ensure!(block_tokens > 0, "blocks must hold at least one token");
    ensure!(!prompts.is_empty(), "the workload has no requests");
    prompts.sort_by_key(|p| p.timestamp);
    let mut namer = BlockNamer::new(block_tokens);
    let requests = prompts
        .iter()
        .map(|p| TraceRequest {
            timestamp: p.timestamp,
            input_length: p.input_length(),
            output_length: p.output_length,
            hash_ids: namer.name(&p.segments),
        })
        .collect();
    Ok(Workload {
        name,
        block_tokens,
        params,
        trace: Trace { requests },
    })
}

/// Which generator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Multi-round chat (LMCache's multi-round QA shape).
    Chat,
    /// Agentic tool loops over a shared tool catalogue.
    Agent,
    /// Long-document QA with skewed document popularity.
    Docqa,
}

/// Every generator's parameters on the command line. Each workload reads
/// its own (see the headings); unset ones take the workload's default.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct WorkloadArgs {
    /// Seed of the generator's PRNG: the same seed and parameters give the
    /// same workload, byte for byte.
    #[arg(long, default_value_t = 42, help_heading = "Workload")]
    pub seed: u64,
    /// Lengths and pauses vary uniformly by up to ±this fraction of their
    /// mean (0: exact means).
    #[arg(long, default_value_t = 0.5, help_heading = "Workload")]
    pub jitter: f64,
    /// Tokens of the system prompt every request starts with [default:
    /// chat 1000, agent 2000, docqa 200].
    #[arg(long, help_heading = "Workload")]
    pub system_tokens: Option<u64>,

    /// Chat: users (conversations).
    #[arg(long, default_value_t = chat::ChatParams::default().users, help_heading = "Chat workload")]
    pub users: u64,
    /// Chat: rounds per user.
    #[arg(long, default_value_t = chat::ChatParams::default().rounds, help_heading = "Chat workload")]
    pub rounds: u64,
    /// Chat: tokens of each user's own context after the system prompt
    /// (LMCache's "user history prompt"; 0: none).
    #[arg(long, default_value_t = chat::ChatParams::default().user_context_tokens, help_heading = "Chat workload")]
    pub user_context_tokens: u64,
    /// Chat and docqa: tokens of each question.
    #[arg(long, default_value_t = chat::ChatParams::default().question_tokens, help_heading = "Chat workload")]
    pub question_tokens: u64,
    /// Chat and docqa: tokens of each answer (the request's output; in chat
    /// it joins the history).
    #[arg(long, default_value_t = chat::ChatParams::default().answer_tokens, help_heading = "Chat workload")]
    pub answer_tokens: u64,
    /// Chat: milliseconds between a user's rounds.
    #[arg(long, default_value_t = chat::ChatParams::default().think_ms, help_heading = "Chat workload")]
    pub think_ms: u64,
    /// Chat: milliseconds between users' first rounds.
    #[arg(long, default_value_t = chat::ChatParams::default().user_interval_ms, help_heading = "Chat workload")]
    pub user_interval_ms: u64,

    /// Agent: sessions.
    #[arg(long, default_value_t = agent::AgentParams::default().sessions, help_heading = "Agent workload")]
    pub sessions: u64,
    /// Agent: turns (model calls) per session.
    #[arg(long, default_value_t = agent::AgentParams::default().turns, help_heading = "Agent workload")]
    pub turns: u64,
    /// Agent: tokens of the tool catalogue every session shares (after the
    /// system prompt).
    #[arg(long, default_value_t = agent::AgentParams::default().tools_tokens, help_heading = "Agent workload")]
    pub tools_tokens: u64,
    /// Agent: tokens of each session's task.
    #[arg(long, default_value_t = agent::AgentParams::default().task_tokens, help_heading = "Agent workload")]
    pub task_tokens: u64,
    /// Agent: tokens of each tool call the model emits (the request's
    /// output; it joins the history).
    #[arg(long, default_value_t = agent::AgentParams::default().call_tokens, help_heading = "Agent workload")]
    pub call_tokens: u64,
    /// Agent: tokens of each tool result appended to the history.
    #[arg(long, default_value_t = agent::AgentParams::default().tool_result_tokens, help_heading = "Agent workload")]
    pub tool_result_tokens: u64,
    /// Agent: milliseconds a session pauses between turns (the tool runs).
    #[arg(long, default_value_t = agent::AgentParams::default().pause_ms, help_heading = "Agent workload")]
    pub pause_ms: u64,
    /// Agent: milliseconds between sessions' starts.
    #[arg(long, default_value_t = agent::AgentParams::default().session_interval_ms, help_heading = "Agent workload")]
    pub session_interval_ms: u64,

    /// Docqa: documents.
    #[arg(long, default_value_t = docqa::DocQaParams::default().documents, help_heading = "Docqa workload")]
    pub documents: u64,
    /// Docqa: tokens of each document.
    #[arg(long, default_value_t = docqa::DocQaParams::default().doc_tokens, help_heading = "Docqa workload")]
    pub doc_tokens: u64,
    /// Docqa: queries.
    #[arg(long, default_value_t = docqa::DocQaParams::default().queries, help_heading = "Docqa workload")]
    pub queries: u64,
    /// Docqa: Zipf exponent of document popularity (0: uniform; 1: the
    /// k-th document is asked about 1/k as often as the first).
    #[arg(long, default_value_t = docqa::DocQaParams::default().zipf, help_heading = "Docqa workload")]
    pub zipf: f64,
    /// Docqa: milliseconds between queries.
    #[arg(long, default_value_t = docqa::DocQaParams::default().query_interval_ms, help_heading = "Docqa workload")]
    pub query_interval_ms: u64,
}

impl WorkloadArgs {
    pub fn chat(&self) -> chat::ChatParams {
        let d = chat::ChatParams::default();
        chat::ChatParams {
            seed: self.seed,
            jitter: self.jitter,
            system_tokens: self.system_tokens.unwrap_or(d.system_tokens),
            users: self.users,
            rounds: self.rounds,
            user_context_tokens: self.user_context_tokens,
            question_tokens: self.question_tokens,
            answer_tokens: self.answer_tokens,
            think_ms: self.think_ms,
            user_interval_ms: self.user_interval_ms,
        }
    }

    pub fn agent(&self) -> agent::AgentParams {
        let d = agent::AgentParams::default();
        agent::AgentParams {
            seed: self.seed,
            jitter: self.jitter,
            system_tokens: self.system_tokens.unwrap_or(d.system_tokens),
            sessions: self.sessions,
            turns: self.turns,
            tools_tokens: self.tools_tokens,
            task_tokens: self.task_tokens,
            call_tokens: self.call_tokens,
            tool_result_tokens: self.tool_result_tokens,
            pause_ms: self.pause_ms,
            session_interval_ms: self.session_interval_ms,
        }
    }

    pub fn docqa(&self) -> docqa::DocQaParams {
        let d = docqa::DocQaParams::default();
        docqa::DocQaParams {
            seed: self.seed,
            jitter: self.jitter,
            system_tokens: self.system_tokens.unwrap_or(d.system_tokens),
            documents: self.documents,
            doc_tokens: self.doc_tokens,
            queries: self.queries,
            zipf: self.zipf,
            question_tokens: self.question_tokens,
            answer_tokens: self.answer_tokens,
            query_interval_ms: self.query_interval_ms,
        }
    }

    /// Generates workload `kind` with these parameters.
    pub fn generate(&self, kind: Kind, block_tokens: u64) -> Result<Workload> {
        match kind {
            Kind::Chat => chat::generate(&self.chat(), block_tokens),
            Kind::Agent => agent::generate(&self.agent(), block_tokens),
            Kind::Docqa => docqa::generate(&self.docqa(), block_tokens),
        }
    }
}

/// Where a replay's requests come from: a trace file, or a generator.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct SourceArgs {
    /// Trace file: JSON lines {timestamp, input_length, output_length,
    /// hash_ids} (Mooncake format). Ignored with --workload.
    #[arg(default_value = "data/traces/synthetic_trace.jsonl")]
    pub trace: std::path::PathBuf,
    /// Replay a generated workload instead of a trace file (its parameters
    /// are below; `bench gen` writes the same workload to a file).
    #[arg(long, value_enum)]
    pub workload: Option<Kind>,
    #[command(flatten)]
    pub params: WorkloadArgs,
}

/// A loaded trace and what it came from.
#[derive(Debug)]
pub struct Source {
    /// The trace path, or the workload's name.
    pub label: String,
    pub trace: Trace,
    /// The generator's name, block size and parameters, for reports.
    pub workload: Option<Workload>,
}

impl SourceArgs {
    pub fn load(&self, block_tokens: u64) -> Result<Source> {
        match self.workload {
            Some(kind) => {
                let mut w = self.params.generate(kind, block_tokens)?;
                let trace = std::mem::take(&mut w.trace);
                Ok(Source {
                    label: format!("generated {} workload (seed {})", w.name, self.params.seed),
                    trace,
                    workload: Some(w),
                })
            }
            None => Ok(Source {
                label: self.trace.display().to_string(),
                trace: Trace::load(&self.trace)?,
                workload: None,
            }),
        }
    }
}

/// Writes a trace as Mooncake JSON lines.
pub fn write_jsonl(trace: &Trace, path: &std::path::Path) -> Result<()> {
    use std::io::Write;
    let file = std::fs::File::create(path)?;
    let mut w = std::io::BufWriter::new(file);
    for r in &trace.requests {
        serde_json::to_writer(&mut w, r)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The infinite cache's hit rate, by the real replay.
    pub fn ceiling(trace: &Trace) -> f64 {
        let prep = crate::replay::Prepared::new(trace.as_tokens().unwrap());
        crate::replay::replay(
            &prep,
            &crate::replay::PolicyChoice::Online("lru".into()),
            None,
        )
        .hit_rate
    }

    #[test]
    fn block_names_share_prefixes_and_nothing_else() {
        let mut seg = Segments::default();
        let (sys, a, b) = (seg.fresh(700), seg.fresh(300), seg.fresh(300));
        let mut namer = BlockNamer::new(512);
        let x = namer.name(&[sys, a]);
        let y = namer.name(&[sys, b]);
        let z = namer.name(&[sys, a, b]);
        assert_eq!(x, [0, 1]);
        // Same first block, a different second (b's tokens, not a's).
        assert_eq!(y, [0, 2]);
        // [sys, a, b]: 1000 tokens = 2 blocks; the second block is full now,
        // unlike x's partial one.
        assert_eq!(z, [0, 3, 4]);
        // The same prompt again: the same ids.
        assert_eq!(namer.name(&[sys, a]), x);
        assert!(namer.name(&[]).is_empty());
    }

    /// Each generator's default workload, pinned: a change to a generator
    /// (or to the PRNG, or to block naming) shows here, so traces written
    /// by `bench gen` stay comparable across versions.
    #[test]
    fn default_workloads_are_pinned() {
        let args = <WorkloadArgs as clap::FromArgMatches>::from_arg_matches(
            &<WorkloadArgs as clap::Args>::augment_args(clap::Command::new("t"))
                .get_matches_from(["t"]),
        )
        .unwrap();
        let mut got = Vec::new();
        for kind in [Kind::Chat, Kind::Agent, Kind::Docqa] {
            let w = args.generate(kind, 512).unwrap();
            let t = &w.trace;
            let mut digest = 0u64;
            for r in &t.requests {
                for v in [r.timestamp, r.input_length, r.output_length]
                    .into_iter()
                    .chain(r.hash_ids.iter().copied())
                {
                    digest = mix(digest ^ v);
                }
            }
            got.push(format!(
                "{} {} requests {} tokens {} blocks {} distinct {digest:016x}",
                w.name,
                t.requests.len(),
                t.requests.iter().map(|r| r.input_length).sum::<u64>(),
                t.total_blocks(),
                t.distinct_blocks()
            ));
        }
        assert_eq!(
            got,
            [
                "chat 200 requests 865483 tokens 1788 blocks 394 distinct 5d47ca0d35eb3133",
                "agent 320 requests 6668475 tokens 13200 blocks 1005 distinct 1a5dbd7e408063ac",
                "docqa 200 requests 4056937 tokens 8057 blocks 588 distinct 6098a5ee35332cd0",
            ]
        );
    }

    #[test]
    fn prng_is_deterministic_and_spread() {
        let mut r = SplitMix64::new(7);
        let a: Vec<u64> = (0..4).map(|_| r.next_u64()).collect();
        let mut r = SplitMix64::new(7);
        assert_eq!(a, (0..4).map(|_| r.next_u64()).collect::<Vec<_>>());
        let mut r = SplitMix64::new(1);
        let mut counts = [0u32; 4];
        for _ in 0..4000 {
            counts[(r.unit() * 4.0) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (900..1100).contains(&c)),
            "{counts:?}"
        );
        for _ in 0..1000 {
            let v = r.around(100, 0.5);
            assert!((50..=150).contains(&v));
        }
        assert_eq!(r.around(100, 0.0), 100);
    }
}
