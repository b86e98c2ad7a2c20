//! `bench engine`: radixkv's decode engine beside llama.cpp's server on the
//! same GGUF, the same machine and the same OpenAI-compatible requests.
//!
//! Both servers are started by the bench, one after the other (never at
//! the same time, so that each has the machine's cores), with the same
//! number of threads; llama.cpp otherwise runs with its defaults. Every
//! request is a streamed chat completion with a system message, greedy
//! (`temperature: 0`); times are measured by the client, from sending the
//! request to the arrival of the first (or last) chunk with text. The same
//! prompts go to both servers (generated from `--seed`); only the agent
//! sessions' histories differ, as each server's own answers are appended.
//!
//! 1. **Cold prefill**: a prompt of `--prompt-tokens` never seen before
//!    (a unique number opens it), one output token: prompt tokens / TTFT.
//! 2. **Decode, one stream**: `--decode-tokens` generated; (tokens − 1) /
//!    (last chunk − first chunk).
//! 3. **Decode, `--streams` at once**: the same, all sent together:
//!    Σ(tokens − 1) over the window from the first stream's first chunk to
//!    the last stream's last chunk, and its ratio to one stream.
//! 4. **Warm TTFT**: one system prompt of `--prompt-tokens` (sent once
//!    before), then different short user messages: TTFT.
//! 5. **Agent sessions**: `--sessions` sessions share one system prompt of
//!    `--prompt-tokens` and take turns round-robin, one request at a time;
//!    each turn sends the session's whole history (earlier user messages
//!    and the server's own answers of `--answer-tokens`) and a new user
//!    message. Per-turn mean TTFT and the mean TTFT after the first turn.
//!
//! The table gives each figure beside llama.cpp's and the ratio with the
//! goals of the engine issue; `--json` adds the run's commit, configuration,
//! machine, load averages and llama.cpp's cache flags, and an SVG chart of
//! the agent sessions' per-turn TTFT.

use crate::openai::{self, Streamed};
use crate::peer_llama::{self, LlamaFacts};
use crate::progress::Progress;
use crate::report::{self, RunInfo};
use crate::svg::{push_point, Chart};
use crate::workload::SplitMix64;
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    Both,
    Radixkv,
    Llama,
}

#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct EngineArgs {
    /// Small sizes, to check in a minute or two that everything runs:
    /// 200-token prompts, 32 decode tokens, 4 sessions of 3 turns.
    #[arg(long)]
    pub quick: bool,
    /// Which servers to measure.
    #[arg(long, value_enum, default_value = "both")]
    pub only: Which,
    /// The GGUF both servers load [default: models/SmolLM2-135M-Instruct.Q4_1.gguf,
    /// fetched by scripts/fetch-model when missing].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Threads of each server (`--threads` of both).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// The radixkv-engine binary [default: next to this one, else built
    /// with `cargo build --release -p engine`].
    #[arg(long)]
    pub engine_bin: Option<PathBuf>,
    /// More arguments for `radixkv-engine serve`, space separated.
    #[arg(long, allow_hyphen_values = true)]
    pub engine_args: Option<String>,
    /// The llama-server binary [default: the one scripts/llama-cpp builds,
    /// building it first when missing].
    #[arg(long)]
    pub llama_server: Option<PathBuf>,
    /// More arguments for llama-server, space separated (the comparison
    /// runs it with its defaults).
    #[arg(long, allow_hyphen_values = true)]
    pub llama_args: Option<String>,
    /// Tokens (about) of the cold prompt and of the shared system prompts
    /// [default: 1000; --quick: 200].
    #[arg(long)]
    pub prompt_tokens: Option<usize>,
    /// Tokens each decode stream asks for [default: 128; --quick: 32].
    #[arg(long)]
    pub decode_tokens: Option<usize>,
    /// Concurrent decode streams [default: 8].
    #[arg(long)]
    pub streams: Option<usize>,
    /// Repeats of the cold, decode (one stream, then all streams at once,
    /// in turns) and warm measurements; the median is reported [default:
    /// 3; --quick: 1 (warm: 2)].
    #[arg(long)]
    pub repeats: Option<usize>,
    /// Agent sessions sharing the system prompt [default: 16; --quick: 4].
    #[arg(long)]
    pub sessions: Option<usize>,
    /// Turns of each agent session [default: 6; --quick: 3].
    #[arg(long)]
    pub turns: Option<usize>,
    /// `max_tokens` of each agent turn's answer [default: 32; --quick: 16].
    #[arg(long)]
    pub answer_tokens: Option<usize>,
    /// Seed of the generated prompts.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Directory for the servers' logs [default: a temporary directory,
    /// removed at the end].
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// Write the results as JSON to this file (and, unless --svg says
    /// otherwise, the agent chart next to it with the extension .svg).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the agent sessions' per-turn TTFT chart (SVG) to this file.
    #[arg(long)]
    pub svg: Option<PathBuf>,
}

/// The workload's sizes, after `--quick` and the explicit flags.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Sizes {
    pub prompt_tokens: usize,
    pub decode_tokens: usize,
    pub streams: usize,
    pub repeats: usize,
    pub warm_repeats: usize,
    pub sessions: usize,
    pub turns: usize,
    pub answer_tokens: usize,
}

impl Sizes {
    pub fn of(a: &EngineArgs) -> Self {
        let q = a.quick;
        let repeats = a.repeats.unwrap_or(if q { 1 } else { 3 }).max(1);
        Self {
            prompt_tokens: a.prompt_tokens.unwrap_or(if q { 200 } else { 1000 }),
            decode_tokens: a.decode_tokens.unwrap_or(if q { 32 } else { 128 }).max(2),
            streams: a.streams.unwrap_or(8).max(1),
            repeats,
            warm_repeats: if a.repeats.is_some() || !q {
                repeats.max(2) * 2 - 1
            } else {
                2
            },
            sessions: a.sessions.unwrap_or(if q { 4 } else { 16 }).max(1),
            turns: a.turns.unwrap_or(if q { 3 } else { 6 }).max(1),
            answer_tokens: a.answer_tokens.unwrap_or(if q { 16 } else { 32 }).max(1),
        }
    }
}

// ---------------------------------------------------------------------------
// The workload: the same prompts for both servers.

/// The filler's vocabulary.
const WORDS: &str =
    "the system reads a file and writes its result to disk when user asks for report on \
     every table in database server keeps cache of recent requests so that next answer \
     comes faster each tool takes name list arguments returns short text with status code \
     error message if call fails agent should check before calling again weather city \
     date price order customer account balance invoice payment shipping address email \
     phone number search query page results limit sort field value update record delete \
     create new project task owner team meeting calendar time zone summary document \
     section title author version history change log green river mountain small large \
     quick careful always never only after while because about from into under over \
     between morning evening window garden kitchen library market station bridge";

const TOPICS: &[&str] = &[
    "a dragon who learns to cook",
    "a lighthouse keeper and a storm",
    "a robot that paints portraits",
    "two friends crossing a desert",
    "a city built under the sea",
    "a clockmaker who can stop time",
    "a cat who runs a bookshop",
    "the first day at a new school",
    "a mountain village in winter",
    "a detective who solves puzzles",
    "a ship lost in the fog",
    "a garden that grows at night",
    "a young inventor and her machine",
    "a train that never stops",
    "an astronaut returning home",
    "a market of forgotten things",
];

fn words() -> Vec<&'static str> {
    WORDS.split_whitespace().collect()
}

/// About `tokens` tokens of English-like sentences (SmolLM2's tokenizer
/// makes each of these words one token, and a sentence's punctuation one
/// more), deterministic for `rng`.
pub fn filler(rng: &mut SplitMix64, tokens: usize) -> String {
    let words = words();
    let mut out = String::new();
    let mut used = 0;
    while used < tokens {
        let len = 6 + (rng.next_u64() % 10) as usize;
        for i in 0..len {
            let w = words[(rng.next_u64() % words.len() as u64) as usize];
            if i == 0 {
                let mut c = w.chars();
                if !out.is_empty() {
                    out.push(' ');
                }
                out.extend(c.next().map(|f| f.to_ascii_uppercase()));
                out.push_str(c.as_str());
            } else {
                out.push(' ');
                out.push_str(w);
            }
        }
        out.push('.');
        used += len + 1;
    }
    out
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub role: &'static str,
    pub content: String,
}

impl Message {
    fn new(role: &'static str, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
        }
    }
}

/// A chat completion request's body: greedy, `max_tokens` at most.
pub fn chat_body(messages: &[Message], max_tokens: usize) -> Value {
    let messages: Vec<Value> = messages
        .iter()
        .map(|m| json!({"role": m.role, "content": m.content}))
        .collect();
    json!({"messages": messages, "max_tokens": max_tokens, "temperature": 0.0})
}

const ASSISTANT: &str = "You are a helpful assistant.";

/// Agent sessions sharing a system prompt, taking turns round-robin.
#[derive(Debug, Clone)]
pub struct AgentPlan {
    pub system: String,
    pub sessions: usize,
    pub turns: usize,
}

impl AgentPlan {
    /// The requests in the order they are sent: every session's first
    /// turn, then every session's second turn, and so on.
    pub fn order(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.turns).flat_map(move |t| (0..self.sessions).map(move |s| (s, t)))
    }

    /// The user message of session `s`'s turn `t`.
    pub fn user(&self, s: usize, t: usize) -> String {
        const ASKS: [&str; 6] = [
            "Look up the weather for the next meeting and tell me what to wear.",
            "The tool returned: status ok, 3 records. Summarize them briefly.",
            "Now update the second record's owner to the project team.",
            "The call failed with error code 409. What should we try next?",
            "Write a short email to the customer about the shipping date.",
            "List the remaining tasks in one line each.",
        ];
        format!("[session {s}, step {t}] {}", ASKS[(s + t) % ASKS.len()])
    }

    /// The messages of session `s`'s turn: the system prompt, the history
    /// (user messages with the answers given to them), the new user message.
    pub fn messages(&self, s: usize, history: &[(String, String)]) -> Vec<Message> {
        let mut m = vec![Message::new("system", self.system.clone())];
        for (user, answer) in history {
            m.push(Message::new("user", user.clone()));
            m.push(Message::new("assistant", answer.clone()));
        }
        m.push(Message::new("user", self.user(s, history.len())));
        m
    }
}

/// Every prompt of a run, built once from the seed.
#[derive(Debug, Clone)]
pub struct Plan {
    pub cold: Vec<Vec<Message>>,
    pub decode: Vec<Vec<Message>>,
    pub concurrent: Vec<Vec<Message>>,
    /// The first one primes the cache; the others are measured.
    pub warm: Vec<Vec<Message>>,
    pub agent: AgentPlan,
}

impl Plan {
    pub fn new(sizes: &Sizes, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed);
        let story = |i: usize| {
            vec![
                Message::new("system", ASSISTANT),
                Message::new(
                    "user",
                    format!(
                        "Write a long story about {}, with many details.",
                        TOPICS[i % TOPICS.len()]
                    ),
                ),
            ]
        };
        let cold = (0..sizes.repeats)
            .map(|_| {
                // A number never seen before opens the prompt, so no cache
                // holds any of it.
                let nonce = rng.next_u64() % 1_000_000_000;
                let body = filler(&mut rng, sizes.prompt_tokens.saturating_sub(30));
                vec![
                    Message::new("system", format!("Reference {nonce}. {body}")),
                    Message::new("user", "Summarize the reference in one sentence."),
                ]
            })
            .collect();
        let decode = (0..sizes.repeats).map(story).collect();
        let concurrent = (0..sizes.streams).map(|i| story(i + 1)).collect();
        let warm_system = format!(
            "You answer questions about this handbook. {}",
            filler(&mut rng, sizes.prompt_tokens.saturating_sub(30))
        );
        let vocabulary = words();
        let warm = (0..=sizes.warm_repeats)
            .map(|i| {
                vec![
                    Message::new("system", warm_system.clone()),
                    Message::new(
                        "user",
                        format!(
                            "Question {i}: what does the handbook say about {}?",
                            vocabulary[(i * 7) % vocabulary.len()]
                        ),
                    ),
                ]
            })
            .collect();
        let agent = AgentPlan {
            system: format!(
                "You are an agent. You can call these tools. {}",
                filler(&mut rng, sizes.prompt_tokens.saturating_sub(30))
            ),
            sessions: sizes.sessions,
            turns: sizes.turns,
        };
        Self {
            cold,
            decode,
            concurrent,
            warm,
            agent,
        }
    }
}

// ---------------------------------------------------------------------------
// Servers.

/// A server process started for the run, killed when dropped.
struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl ServerProcess {
    /// Starts `program args`, logging to `log`, and waits until its
    /// `/health` answers 200.
    fn start(program: &Path, args: &[String], port: u16, log: PathBuf) -> Result<Self> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        let mut server = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(300);
        loop {
            if let Some(status) = server.child.try_wait()? {
                bail!(
                    "{} exited ({status}) before serving; its log ({}):\n{}",
                    program.display(),
                    server.log.display(),
                    log_tail(&server.log, 30)
                );
            }
            if matches!(openai::get(server.addr, "/health"), Ok((200, _))) {
                return Ok(server);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not serve /health within 300 s; its log ({}):\n{}",
                    program.display(),
                    server.log.display(),
                    log_tail(&server.log, 30)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `--engine-bin`, else radixkv-engine next to this binary, else the one
/// `cargo build --release -p engine` leaves in the target directory.
fn engine_binary(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(b) = explicit {
        ensure!(b.is_file(), "no radixkv-engine at {}", b.display());
        return Ok(b.to_path_buf());
    }
    let exe = std::env::current_exe()?;
    if let Some(p) = exe.parent().map(|d| d.join("radixkv-engine")) {
        if p.is_file() {
            return Ok(p);
        }
    }
    let root = peer_llama::repo_root();
    eprintln!(
        "radixkv-engine not found next to {}: building it",
        exe.display()
    );
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "-p",
            "engine",
            "--bin",
            "radixkv-engine",
        ])
        .current_dir(&root)
        .status()
        .context("running cargo build")?;
    ensure!(status.success(), "cargo build -p engine failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let p = target.join("release").join("radixkv-engine");
    ensure!(p.is_file(), "cargo built no {}", p.display());
    Ok(p)
}

/// `--model`, else `RADIXKV_MODEL`, else the path scripts/fetch-model
/// prints (fetching the model when missing).
fn model_path(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(m) = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("RADIXKV_MODEL").map(PathBuf::from))
    {
        ensure!(m.is_file(), "no model at {}", m.display());
        return Ok(m);
    }
    let script = peer_llama::repo_root().join("scripts").join("fetch-model");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    ensure!(out.status.success(), "{} failed", script.display());
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    ensure!(p.is_file(), "scripts/fetch-model printed {}", p.display());
    Ok(p)
}

fn load_average() -> Option<String> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

// ---------------------------------------------------------------------------
// Measurements.

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

fn mean(v: impl IntoIterator<Item = f64>) -> f64 {
    let (sum, n) = v
        .into_iter()
        .fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    if n == 0 {
        f64::NAN
    } else {
        sum / n as f64
    }
}

const CHAT: &str = "/v1/chat/completions";

fn ttft(s: &Streamed) -> Result<Duration> {
    s.first.context("the answer had no text")
}

#[derive(Debug, Clone, Serialize)]
pub struct Cold {
    pub prompt_tokens: Vec<u64>,
    pub ttft_ms: Vec<f64>,
    /// Prompt tokens / TTFT, median over the repeats.
    pub prefill_tokens_per_s: f64,
    pub median_ttft_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Decode {
    pub tokens: Vec<u64>,
    pub tokens_per_s: Vec<f64>,
    pub median_tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Concurrent {
    pub streams: usize,
    /// One entry per repeat, each run right after a one-stream decode.
    pub rounds: Vec<ConcurrentRound>,
    /// Median over the rounds.
    pub aggregate_tokens_per_s: f64,
    /// Aggregate over the one-stream median.
    pub vs_single: f64,
}

/// All streams started at once, once.
#[derive(Debug, Clone, Serialize)]
pub struct ConcurrentRound {
    pub tokens: Vec<u64>,
    pub ttft_ms: Vec<f64>,
    /// From the first stream's first chunk to the last stream's last chunk.
    pub window_s: f64,
    pub aggregate_tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Warm {
    pub prompt_tokens: Vec<u64>,
    pub cached_tokens: Vec<Option<u64>>,
    /// The request that put the system prompt in the cache.
    pub prime_ttft_ms: f64,
    pub ttft_ms: Vec<f64>,
    pub median_ttft_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentRequest {
    pub session: usize,
    pub turn: usize,
    pub prompt_tokens: Option<u64>,
    pub cached_tokens: Option<u64>,
    pub completion_tokens: u64,
    pub ttft_ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Turn {
    /// From 1.
    pub turn: usize,
    pub mean_ttft_ms: f64,
    pub mean_prompt_tokens: f64,
    pub mean_cached_tokens: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Agent {
    pub sessions: usize,
    pub turns: Vec<Turn>,
    pub mean_ttft_after_first_ms: f64,
    pub requests: Vec<AgentRequest>,
}

impl Agent {
    fn of(sessions: usize, requests: Vec<AgentRequest>) -> Self {
        let n_turns = requests.iter().map(|r| r.turn + 1).max().unwrap_or(0);
        let turns = (0..n_turns)
            .map(|t| {
                let of: Vec<&AgentRequest> = requests.iter().filter(|r| r.turn == t).collect();
                let cached: Vec<f64> = of
                    .iter()
                    .filter_map(|r| r.cached_tokens.map(|c| c as f64))
                    .collect();
                Turn {
                    turn: t + 1,
                    mean_ttft_ms: mean(of.iter().map(|r| r.ttft_ms)),
                    mean_prompt_tokens: mean(
                        of.iter().filter_map(|r| r.prompt_tokens.map(|p| p as f64)),
                    ),
                    mean_cached_tokens: (cached.len() == of.len() && !cached.is_empty())
                        .then(|| mean(cached)),
                }
            })
            .collect();
        Self {
            sessions,
            turns,
            mean_ttft_after_first_ms: mean(
                requests.iter().filter(|r| r.turn > 0).map(|r| r.ttft_ms),
            ),
            requests,
        }
    }
}

/// One server's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ServerResults {
    pub name: String,
    pub binary: String,
    pub args: Vec<String>,
    /// /proc/loadavg (1, 5, 15 minutes) before and after its run.
    pub load_before: Option<String>,
    pub load_after: Option<String>,
    pub seconds: f64,
    /// Lines of the server's log that say how it placed requests, counted
    /// (llama.cpp: slot selection by prompt similarity or LRU).
    pub log_counts: Vec<(String, usize)>,
    pub cold: Cold,
    pub decode: Decode,
    pub concurrent: Concurrent,
    pub warm: Warm,
    pub agent: Agent,
}

/// Starts every stream of `plan.concurrent` at once and times them together.
fn concurrent_round(addr: SocketAddr, plan: &Plan, sizes: &Sizes) -> Result<ConcurrentRound> {
    let barrier = std::sync::Barrier::new(plan.concurrent.len());
    let results: Vec<Result<(Instant, Streamed)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = plan
            .concurrent
            .iter()
            .map(|m| {
                let barrier = &barrier;
                scope.spawn(move || {
                    barrier.wait();
                    let sent = Instant::now();
                    openai::stream(addr, CHAT, &chat_body(m, sizes.decode_tokens))
                        .map(|s| (sent, s))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("stream thread panicked")))
            })
            .collect()
    });
    let results = results.into_iter().collect::<Result<Vec<_>>>()?;
    let start = results
        .iter()
        .filter_map(|(sent, s)| s.first.map(|f| *sent + f))
        .min()
        .context("no stream produced text")?;
    let end = results
        .iter()
        .filter_map(|(sent, s)| s.last.map(|l| *sent + l))
        .max()
        .context("no stream produced text")?;
    let tokens: Vec<u64> = results.iter().map(|(_, s)| s.tokens()).collect();
    let window = end.duration_since(start).as_secs_f64();
    Ok(ConcurrentRound {
        ttft_ms: results
            .iter()
            .map(|(_, s)| s.first.map_or(f64::NAN, ms))
            .collect(),
        aggregate_tokens_per_s: tokens.iter().map(|n| n.saturating_sub(1)).sum::<u64>() as f64
            / window,
        tokens,
        window_s: window,
    })
}

fn measure(
    name: &str,
    addr: SocketAddr,
    plan: &Plan,
    sizes: &Sizes,
) -> Result<(Cold, Decode, Concurrent, Warm, Agent)> {
    let say = |what: &str| eprintln!("[{name}] {what}");
    // Warm-up: every code path once, on a prompt nothing else shares.
    openai::stream(
        addr,
        CHAT,
        &chat_body(
            &[
                Message::new("system", ASSISTANT),
                Message::new("user", "Hello!"),
            ],
            4,
        ),
    )
    .context("warm-up request")?;

    say("cold prefill");
    let mut cold = Cold {
        prompt_tokens: Vec::new(),
        ttft_ms: Vec::new(),
        prefill_tokens_per_s: 0.0,
        median_ttft_ms: 0.0,
    };
    let mut rates = Vec::new();
    for m in &plan.cold {
        let s = openai::stream(addr, CHAT, &chat_body(m, 1))?;
        let t = ttft(&s)?;
        let p = s.prompt_tokens.context("no usage.prompt_tokens")?;
        cold.prompt_tokens.push(p);
        cold.ttft_ms.push(ms(t));
        rates.push(p as f64 / t.as_secs_f64());
    }
    cold.prefill_tokens_per_s = median(&rates);
    cold.median_ttft_ms = median(&cold.ttft_ms);

    // One-stream and many-stream decode take turns, so that their ratio
    // compares runs a few seconds apart on a shared machine.
    say(&format!(
        "decode, one stream and {} streams at once, {} rounds",
        plan.concurrent.len(),
        plan.decode.len()
    ));
    let mut decode = Decode {
        tokens: Vec::new(),
        tokens_per_s: Vec::new(),
        median_tokens_per_s: 0.0,
    };
    let mut rounds = Vec::new();
    for m in &plan.decode {
        let s = openai::stream(addr, CHAT, &chat_body(m, sizes.decode_tokens))?;
        let n = s.tokens();
        let (first, last) = (ttft(&s)?, s.last.unwrap_or_default());
        ensure!(
            n >= 2 && last > first,
            "decode answer too short ({n} tokens) to time"
        );
        decode.tokens.push(n);
        decode
            .tokens_per_s
            .push((n - 1) as f64 / (last - first).as_secs_f64());
        rounds.push(concurrent_round(addr, plan, sizes)?);
    }
    decode.median_tokens_per_s = median(&decode.tokens_per_s);
    let aggregate = median(
        &rounds
            .iter()
            .map(|r| r.aggregate_tokens_per_s)
            .collect::<Vec<_>>(),
    );
    let concurrent = Concurrent {
        streams: plan.concurrent.len(),
        rounds,
        aggregate_tokens_per_s: aggregate,
        vs_single: aggregate / decode.median_tokens_per_s,
    };

    say("warm TTFT");
    let prime = openai::stream(addr, CHAT, &chat_body(&plan.warm[0], 1))?;
    let mut warm = Warm {
        prompt_tokens: Vec::new(),
        cached_tokens: Vec::new(),
        prime_ttft_ms: ms(ttft(&prime)?),
        ttft_ms: Vec::new(),
        median_ttft_ms: 0.0,
    };
    for m in &plan.warm[1..] {
        let s = openai::stream(addr, CHAT, &chat_body(m, 1))?;
        warm.ttft_ms.push(ms(ttft(&s)?));
        warm.prompt_tokens.push(s.prompt_tokens.unwrap_or(0));
        warm.cached_tokens.push(s.cached_tokens);
    }
    warm.median_ttft_ms = median(&warm.ttft_ms);

    say(&format!(
        "agent sessions: {} sessions x {} turns",
        plan.agent.sessions, plan.agent.turns
    ));
    let mut histories: Vec<Vec<(String, String)>> = vec![Vec::new(); plan.agent.sessions];
    let mut requests = Vec::new();
    let total = plan.agent.sessions * plan.agent.turns;
    let mut progress = Progress::new();
    for (i, (s, t)) in plan.agent.order().enumerate() {
        progress.show(|| format!("[{name}] agent request {}/{total}", i + 1));
        let messages = plan.agent.messages(s, &histories[s]);
        let r = openai::stream(addr, CHAT, &chat_body(&messages, sizes.answer_tokens))
            .with_context(|| format!("agent session {s}, turn {t}"))?;
        requests.push(AgentRequest {
            session: s,
            turn: t,
            prompt_tokens: r.prompt_tokens,
            cached_tokens: r.cached_tokens,
            completion_tokens: r.tokens(),
            ttft_ms: ms(ttft(&r)?),
        });
        let user = messages
            .last()
            .map(|m| m.content.clone())
            .unwrap_or_default();
        histories[s].push((user, r.text));
    }
    progress.clear();
    let agent = Agent::of(plan.agent.sessions, requests);
    Ok((cold, decode, concurrent, warm, agent))
}

/// Log lines worth counting: how llama.cpp picked a slot for each request
/// (by the similarity of the slot's prompt, keeping its cache, or the
/// least recently used one), and its warnings about prompt caching.
const LOG_PATTERNS: [&str; 4] = [
    "selected slot by LCP similarity",
    "selected slot by LRU",
    "failed to load prompt from cache",
    "cache_reuse is not supported",
];

fn run_server(
    name: &str,
    binary: &Path,
    args: Vec<String>,
    port: u16,
    log: PathBuf,
    plan: &Plan,
    sizes: &Sizes,
) -> Result<ServerResults> {
    eprintln!("[{name}] starting {} {}", binary.display(), args.join(" "));
    let load_before = load_average();
    let began = Instant::now();
    let server = ServerProcess::start(binary, &args, port, log)?;
    let measured = measure(name, server.addr, plan, sizes).with_context(|| {
        format!(
            "measuring {name}; its log ({}):\n{}",
            server.log.display(),
            log_tail(&server.log, 20)
        )
    })?;
    let log = std::fs::read_to_string(&server.log).unwrap_or_default();
    drop(server);
    let log_counts = LOG_PATTERNS
        .iter()
        .map(|p| (p.to_string(), log.lines().filter(|l| l.contains(p)).count()))
        .filter(|(_, n)| *n > 0)
        .collect();
    let (cold, decode, concurrent, warm, agent) = measured;
    Ok(ServerResults {
        name: name.into(),
        binary: binary.display().to_string(),
        args,
        load_before,
        load_after: load_average(),
        seconds: began.elapsed().as_secs_f64(),
        log_counts,
        cold,
        decode,
        concurrent,
        warm,
        agent,
    })
}

// ---------------------------------------------------------------------------
// The comparison.

#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// radixkv / llama.cpp at least this.
    RatioAtLeast(f64),
    /// radixkv / llama.cpp at most this.
    RatioAtMost(f64),
    /// radixkv's own figure at least this.
    AtLeast(f64),
    /// radixkv's own figure at most this.
    AtMost(f64),
}

impl Goal {
    fn met(self, radixkv: Option<f64>, ratio: Option<f64>) -> Option<bool> {
        match self {
            Goal::RatioAtLeast(g) => ratio.map(|r| r >= g),
            Goal::RatioAtMost(g) => ratio.map(|r| r <= g),
            Goal::AtLeast(g) => radixkv.map(|v| v >= g),
            Goal::AtMost(g) => radixkv.map(|v| v <= g),
        }
    }

    fn text(self, unit: &str) -> String {
        let unit = if unit == "x" {
            "x".to_string()
        } else {
            format!(" {unit}")
        };
        match self {
            Goal::RatioAtLeast(g) => format!(">= {g}x llama"),
            Goal::RatioAtMost(g) => format!("<= {g}x llama"),
            Goal::AtLeast(g) => format!(">= {g}{unit}"),
            Goal::AtMost(g) => format!("<= {g}{unit}"),
        }
    }
}

/// One line of the comparison.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub metric: String,
    pub unit: &'static str,
    pub radixkv: Option<f64>,
    pub llama_cpp: Option<f64>,
    /// radixkv / llama.cpp.
    pub ratio: Option<f64>,
    pub goal: Option<Goal>,
    pub met: Option<bool>,
}

impl Row {
    fn new(
        metric: String,
        unit: &'static str,
        radixkv: Option<f64>,
        llama_cpp: Option<f64>,
        goal: Option<Goal>,
    ) -> Self {
        let ratio = radixkv.zip(llama_cpp).map(|(r, l)| r / l);
        Self {
            metric,
            unit,
            met: goal.and_then(|g| g.met(radixkv, ratio)),
            radixkv,
            llama_cpp,
            ratio,
            goal,
        }
    }
}

/// The comparison's rows from each side's results (either may be absent).
pub fn rows(r: Option<&ServerResults>, l: Option<&ServerResults>, sizes: &Sizes) -> Vec<Row> {
    let f = |x: Option<&ServerResults>, get: &dyn Fn(&ServerResults) -> f64| x.map(get);
    let row = |metric: String, unit, get: &dyn Fn(&ServerResults) -> f64, goal| {
        Row::new(metric, unit, f(r, get), f(l, get), goal)
    };
    let p = sizes.prompt_tokens;
    vec![
        row(
            format!("cold prefill, ~{p}-token prompt"),
            "tok/s",
            &|s| s.cold.prefill_tokens_per_s,
            Some(Goal::RatioAtLeast(1.0)),
        ),
        row(
            format!("cold TTFT, ~{p}-token prompt"),
            "ms",
            &|s| s.cold.median_ttft_ms,
            None,
        ),
        row(
            format!("decode, 1 stream, {} tokens", sizes.decode_tokens),
            "tok/s",
            &|s| s.decode.median_tokens_per_s,
            Some(Goal::RatioAtLeast(0.8)),
        ),
        row(
            format!("decode, {} streams, aggregate", sizes.streams),
            "tok/s",
            &|s| s.concurrent.aggregate_tokens_per_s,
            None,
        ),
        row(
            format!("decode, {} streams / 1 stream", sizes.streams),
            "x",
            &|s| s.concurrent.vs_single,
            Some(Goal::AtLeast(3.0)),
        ),
        row(
            format!("warm TTFT, cached ~{p}-token system prompt"),
            "ms",
            &|s| s.warm.median_ttft_ms,
            Some(Goal::AtMost(100.0)),
        ),
        row(
            "warm: cached prompt tokens (median)".into(),
            "tok",
            &|s| {
                median(
                    &s.warm
                        .cached_tokens
                        .iter()
                        .map(|c| c.map_or(f64::NAN, |c| c as f64))
                        .collect::<Vec<_>>(),
                )
            },
            None,
        ),
        row(
            format!("agent: {} sessions, mean TTFT turn 1", sizes.sessions),
            "ms",
            &|s| s.agent.turns.first().map_or(f64::NAN, |t| t.mean_ttft_ms),
            None,
        ),
        row(
            format!("agent: mean TTFT turns 2..{}", sizes.turns),
            "ms",
            &|s| s.agent.mean_ttft_after_first_ms,
            Some(Goal::RatioAtMost(0.4)),
        ),
    ]
}

/// A figure with as many decimals as its size deserves.
fn num(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let opt = |v: Option<f64>| v.map_or("-".to_string(), num);
    let _ = writeln!(
        s,
        "{:<50} {:>9} {:>10} {:>10} {:>8}  goal",
        "measure", "radixkv", "llama.cpp", "radixkv/", "unit"
    );
    let _ = writeln!(s, "{:<50} {:>9} {:>10} {:>10}", "", "", "", "llama.cpp");
    for r in rows {
        let goal = r.goal.map_or(String::new(), |g| {
            let met = match r.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "?",
            };
            format!("{} ({met})", g.text(r.unit))
        });
        let _ = writeln!(
            s,
            "{:<50} {:>9} {:>10} {:>10} {:>8}  {goal}",
            r.metric,
            opt(r.radixkv),
            opt(r.llama_cpp),
            r.ratio.map_or("-".into(), |x| format!("{}x", num(x))),
            r.unit,
        );
    }
    s
}

/// Per-turn agent figures of both sides.
pub fn turn_table(r: Option<&ServerResults>, l: Option<&ServerResults>) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:>4}  {:>21}  {:>21}  {:>9}",
        "turn", "radixkv TTFT ms", "llama.cpp TTFT ms", "radixkv/"
    );
    let _ = writeln!(
        s,
        "{:>4}  {:>21}  {:>21}  {:>9}",
        "", "(prompt / cached tok)", "(prompt / cached tok)", "llama.cpp"
    );
    let n = r
        .map_or(0, |x| x.agent.turns.len())
        .max(l.map_or(0, |x| x.agent.turns.len()));
    let cell = |x: Option<&ServerResults>, t: usize| {
        x.and_then(|x| x.agent.turns.get(t))
            .map_or("-".to_string(), |t| {
                format!(
                    "{} ({}/{})",
                    num(t.mean_ttft_ms),
                    num(t.mean_prompt_tokens),
                    t.mean_cached_tokens.map_or("-".into(), num)
                )
            })
    };
    for t in 0..n {
        let ttft = |x: Option<&ServerResults>| {
            x.and_then(|x| x.agent.turns.get(t)).map(|t| t.mean_ttft_ms)
        };
        let ratio = ttft(r)
            .zip(ttft(l))
            .map_or("-".into(), |(a, b)| format!("{}x", num(a / b)));
        let _ = writeln!(
            s,
            "{:>4}  {:>21}  {:>21}  {:>9}",
            t + 1,
            cell(r, t),
            cell(l, t),
            ratio
        );
    }
    s
}

/// The agent sessions' mean TTFT per turn, one line per server.
pub fn agent_chart(servers: &[ServerResults]) -> Chart {
    let mut series = Vec::new();
    for s in servers {
        for t in &s.agent.turns {
            push_point(&mut series, &s.name, false, t.turn as f64, t.mean_ttft_ms);
        }
    }
    Chart {
        title: format!(
            "Agent sessions sharing a system prompt: mean TTFT per turn ({} sessions)",
            servers.first().map_or(0, |s| s.agent.sessions)
        ),
        x_label: "turn".into(),
        y_label: "mean TTFT, ms".into(),
        series,
        hlines: Vec::new(),
    }
}

#[derive(Debug, Serialize)]
pub struct EngineReport {
    pub run: RunInfo,
    pub sizes: Sizes,
    pub model: String,
    pub llama: Option<LlamaFacts>,
    pub servers: Vec<ServerResults>,
    pub comparison: Vec<Row>,
}

fn split_args(extra: Option<&str>) -> Vec<String> {
    extra
        .map(|e| e.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

pub fn run(args: &EngineArgs) -> Result<()> {
    let sizes = Sizes::of(args);
    let run = RunInfo::collect(serde_json::to_value(args)?);
    let model = model_path(args.model.as_deref())?;
    let plan = Plan::new(&sizes, args.seed);
    let tmp;
    let log_dir = match &args.log_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let (want_r, want_l) = (args.only != Which::Llama, args.only != Which::Radixkv);
    // Both binaries first, so that a build does not run between the two.
    let engine = want_r
        .then(|| engine_binary(args.engine_bin.as_deref()))
        .transpose()?;
    let llama = want_l
        .then(|| peer_llama::ensure_built(args.llama_server.as_deref()))
        .transpose()?;
    let facts = llama.as_deref().map(LlamaFacts::probe).transpose()?;
    let mut servers = Vec::new();
    if let Some(bin) = &engine {
        let port = free_port()?;
        let mut a: Vec<String> = vec![
            "serve".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
            "--model".into(),
            model.display().to_string(),
            "--threads".into(),
            args.threads.to_string(),
        ];
        a.extend(split_args(args.engine_args.as_deref()));
        servers.push(run_server(
            "radixkv",
            bin,
            a,
            port,
            log_dir.join("radixkv-engine.log"),
            &plan,
            &sizes,
        )?);
    }
    if let Some(bin) = &llama {
        let port = free_port()?;
        let mut a = peer_llama::server_args(&model, port, args.threads);
        a.extend(split_args(args.llama_args.as_deref()));
        servers.push(run_server(
            "llama.cpp",
            bin,
            a,
            port,
            log_dir.join("llama-server.log"),
            &plan,
            &sizes,
        )?);
    }
    let by = |n: &str| servers.iter().find(|s| s.name == n);
    let (r, l) = (by("radixkv"), by("llama.cpp"));
    let comparison = rows(r, l, &sizes);
    println!("{}", table(&comparison));
    println!(
        "agent sessions, per turn (mean over {} sessions):",
        sizes.sessions
    );
    println!("{}", turn_table(r, l));
    if let (Some(r), Some(l)) = (r, l) {
        let (a, b) = (&r.cold.prompt_tokens, &l.cold.prompt_tokens);
        if a != b {
            println!("note: the two tokenized the cold prompts differently: {a:?} vs {b:?}");
        }
    }
    if let Some(f) = &facts {
        println!("llama.cpp {}; its prompt-cache and slot flags:", f.version);
        for (_, text) in &f.cache_flags {
            println!("  {text}");
        }
        if !f.missing_flags.is_empty() {
            println!("  (not in this version: {})", f.missing_flags.join(", "));
        }
    }
    for s in &servers {
        println!(
            "{}: {:.0} s, load average before {} after {}",
            s.name,
            s.seconds,
            s.load_before.as_deref().unwrap_or("?"),
            s.load_after.as_deref().unwrap_or("?")
        );
        for (line, n) in &s.log_counts {
            println!("  log: {n} x \"{line}\"");
        }
    }
    let chart = agent_chart(&servers);
    let report = EngineReport {
        run,
        sizes,
        model: model.display().to_string(),
        llama: facts,
        servers,
        comparison,
    };
    report::write_outputs(&report, &chart, args.json.as_deref(), args.svg.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> Sizes {
        let args = EngineArgs {
            quick: true,
            only: Which::Both,
            model: None,
            threads: 2,
            engine_bin: None,
            engine_args: None,
            llama_server: None,
            llama_args: None,
            prompt_tokens: None,
            decode_tokens: None,
            streams: None,
            repeats: None,
            sessions: None,
            turns: None,
            answer_tokens: None,
            seed: 1,
            log_dir: None,
            json: None,
            svg: None,
        };
        Sizes::of(&args)
    }

    #[test]
    fn agent_sessions_take_turns_round_robin_with_their_history() {
        let plan = AgentPlan {
            system: "SYS".into(),
            sessions: 3,
            turns: 2,
        };
        let order: Vec<_> = plan.order().collect();
        assert_eq!(order, [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]);
        let first = plan.messages(1, &[]);
        assert_eq!(first.len(), 2);
        assert_eq!(first[0], Message::new("system", "SYS"));
        assert_eq!(first[1].content, plan.user(1, 0));
        let history = vec![(plan.user(1, 0), "answer one".to_string())];
        let second = plan.messages(1, &history);
        let roles: Vec<_> = second.iter().map(|m| m.role).collect();
        assert_eq!(roles, ["system", "user", "assistant", "user"]);
        assert_eq!(second[2].content, "answer one");
        assert_eq!(second[3].content, plan.user(1, 1));
        // The turn's prompt extends the previous one: a prefix cache can
        // reuse all of it.
        assert_eq!(second[..2], first[..]);
        assert_ne!(plan.user(0, 1), plan.user(1, 1), "sessions differ");
    }

    #[test]
    fn plan_is_deterministic_and_cold_prompts_are_unique() {
        let sizes = quick();
        let (a, b) = (Plan::new(&sizes, 7), Plan::new(&sizes, 7));
        assert_eq!(a.cold, b.cold);
        assert_eq!(a.agent.system, b.agent.system);
        let c = Plan::new(
            &Sizes {
                repeats: 3,
                ..sizes.clone()
            },
            7,
        );
        assert_eq!(c.cold.len(), 3);
        assert_ne!(c.cold[0][0].content[..20], c.cold[1][0].content[..20]);
        assert_eq!(a.concurrent.len(), sizes.streams);
        assert_eq!(a.warm.len(), sizes.warm_repeats + 1);
        assert!(a
            .warm
            .windows(2)
            .all(|w| w[0][0] == w[1][0] && w[0][1] != w[1][1]));
        // About the asked length: a word per token, a period per sentence.
        let words = filler(&mut SplitMix64::new(1), 1000)
            .split_whitespace()
            .count();
        assert!((800..=1000).contains(&words), "{words} words");
        let body = chat_body(&a.cold[0], 1);
        assert_eq!(body["temperature"], 0.0);
        assert_eq!(body["messages"][1]["role"], "user");
    }

    #[test]
    fn quick_and_full_sizes() {
        let q = quick();
        assert_eq!(
            (
                q.prompt_tokens,
                q.sessions,
                q.turns,
                q.repeats,
                q.warm_repeats
            ),
            (200, 4, 3, 1, 2)
        );
    }

    fn results(name: &str, scale: f64) -> ServerResults {
        let reqs = (0..2)
            .flat_map(|t| {
                (0..2).map(move |s| AgentRequest {
                    session: s,
                    turn: t,
                    prompt_tokens: Some(100 + 20 * t as u64),
                    cached_tokens: Some(90),
                    completion_tokens: 8,
                    ttft_ms: scale * (10.0 + 10.0 * t as f64 + s as f64),
                })
            })
            .collect();
        ServerResults {
            name: name.into(),
            binary: String::new(),
            args: Vec::new(),
            load_before: None,
            load_after: None,
            seconds: 1.0,
            log_counts: Vec::new(),
            cold: Cold {
                prompt_tokens: vec![1000],
                ttft_ms: vec![1000.0 * scale],
                prefill_tokens_per_s: 1000.0 / scale,
                median_ttft_ms: 1000.0 * scale,
            },
            decode: Decode {
                tokens: vec![128],
                tokens_per_s: vec![60.0],
                median_tokens_per_s: 60.0,
            },
            concurrent: Concurrent {
                streams: 8,
                rounds: vec![ConcurrentRound {
                    tokens: vec![128; 8],
                    ttft_ms: vec![1.0; 8],
                    window_s: 1.0,
                    aggregate_tokens_per_s: 240.0 / scale,
                }],
                aggregate_tokens_per_s: 240.0 / scale,
                vs_single: 4.0 / scale,
            },
            warm: Warm {
                prompt_tokens: vec![1000],
                cached_tokens: vec![Some(990)],
                prime_ttft_ms: 1.0,
                ttft_ms: vec![90.0 * scale],
                median_ttft_ms: 90.0 * scale,
            },
            agent: Agent::of(2, reqs),
        }
    }

    #[test]
    fn comparison_rows_ratios_and_goals() {
        let (r, l) = (results("radixkv", 1.0), results("llama.cpp", 2.0));
        assert_eq!(r.agent.turns.len(), 2);
        assert_eq!(r.agent.turns[1].mean_ttft_ms, 20.5);
        assert_eq!(r.agent.turns[1].mean_prompt_tokens, 120.0);
        assert_eq!(r.agent.mean_ttft_after_first_ms, 20.5);
        let rows = rows(Some(&r), Some(&l), &quick());
        let get = |m: &str| rows.iter().find(|x| x.metric.starts_with(m)).unwrap();
        let prefill = get("cold prefill");
        assert_eq!(prefill.ratio, Some(2.0));
        assert_eq!(prefill.met, Some(true));
        assert_eq!(get("decode, 1 stream").ratio, Some(1.0));
        assert_eq!(get("decode, 8 streams /").met, Some(true), "4x single");
        assert_eq!(get("warm TTFT").met, Some(true), "90 ms");
        let agent = get("agent: mean TTFT turns");
        assert_eq!(agent.ratio, Some(0.5));
        assert_eq!(agent.met, Some(false), "0.5x misses <= 0.4x");
        let text = table(&rows);
        assert!(text.contains("<= 0.4x llama (MISSED)"), "{text}");
        assert!(text.contains("<= 100 ms (met)"), "{text}");
        assert!(text.contains(">= 3x (met)"), "{text}");
        let turns = turn_table(Some(&r), Some(&l));
        assert!(turns.contains("0.50x"), "{turns}");
        // One side alone: figures, no ratios.
        let alone = super::rows(Some(&r), None, &quick());
        assert!(alone
            .iter()
            .all(|x| x.ratio.is_none() && x.llama_cpp.is_none()));
        let chart = agent_chart(&[r, l]);
        assert_eq!(chart.series.len(), 2);
        assert!(chart.render().contains("llama.cpp"));
    }
}
