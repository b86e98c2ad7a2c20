//! The OpenAI-compatible API, served in-process on loopback and spoken to
//! with a minimal HTTP/1.1 client.

mod common;

use engine::http::{serve, HttpConfig};
use engine::{Scheduler, SchedulerConfig};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Server {
    addr: SocketAddr,
    scheduler: Arc<Scheduler>,
    _runtime: tokio::runtime::Runtime,
}

fn server() -> Option<Server> {
    let engine = common::engine()?;
    let scheduler = Arc::new(Scheduler::start(engine.clone(), SchedulerConfig::default()).unwrap());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let mut config = HttpConfig::new("smollm2");
    config.tenant = "http".into();
    runtime.spawn(serve(listener, scheduler.clone(), config));
    Some(Server {
        addr,
        scheduler,
        _runtime: runtime,
    })
}

fn send(addr: SocketAddr, method: &str, path: &str, body: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    s
}

struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// One request, read to the end (chunked bodies reassembled).
fn request(addr: SocketAddr, method: &str, path: &str, body: &str) -> Answer {
    let mut r = BufReader::new(send(addr, method, path, body));
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    let status = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line).unwrap();
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let (k, v) = l.split_once(':').unwrap();
        headers.push((k.trim().to_string(), v.trim().to_string()));
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            let n = usize::from_str_radix(line.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        r.read_to_end(&mut body).unwrap();
    }
    Answer {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn chat_body(stream: bool) -> String {
    json!({
        "model": "smollm2",
        "messages": [
            {"role": "system", "content": "You are a concise assistant. Answer in one short paragraph, and prefer plain words."},
            {"role": "user", "content": "What does a cache do?"},
        ],
        "max_tokens": 16,
        "temperature": 0,
        "stream": stream,
    })
    .to_string()
}

/// The `data:` payloads of an event stream.
fn events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

#[test]
fn chat_completions_are_cached_streamed_and_measured() {
    let Some(srv) = server() else {
        return;
    };
    let first = request(srv.addr, "POST", "/v1/chat/completions", &chat_body(false));
    assert_eq!(first.status, 200, "{}", first.body);
    let second = request(srv.addr, "POST", "/v1/chat/completions", &chat_body(false));
    let (a, b) = (first.json(), second.json());
    let text = a["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(!text.is_empty());
    assert_eq!(b["choices"][0]["message"]["content"], text);
    assert_eq!(a["object"], "chat.completion");
    assert_eq!(a["usage"]["completion_tokens"], 16);
    assert_eq!(a["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let cached = b["usage"]["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap();
    assert!(cached > 0, "{b}");
    assert!(
        first
            .header("x-radixkv-ttft-ms")
            .unwrap()
            .parse::<f64>()
            .unwrap()
            > 0.0
    );
    assert!(second.header("x-radixkv-ttft-ms").is_some());

    // Streamed: the same text, in chunks, then usage, then [DONE].
    let streamed = request(srv.addr, "POST", "/v1/chat/completions", &chat_body(true));
    assert_eq!(streamed.status, 200);
    assert!(streamed
        .header("content-type")
        .unwrap()
        .starts_with("text/event-stream"));
    let ev = events(&streamed.body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert!(chunks.len() > 2);
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, text);
    let last = chunks.last().unwrap();
    assert_eq!(last["object"], "chat.completion.chunk");
    assert_eq!(last["choices"][0]["finish_reason"], "length");
    assert_eq!(last["usage"]["completion_tokens"], 16);
    assert!(
        last["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(
        last["radixkv"]["completion_ids"],
        a["radixkv"]["completion_ids"]
    );

    // Completions: the chat template written by hand gives the same text.
    let prompt = engine::http::chat_template(&[
        (
            "system",
            "You are a concise assistant. Answer in one short paragraph, and prefer plain words.",
        ),
        ("user", "What does a cache do?"),
    ]);
    let c = request(
        srv.addr,
        "POST",
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": 16}).to_string(),
    );
    assert_eq!(c.status, 200, "{}", c.body);
    let c = c.json();
    assert_eq!(c["choices"][0]["text"], text);
    assert_eq!(c["usage"]["prompt_tokens"], a["usage"]["prompt_tokens"]);

    let metrics = request(srv.addr, "GET", "/metrics", "");
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("radixkv_engine_ttft_seconds_count 4"),
        "{}",
        metrics.body
    );
    assert!(metrics.body.contains("radixkv_engine_cached_tokens_total"));
}

#[test]
fn bad_requests_get_openai_errors_and_the_server_keeps_serving() {
    let Some(srv) = server() else {
        return;
    };
    let cases = [
        ("/v1/chat/completions", "{not json".to_string(), 400),
        (
            "/v1/chat/completions",
            json!({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}).to_string(),
            404,
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 2.5})
                .to_string(),
            400,
        ),
        (
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 9000}).to_string(),
            400,
        ),
        ("/v1/completions", json!({"prompt": ""}).to_string(), 400),
    ];
    // Sampling settings and stop strings out of bounds.
    let hi = |extra: Value| {
        let mut body = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        ("/v1/chat/completions", body.to_string(), 400)
    };
    let sampling_cases = [
        hi(json!({"temperature": -0.1})),
        hi(json!({"temperature": 0.5, "top_p": 0})),
        hi(json!({"temperature": 0.5, "top_p": 1.01})),
        hi(json!({"top_p": -1})),
        hi(json!({"temperature": 0.5, "seed": 1.5})),
        hi(json!({"temperature": 0.5, "seed": "seven"})),
        hi(json!({"stop": ["a", "b", "c", "d", "e"]})),
        hi(json!({"stop": ""})),
        hi(json!({"stop": "x".repeat(300)})),
        hi(json!({"stop": 42})),
        hi(json!({"max_tokens": 0})),
    ];
    for (path, body, status) in cases.into_iter().chain(sampling_cases) {
        let a = request(srv.addr, "POST", path, &body);
        assert_eq!(a.status, status, "{body}: {}", a.body);
        let e = a.json();
        assert!(e["error"]["message"].as_str().is_some(), "{e}");
        assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
    }
    assert_eq!(request(srv.addr, "GET", "/health", "").status, 200);
    let models = request(srv.addr, "GET", "/v1/models", "").json();
    assert_eq!(models["data"][0]["id"], "smollm2");
}

#[test]
fn a_client_leaving_mid_stream_cancels_its_sequence() {
    let Some(srv) = server() else {
        return;
    };
    let body = json!({
        "messages": [{"role": "user", "content": "Count from one to one thousand."}],
        "max_tokens": 4000,
        "stream": true,
    })
    .to_string();
    let mut s = send(srv.addr, "POST", "/v1/chat/completions", &body);
    let mut buf = [0u8; 4096];
    let mut seen = 0;
    while seen < 3 {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0);
        seen += String::from_utf8_lossy(&buf[..n]).matches("data: ").count();
    }
    drop(s);
    let stats = srv.scheduler.stats();
    let deadline = Instant::now() + Duration::from_secs(30);
    while stats.cancelled.load(Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the sequence was never cancelled"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(stats.completed.load(Ordering::Relaxed), 0);
}

/// A chat request's body, with `extra` fields.
fn ask(question: &str, max_tokens: usize, extra: Value) -> String {
    let mut body = json!({
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
    });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body.to_string()
}

/// A streamed answer's chunks (after checking it ends with `[DONE]`), and
/// their text joined.
fn streamed_chunks(a: &Answer) -> (Vec<Value>, String) {
    assert_eq!(a.status, 200, "{}", a.body);
    let ev = events(&a.body);
    assert_eq!(ev.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = ev[..ev.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text = chunks
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .or(c["choices"][0]["text"].as_str())
        })
        .collect();
    (chunks, text)
}

#[test]
fn stop_strings_cut_the_text_streamed_or_not() {
    let Some(srv) = server() else {
        return;
    };
    let question = "Explain in two sentences what a library is.";
    let n = 24;
    let plain = request(
        srv.addr,
        "POST",
        "/v1/chat/completions",
        &ask(question, n, json!({})),
    );
    assert_eq!(plain.status, 200, "{}", plain.body);
    let plain = plain.json();
    let text = plain["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(plain["usage"]["completion_tokens"], n, "{plain}");
    // A stop string of several characters from the middle of the text (so
    // several tokens, some of which a stream must hold back).
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let (from, to) = (chars[chars.len() / 2].0, chars[chars.len() / 2 + 6].0);
    let stop = text[from..to].to_string();
    let cut = text.find(&stop).unwrap();
    let expected = &text[..cut];
    let extra = json!({"stop": ["\u{1F600} never", stop]});

    let whole = request(
        srv.addr,
        "POST",
        "/v1/chat/completions",
        &ask(question, n, extra.clone()),
    );
    assert_eq!(whole.status, 200, "{}", whole.body);
    let whole = whole.json();
    assert_eq!(
        whole["choices"][0]["message"]["content"], expected,
        "{stop:?}"
    );
    assert_eq!(whole["choices"][0]["finish_reason"], "stop");
    assert!(whole["usage"]["completion_tokens"].as_u64().unwrap() < n as u64);

    let mut streaming = extra.clone();
    streaming["stream"] = json!(true);
    let a = request(
        srv.addr,
        "POST",
        "/v1/chat/completions",
        &ask(question, n, streaming),
    );
    let (chunks, joined) = streamed_chunks(&a);
    // Nothing of the stop string went out, not even a first part of it.
    assert_eq!(joined, expected, "{stop:?}");
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"][0]["finish_reason"], "stop");
    assert_eq!(last["usage"], whole["usage"]);

    // Completions take one stop string as a plain string.
    let prompt = engine::http::chat_template(&[("user", question)]);
    let c = request(
        srv.addr,
        "POST",
        "/v1/completions",
        &json!({"prompt": prompt, "max_tokens": n, "stop": stop, "stream": true}).to_string(),
    );
    let (chunks, joined) = streamed_chunks(&c);
    assert_eq!(joined, expected);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "stop"
    );

    // A stop string whose start ends the text but which never completes:
    // what was held back goes out at the end.
    let tail: String = text
        .chars()
        .rev()
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let mut unfinished = json!({"stop": format!("{tail}\u{1F600}"), "stream": true});
    let a = request(
        srv.addr,
        "POST",
        "/v1/chat/completions",
        &ask(question, n, unfinished.clone()),
    );
    let (chunks, joined) = streamed_chunks(&a);
    assert_eq!(joined, text);
    assert_eq!(
        chunks.last().unwrap()["choices"][0]["finish_reason"],
        "length"
    );
    unfinished["stream"] = json!(false);
    let a = request(
        srv.addr,
        "POST",
        "/v1/chat/completions",
        &ask(question, n, unfinished),
    )
    .json();
    assert_eq!(a["choices"][0]["message"]["content"], text);
}

#[test]
fn a_seed_makes_sampled_answers_reproducible() {
    let Some(srv) = server() else {
        return;
    };
    let q = "Write a line of a poem about rain.";
    let ids = |extra: Value| {
        let a = request(srv.addr, "POST", "/v1/chat/completions", &ask(q, 8, extra));
        assert_eq!(a.status, 200, "{}", a.body);
        a.json()["radixkv"].clone()
    };
    let a = ids(json!({"temperature": 1.0, "top_p": 0.9, "seed": 7}));
    let b = ids(json!({"temperature": 1.0, "top_p": 0.9, "seed": 7}));
    assert_eq!(a["seed"], 7);
    assert_eq!(a["completion_ids"], b["completion_ids"]);
    // Streamed, with the same seed: the same tokens.
    let s = request(
        srv.addr,
        "POST",
        "/v1/chat/completions",
        &ask(
            q,
            8,
            json!({"temperature": 1.0, "top_p": 0.9, "seed": 7, "stream": true}),
        ),
    );
    let (chunks, _) = streamed_chunks(&s);
    assert_eq!(
        chunks.last().unwrap()["radixkv"]["completion_ids"],
        a["completion_ids"]
    );
    // Without a seed one is drawn and reported; it replays the answer.
    let drawn = ids(json!({"temperature": 1.0}));
    let seed = drawn["seed"].as_u64().expect("a drawn seed is reported");
    let replay = ids(json!({"temperature": 1.0, "seed": seed}));
    assert_eq!(replay["completion_ids"], drawn["completion_ids"]);
    // Greedy answers report no seed.
    assert!(ids(json!({"temperature": 0}))["seed"].is_null());
}
