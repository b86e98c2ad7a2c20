//! The OpenAI-compatible HTTP API over a [`Scheduler`].
//!
//! - `POST /v1/chat/completions` (ChatML: `<|im_start|>{role}\n{content}<|im_end|>\n`
//!   per message, then `<|im_start|>assistant\n`) and `POST /v1/completions`
//!   (a string prompt, or token ids); `stream: true` answers with
//!   server-sent events (`data: {chunk}\n\n`, ending `data: [DONE]\n\n`).
//! - Decoding is greedy when `temperature` is absent or 0, and sampled
//!   otherwise ([`sampling`](crate::sampling)): `temperature` in `[0, 2]`,
//!   `top_p` in `(0, 1]`, and `seed` (an integer; the same seed and prompt
//!   give the same tokens, batched or not, cached or not). Without a seed
//!   one is drawn, and reported as `radixkv.seed`.
//! - Generation stops at `<|im_end|>` (not part of the text), at
//!   `max_tokens` (default 256; `max_completion_tokens` is read too;
//!   `finish_reason` "length"), or at a `stop` string (a string or up to
//!   four; `finish_reason` "stop"): the text ends before it. A stream holds
//!   back any end of its text that could be the start of a stop string, so
//!   no part of one is ever sent.
//! - `usage` reports `prompt_tokens`, `completion_tokens`, `total_tokens`
//!   and `prompt_tokens_details.cached_tokens` (the prompt tokens whose KV
//!   came from the cache). Time to first token, from the request's arrival,
//!   is the `x-radixkv-ttft-ms` header of a non-streamed answer and the
//!   `radixkv.ttft_ms` field of its body and of the last streamed chunk.
//! - `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
//! - Bad requests (malformed JSON, unknown model, too long for the context,
//!   sampling settings or stop strings out of bounds) get a 4xx with an
//!   OpenAI-style error body. A client that goes away mid-stream drops its
//!   receiver, which cancels its sequence.

use crate::engine::{stop_at, FinishReason, GenerateOptions, Generation};
use crate::error::EngineError;
use crate::sampling::{random_seed, Sampling};
use crate::scheduler::{Event, Scheduler};
use crate::tokenizer::Tokenizer;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;

/// Settings of the HTTP API.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The model name `/v1/models` lists and requests may name.
    pub model_name: String,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// The cache tenant of every request.
    pub tenant: String,
}

impl HttpConfig {
    /// Serves `model_name`, 256 tokens by default, tenant `default`.
    pub fn new(model_name: impl Into<String>) -> Self {
        Self {
            model_name: model_name.into(),
            default_max_tokens: 256,
            tenant: "default".into(),
        }
    }
}

/// Upper bounds (seconds) of the TTFT histogram's buckets.
const TTFT_BUCKETS: [f64; 12] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The API's own counters (the scheduler's are read when rendering).
#[derive(Debug, Default)]
struct Metrics {
    requests: AtomicU64,
    bad_requests: AtomicU64,
    prompt_tokens: AtomicU64,
    cached_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    ttft_buckets: [AtomicU64; TTFT_BUCKETS.len()],
    ttft_count: AtomicU64,
    ttft_micros: AtomicU64,
    /// Time after the first token, over completions of 2 tokens or more,
    /// and the tokens it produced.
    decode_micros: AtomicU64,
    decode_tokens: AtomicU64,
}

impl Metrics {
    fn record(&self, g: &Generation, ttft: Duration, total: Duration) {
        self.prompt_tokens
            .fetch_add(g.prompt_tokens as u64, Ordering::Relaxed);
        self.cached_tokens
            .fetch_add(g.cached_tokens as u64, Ordering::Relaxed);
        self.completion_tokens
            .fetch_add(g.tokens.len() as u64, Ordering::Relaxed);
        let secs = ttft.as_secs_f64();
        for (bucket, &le) in self.ttft_buckets.iter().zip(&TTFT_BUCKETS) {
            if secs <= le {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.ttft_count.fetch_add(1, Ordering::Relaxed);
        self.ttft_micros
            .fetch_add(ttft.as_micros() as u64, Ordering::Relaxed);
        if g.tokens.len() > 1 {
            self.decode_micros
                .fetch_add((total - ttft).as_micros() as u64, Ordering::Relaxed);
            self.decode_tokens
                .fetch_add(g.tokens.len() as u64 - 1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
struct AppState {
    scheduler: Arc<Scheduler>,
    config: HttpConfig,
    metrics: Metrics,
    next_id: AtomicU64,
}

/// The API's routes over `scheduler`.
pub fn router(scheduler: Arc<Scheduler>, config: HttpConfig) -> Router {
    let state = Arc::new(AppState {
        scheduler,
        config,
        metrics: Metrics::default(),
        next_id: AtomicU64::new(1),
    });
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/v1/models", get(models))
        .route("/health", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves the API on `listener` until the future is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    scheduler: Arc<Scheduler>,
    config: HttpConfig,
) -> std::io::Result<()> {
    axum::serve(listener, router(scheduler, config)).await
}

/// An OpenAI-style error answer.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            kind: "invalid_request_error",
            message: message.into(),
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::EmptyPrompt
            | EngineError::TokenOutOfVocab { .. }
            | EngineError::ContextTooLong { .. }
            | EngineError::InvalidArgument(_)
            | EngineError::Tokenizer(_) => ApiError::bad(e.to_string()),
            e => ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                kind: "server_error",
                message: e.to_string(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message, "type": self.kind, "param": null, "code": null,
        }});
        (self.status, axum::Json(body)).into_response()
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Debug, Deserialize)]
struct Part {
    #[serde(default)]
    text: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

/// The fields both endpoints read; others are ignored.
#[derive(Debug, Deserialize)]
struct Request {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    messages: Option<Vec<Message>>,
    #[serde(default)]
    prompt: Option<Prompt>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    top_p: Option<f64>,
    #[serde(default)]
    seed: Option<serde_json::Number>,
    #[serde(default)]
    stop: Option<Stop>,
}

/// ChatML, as SmolLM2's template writes it.
pub fn chat_template(messages: &[(&str, &str)]) -> String {
    let mut text = String::new();
    for (role, content) in messages {
        let _ = write!(text, "<|im_start|>{role}\n{content}<|im_end|>\n");
    }
    text.push_str("<|im_start|>assistant\n");
    text
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Chat,
    Completion,
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    handle(s, body, Kind::Chat)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    handle(s, body, Kind::Completion)
        .await
        .unwrap_or_else(IntoResponse::into_response)
}

async fn handle(s: Arc<AppState>, body: Bytes, kind: Kind) -> Result<Response, ApiError> {
    let arrived = Instant::now();
    s.metrics.requests.fetch_add(1, Ordering::Relaxed);
    let result = prepare(&s, &body, kind);
    let (prompt, options, stream) = match result {
        Ok(p) => p,
        Err(e) => {
            s.metrics.bad_requests.fetch_add(1, Ordering::Relaxed);
            return Err(e);
        }
    };
    let (sampling, stop) = (options.sampling, options.stop.clone());
    let rx = s.scheduler.submit(prompt, options).inspect_err(|_| {
        s.metrics.bad_requests.fetch_add(1, Ordering::Relaxed);
    })?;
    let id = format!(
        "{}-{}",
        if kind == Kind::Chat {
            "chatcmpl"
        } else {
            "cmpl"
        },
        s.next_id.fetch_add(1, Ordering::Relaxed)
    );
    let reply = Reply {
        s,
        kind,
        id,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        arrived,
        rx,
        text: TextDecoder::new(stop),
        ttft: None,
        sampling,
    };
    if stream {
        Ok(reply.stream())
    } else {
        reply.whole().await
    }
}

/// Parses and checks a request: its prompt's tokens, the generation's
/// options, and whether to stream.
fn prepare(
    s: &AppState,
    body: &[u8],
    kind: Kind,
) -> Result<(Vec<u32>, GenerateOptions, bool), ApiError> {
    let req: Request =
        serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("malformed JSON: {e}")))?;
    if let Some(m) = req.model.as_deref() {
        if !m.is_empty() && m != s.config.model_name {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                kind: "invalid_request_error",
                message: format!(
                    "the model `{m}` does not exist; this server runs `{}`",
                    s.config.model_name
                ),
            });
        }
    }
    let sampling = sampling(&req)?;
    let tokenizer = s.scheduler.engine().tokenizer();
    let prompt = match kind {
        Kind::Chat => {
            let messages = req
                .messages
                .ok_or_else(|| ApiError::bad("`messages` is required"))?;
            if messages.is_empty() {
                return Err(ApiError::bad("`messages` is empty"));
            }
            let texts: Vec<(String, String)> = messages
                .into_iter()
                .map(|m| {
                    let content = match m.content {
                        None => String::new(),
                        Some(Content::Text(t)) => t,
                        Some(Content::Parts(parts)) => {
                            parts.into_iter().filter_map(|p| p.text).collect()
                        }
                    };
                    (m.role, content)
                })
                .collect();
            let pairs: Vec<(&str, &str)> = texts
                .iter()
                .map(|(r, c)| (r.as_str(), c.as_str()))
                .collect();
            tokenizer.encode(&chat_template(&pairs))?
        }
        Kind::Completion => match req.prompt {
            Some(Prompt::Text(t)) => tokenizer.encode(&t)?,
            Some(Prompt::Ids(ids)) => ids,
            None => return Err(ApiError::bad("`prompt` is required")),
        },
    };
    let max = req
        .max_tokens
        .or(req.max_completion_tokens)
        .unwrap_or(s.config.default_max_tokens);
    let mut options = GenerateOptions::new(max);
    options.tenant = s.config.tenant.clone();
    options.sampling = sampling;
    options.stop = match req.stop {
        None => Vec::new(),
        Some(Stop::One(s)) => vec![s],
        Some(Stop::Many(v)) => v,
    };
    // The engine checks the stop strings (and the rest) at submission.
    Ok((prompt, options, req.stream))
}

/// The request's sampling: greedy without a temperature or at 0; checked.
fn sampling(req: &Request) -> Result<Sampling, ApiError> {
    let seed = match &req.seed {
        None => None,
        // Negative seeds are seeds too (as their two's complement).
        Some(n) => Some(
            n.as_u64()
                .or(n.as_i64().map(|i| i as u64))
                .ok_or_else(|| ApiError::bad(format!("seed {n} is not an integer")))?,
        ),
    };
    let sampling = Sampling {
        temperature: req.temperature.unwrap_or(0.0) as f32,
        top_p: req.top_p.unwrap_or(1.0) as f32,
        seed: 0,
    };
    sampling.check()?;
    Ok(if sampling.is_greedy() {
        Sampling::greedy()
    } else {
        Sampling {
            seed: seed.unwrap_or_else(random_seed),
            ..sampling
        }
    })
}

/// Turns tokens into text as they come, holding back a character split
/// across tokens and any end of the text that could begin a stop string,
/// cutting the text before the first stop string, and leaving out the
/// end-of-sequence token.
#[derive(Debug, Default)]
struct TextDecoder {
    tokens: Vec<u32>,
    sent: usize,
    stop: Vec<String>,
    /// The text reached a stop string: nothing more goes out.
    stopped: bool,
}

impl TextDecoder {
    fn new(stop: Vec<String>) -> Self {
        Self {
            stop,
            ..Self::default()
        }
    }

    /// The text that `token` completes (possibly none yet).
    fn push(&mut self, tokenizer: &Tokenizer, token: u32) -> Result<String, EngineError> {
        if self.stopped {
            return Ok(String::new());
        }
        if Some(token) != tokenizer.eos() {
            self.tokens.push(token);
        }
        // Outputs are short: decoding the whole run each time is cheap.
        let text = tokenizer.decode(&self.tokens)?;
        if let Some(cut) = stop_at(&text, &self.stop) {
            self.stopped = true;
            return Ok(self.take(&text, cut));
        }
        if text.ends_with('\u{FFFD}') || text.len() < self.sent {
            return Ok(String::new());
        }
        let end = text.len() - stop_prefix(&text, &self.stop);
        Ok(self.take(&text, end))
    }

    /// What is held back at the end, if anything.
    fn rest(&mut self, tokenizer: &Tokenizer) -> Result<String, EngineError> {
        if self.stopped {
            return Ok(String::new());
        }
        let text = tokenizer.decode(&self.tokens)?;
        let end = match stop_at(&text, &self.stop) {
            Some(cut) => {
                self.stopped = true;
                cut
            }
            None => text.len(),
        };
        Ok(self.take(&text, end))
    }

    /// `text` from what was sent up to `end`.
    fn take(&mut self, text: &str, end: usize) -> String {
        if end <= self.sent {
            return String::new();
        }
        let new = text.get(self.sent..end).unwrap_or_default().to_string();
        self.sent = end;
        new
    }
}

/// The length of the longest end of `text` that is the start (not the
/// whole) of a stop string. It begins on a character boundary, since a
/// stop string does.
fn stop_prefix(text: &str, stop: &[String]) -> usize {
    let text = text.as_bytes();
    stop.iter()
        .filter_map(|s| {
            let s = s.as_bytes();
            (1..s.len()).rev().find(|&k| text.ends_with(&s[..k]))
        })
        .max()
        .unwrap_or(0)
}

struct Reply {
    s: Arc<AppState>,
    kind: Kind,
    id: String,
    created: u64,
    arrived: Instant,
    rx: UnboundedReceiver<Event>,
    text: TextDecoder,
    ttft: Option<Duration>,
    sampling: Sampling,
}

fn usage(g: &Generation) -> Value {
    json!({
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.tokens.len(),
        "total_tokens": g.prompt_tokens + g.tokens.len(),
        "prompt_tokens_details": {"cached_tokens": g.cached_tokens},
    })
}

impl Reply {
    fn ttft_ms(&self) -> f64 {
        self.ttft.unwrap_or_default().as_secs_f64() * 1e3
    }

    /// The next event: `Ok(Some(text))` for a token, `Ok(None)` at the end
    /// (with the generation), or an error.
    async fn next(&mut self) -> Result<Step, ApiError> {
        loop {
            match self.rx.recv().await {
                Some(Event::Started { .. }) => {}
                Some(Event::Token(t)) => {
                    if self.ttft.is_none() {
                        self.ttft = Some(self.arrived.elapsed());
                    }
                    let text = {
                        let tokenizer = self.s.scheduler.engine().tokenizer();
                        self.text.push(tokenizer, t)?
                    };
                    return Ok(Step::Text(text));
                }
                Some(Event::Done(g)) => {
                    let rest = {
                        let tokenizer = self.s.scheduler.engine().tokenizer();
                        self.text.rest(tokenizer)?
                    };
                    let ttft = self.ttft.unwrap_or_default();
                    self.s.metrics.record(&g, ttft, self.arrived.elapsed());
                    return Ok(Step::Done(g, rest));
                }
                Some(Event::Failed(e)) => return Err(e.into()),
                None => {
                    return Err(ApiError {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        kind: "server_error",
                        message: "the engine stopped".into(),
                    })
                }
            }
        }
    }

    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn radixkv(&self, g: &Generation) -> Value {
        let mut v = json!({
            "ttft_ms": self.ttft_ms(),
            "cached_tokens": g.cached_tokens,
            "completion_ids": g.tokens,
        });
        if !self.sampling.is_greedy() {
            v["seed"] = json!(self.sampling.seed);
        }
        v
    }

    /// OpenAI's `finish_reason`: a stop string or the end of sequence is
    /// "stop", running out of tokens "length".
    fn finish_reason(&self, g: &Generation) -> &'static str {
        match g.finish {
            _ if self.text.stopped => "stop",
            FinishReason::Eos | FinishReason::Stop => "stop",
            FinishReason::Length => "length",
        }
    }

    /// The whole answer as one JSON body.
    async fn whole(mut self) -> Result<Response, ApiError> {
        let mut text = String::new();
        let (g, rest) = loop {
            match self.next().await? {
                Step::Text(t) => text.push_str(&t),
                Step::Done(g, rest) => break (g, rest),
            }
        };
        text.push_str(&rest);
        let choice = match self.kind {
            Kind::Chat => json!({
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": self.finish_reason(&g),
            }),
            Kind::Completion => json!({
                "index": 0, "text": text, "logprobs": null,
                "finish_reason": self.finish_reason(&g),
            }),
        };
        let body = json!({
            "id": self.id,
            "object": self.object(false),
            "created": self.created,
            "model": self.s.config.model_name,
            "choices": [choice],
            "usage": usage(&g),
            "radixkv": self.radixkv(&g),
        });
        let mut headers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", self.ttft_ms())) {
            headers.insert("x-radixkv-ttft-ms", v);
        }
        if let Ok(v) = HeaderValue::from_str(&g.cached_tokens.to_string()) {
            headers.insert("x-radixkv-cached-tokens", v);
        }
        Ok((headers, axum::Json(body)).into_response())
    }

    fn chunk(&self, text: Option<&str>, finish: Option<&str>) -> Value {
        let choice = match self.kind {
            Kind::Chat => {
                let delta = match text {
                    Some(t) => json!({"role": "assistant", "content": t}),
                    None => json!({}),
                };
                json!({"index": 0, "delta": delta, "finish_reason": finish})
            }
            Kind::Completion => {
                json!({"index": 0, "text": text.unwrap_or(""), "logprobs": null, "finish_reason": finish})
            }
        };
        json!({
            "id": self.id,
            "object": self.object(true),
            "created": self.created,
            "model": self.s.config.model_name,
            "choices": [choice],
        })
    }

    /// Server-sent events, fed by a task that ends (dropping the request's
    /// receiver, which cancels it) when the client is gone.
    fn stream(mut self) -> Response {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<SseEvent, std::convert::Infallible>>(64);
        tokio::spawn(async move {
            let data = |v: &Value| Ok(SseEvent::default().data(v.to_string()));
            loop {
                let step = self.next().await;
                let out = match step {
                    Ok(Step::Text(t)) if t.is_empty() => continue,
                    Ok(Step::Text(t)) => data(&self.chunk(Some(&t), None)),
                    Ok(Step::Done(g, rest)) => {
                        if !rest.is_empty()
                            && tx.send(data(&self.chunk(Some(&rest), None))).await.is_err()
                        {
                            return;
                        }
                        let mut last = self.chunk(None, Some(self.finish_reason(&g)));
                        last["usage"] = usage(&g);
                        last["radixkv"] = self.radixkv(&g);
                        if tx.send(data(&last)).await.is_err() {
                            return;
                        }
                        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                        return;
                    }
                    Err(e) => {
                        let body = json!({"error": {"message": e.message, "type": e.kind, "param": null, "code": null}});
                        let _ = tx.send(data(&body)).await;
                        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
                        return;
                    }
                };
                if tx.send(out).await.is_err() {
                    return;
                }
            }
        });
        let body = tokio_stream::wrappers::ReceiverStream::new(rx);
        let mut response = Sse::new(body).into_response();
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        response
    }
}

enum Step {
    Text(String),
    Done(Generation, String),
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    axum::Json(json!({
        "object": "list",
        "data": [{"id": s.config.model_name, "object": "model", "created": 0, "owned_by": "radixkv"}],
    }))
    .into_response()
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    let body = render_metrics(&s);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body).into_response()
}

fn render_metrics(s: &AppState) -> String {
    let m = &s.metrics;
    let st = s.scheduler.stats();
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut out = String::new();
    let mut put = |name: &str, kind: &str, help: &str, value: String| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    put(
        "radixkv_engine_requests_total",
        "counter",
        "Completion requests received.",
        load(&m.requests).to_string(),
    );
    put(
        "radixkv_engine_bad_requests_total",
        "counter",
        "Requests refused with a 4xx.",
        load(&m.bad_requests).to_string(),
    );
    put(
        "radixkv_engine_prompt_tokens_total",
        "counter",
        "Prompt tokens of completed requests.",
        load(&m.prompt_tokens).to_string(),
    );
    put(
        "radixkv_engine_cached_tokens_total",
        "counter",
        "Prompt tokens whose KV came from the cache.",
        load(&m.cached_tokens).to_string(),
    );
    put(
        "radixkv_engine_completion_tokens_total",
        "counter",
        "Tokens generated for completed requests.",
        load(&m.completion_tokens).to_string(),
    );
    put(
        "radixkv_engine_prefill_tokens_total",
        "counter",
        "Prompt tokens run through the model.",
        load(&st.prefill_tokens).to_string(),
    );
    put(
        "radixkv_engine_decode_tokens_total",
        "counter",
        "Decode tokens run through the model.",
        load(&st.decode_tokens).to_string(),
    );
    put(
        "radixkv_engine_busy_seconds_total",
        "counter",
        "Time spent in forward passes.",
        format!("{:.6}", load(&st.busy_nanos) as f64 / 1e9),
    );
    put(
        "radixkv_engine_prefill_tokens_per_second",
        "gauge",
        "Prompt tokens per second over the last second of work.",
        format!("{:.1}", st.prefill_rate()),
    );
    put(
        "radixkv_engine_decode_tokens_per_second",
        "gauge",
        "Generated tokens per second over the last second of work.",
        format!("{:.1}", st.decode_rate()),
    );
    let (dt, dn) = (load(&m.decode_micros), load(&m.decode_tokens));
    put(
        "radixkv_engine_time_per_output_token_seconds",
        "gauge",
        "Mean time per output token after the first.",
        format!(
            "{:.6}",
            if dn == 0 {
                0.0
            } else {
                dt as f64 / 1e6 / dn as f64
            }
        ),
    );
    put(
        "radixkv_engine_steps_total",
        "counter",
        "Forward passes.",
        load(&st.steps).to_string(),
    );
    put(
        "radixkv_engine_batched_steps_total",
        "counter",
        "Forward passes over more than one sequence.",
        load(&st.batched_steps).to_string(),
    );
    put(
        "radixkv_engine_preempted_total",
        "counter",
        "Sequences preempted for KV space.",
        load(&st.preempted).to_string(),
    );
    put(
        "radixkv_engine_cancelled_total",
        "counter",
        "Requests cancelled by their client.",
        load(&st.cancelled).to_string(),
    );
    put(
        "radixkv_engine_running",
        "gauge",
        "Sequences running.",
        load(&st.running).to_string(),
    );
    put(
        "radixkv_engine_waiting",
        "gauge",
        "Requests waiting.",
        load(&st.waiting).to_string(),
    );
    put(
        "radixkv_engine_kv_pages",
        "gauge",
        "Private KV pages held.",
        load(&st.kv_pages).to_string(),
    );
    let name = "radixkv_engine_ttft_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time to first token, from the request's arrival.\n# TYPE {name} histogram"
    );
    for (bucket, le) in m.ttft_buckets.iter().zip(TTFT_BUCKETS) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {}", load(bucket));
    }
    let count = load(&m.ttft_count);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {count}");
    let _ = writeln!(out, "{name}_sum {:.6}", load(&m.ttft_micros) as f64 / 1e6);
    let _ = writeln!(out, "{name}_count {count}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_held_back_end_is_the_longest_start_of_a_stop_string() {
        let stop = stops(&["END!", "é!"]);
        assert_eq!(stop_prefix("the", &stop), 0);
        assert_eq!(stop_prefix("the E", &stop), 1);
        assert_eq!(stop_prefix("the EN", &stop), 2);
        assert_eq!(stop_prefix("the END", &stop), 3);
        // A whole stop string is not held back: it is cut at.
        assert_eq!(stop_prefix("the END!", &stop), 0);
        // Multi-byte: the held-back end starts on a character boundary.
        let text = "café";
        let held = stop_prefix(text, &stop);
        assert_eq!(held, "é".len());
        assert!(text.is_char_boundary(text.len() - held));
        assert_eq!(stop_prefix("anything", &[]), 0);
    }

    #[test]
    fn the_text_is_cut_at_the_earliest_stop_string() {
        let stop = stops(&["cd", "bcde", "x"]);
        // Both complete within "abcdef": the one that starts first wins.
        assert_eq!(stop_at("abcdef", &stop), Some(1));
        assert_eq!(stop_at("abcdx", &stop), Some(2));
        assert_eq!(stop_at("xbcd", &stop), Some(0));
        assert_eq!(stop_at("abc", &stop), None);
    }
}
