//! Remote mode: the engine keeps its KV pages in a radixkv server (started
//! in-process on a Unix socket, its host tier in shared memory) and gets
//! the same tokens as without the cache, reading cached pages in place;
//! it sends each page's block once; and the binary's `--remote` (with the
//! token from `RADIXKV_TOKEN`) does the same.

mod common;

use cache_server::server::{Server, ServerConfig, TenantConfig};
use engine::{Engine, EngineConfig, GenerateOptions, KvLayout, ModelConfig, RemoteStore};
use std::io::{BufRead, Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[test]
fn generation_through_a_cache_server_is_cached_and_unchanged() {
    let Some(path) = common::model_path() else {
        return;
    };
    let layout = KvLayout::new(&ModelConfig::read(&path).unwrap(), 16);
    let srv = TestServer::start(&layout, Vec::new());
    let store = RemoteStore::connect(&srv.target(), None).unwrap();
    assert!(store.uses_shm(), "the server's host tier is mapped");
    let engine = Engine::load(
        EngineConfig::builder()
            .model_path(&path)
            .store(Arc::new(store))
            .build()
            .unwrap(),
    )
    .unwrap();
    assert!(engine.cache().is_none());
    let text = "<|im_start|>system\nYou are a concise assistant. Answer in one short paragraph, and prefer plain words.<|im_end|>\n<|im_start|>user\nWhat is shared memory?<|im_end|>\n<|im_start|>assistant\n";
    let prompt = engine.tokenizer().encode(text).unwrap();
    let mut options = GenerateOptions::new(12);
    options.stop_at_eos = false;
    let mut cold = options.clone();
    cold.use_cache = false;
    let reference = engine.generate(&prompt, &cold).unwrap();
    let first = engine.generate(&prompt, &options).unwrap();
    let second = engine.generate(&prompt, &options).unwrap();
    assert_eq!(first.cached_tokens, 0);
    assert!(first.stored_pages >= prompt.len() / 16);
    assert_eq!(second.cached_tokens, prompt.len() / 16 * 16);
    assert!(second.computed_prompt_tokens < 16);
    assert_eq!(first.tokens, reference.tokens);
    assert_eq!(second.tokens, reference.tokens);
    // The pages are the server's (its shared memory, read in place).
    let stats = srv.server().cache().index().stats();
    assert!(stats.pages as usize >= first.stored_pages);
    assert_eq!(
        engine
            .stats()
            .lookup_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert_eq!(
        engine
            .stats()
            .store_errors
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

/// A radixkv server started in-process on a Unix socket (its host tier in
/// shared memory) for `page_size`-token pages, with `tenants` (none: no
/// tokens) and its metrics on loopback.
struct TestServer {
    server: Option<Server>,
    runtime: tokio::runtime::Runtime,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl TestServer {
    fn start(layout: &KvLayout, tenants: Vec<TenantConfig>) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("radixkv.sock");
        let config = ServerConfig {
            listen: None,
            unix_socket: Some(socket.clone()),
            metrics_listen: Some("127.0.0.1:0".parse().unwrap()),
            data_dir: dir.path().to_path_buf(),
            page_size: layout.page_size,
            block_bytes: layout.block_bytes(),
            layout: layout.digest(),
            host_bytes: 128 * layout.block_bytes(),
            disk_bytes: 0,
            shm_path: Some(dir.path().join("host.shm")),
            tenants,
            ..ServerConfig::default()
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let server = runtime.block_on(Server::start(config)).unwrap();
        TestServer {
            server: Some(server),
            runtime,
            socket,
            _dir: dir,
        }
    }

    fn server(&self) -> &Server {
        self.server.as_ref().unwrap()
    }

    fn target(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// A counter of the server's `/metrics`.
    fn metric(&self, line_start: &str) -> u64 {
        let ready = self.server().ready_line();
        let addr = ready
            .split_whitespace()
            .find_map(|w| w.strip_prefix("metrics="))
            .expect("the metrics listener");
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        body.lines()
            .find_map(|l| l.strip_prefix(line_start))
            .unwrap_or_else(|| panic!("no {line_start} in {body}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Bytes of blocks the server received through `Store` calls.
    fn grpc_store_bytes(&self) -> u64 {
        self.metric("radixkv_client_bytes_total{direction=\"store\",path=\"grpc\"}")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            let _ = self.runtime.block_on(server.shutdown());
        }
    }
}

#[test]
fn remote_stores_send_each_page_once() {
    let Some(path) = common::model_path() else {
        return;
    };
    // 8-token pages: a short output fills several.
    let ps = 8;
    let layout = KvLayout::new(&ModelConfig::read(&path).unwrap(), ps);
    let srv = TestServer::start(&layout, Vec::new());
    let store = RemoteStore::connect(&srv.target(), None).unwrap();
    let engine = Engine::load(
        EngineConfig::builder()
            .model_path(&path)
            .page_size(ps)
            .store(Arc::new(store))
            .build()
            .unwrap(),
    )
    .unwrap();
    let prompt = engine
        .tokenizer()
        .encode("<|im_start|>user\nList some fruits.<|im_end|>\n<|im_start|>assistant\n")
        .unwrap();
    let n = 40;
    let mut options = GenerateOptions::new(n);
    options.stop_at_eos = false;
    let bb = layout.block_bytes() as u64;
    assert_eq!(srv.grpc_store_bytes(), 0);

    let first = engine.generate(&prompt, &options).unwrap();
    // The KV of every token but the last generated one, in whole pages.
    let pages = (prompt.len() + n - 1) / ps;
    assert!(pages >= prompt.len() / ps + 4, "decode filled pages");
    assert_eq!(first.stored_pages, pages);
    let sent = |e: &Engine| e.stats().sent_pages.load(Ordering::Relaxed);
    assert_eq!(sent(&engine), pages as u64);
    // Each page's block went over gRPC once (resending the earlier ones
    // with each new page would be 2 + 3 + 4 + ... pages).
    assert_eq!(srv.grpc_store_bytes(), pages as u64 * bb);
    // Its output length followed in a store of no blocks, which the server
    // took.
    let errors = |e: &Engine| e.stats().store_errors.load(Ordering::Relaxed);
    assert_eq!(errors(&engine), 0);

    // Again: the prompt's pages are read from the cache, and the output's,
    // which the cache has already, go once each.
    let second = engine.generate(&prompt, &options).unwrap();
    assert_eq!(second.tokens, first.tokens);
    let cached = second.cached_tokens / ps;
    assert_eq!(cached, prompt.len() / ps);
    assert_eq!(second.stored_pages, 0);
    let total = (2 * pages - cached) as u64;
    assert_eq!(sent(&engine), total);
    assert_eq!(srv.grpc_store_bytes(), total * bb);
    assert_eq!(engine.stats().store_errors.load(Ordering::Relaxed), 0);
}

/// Reads `child`'s stdout until its `READY http=` line (or panics after a
/// while); the rest of the output is drained in the background.
fn wait_ready(child: &mut std::process::Child) -> std::net::SocketAddr {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some(addr) = line.strip_prefix("READY http=") {
                let _ = tx.send(addr.parse().unwrap());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("the engine prints its READY line")
}

fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> serde_json::Value {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let (head, body) = answer.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{answer}");
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn the_binary_keeps_its_pages_in_a_cache_server_with_a_token() {
    let Some(path) = common::model_path() else {
        return;
    };
    let layout = KvLayout::new(&ModelConfig::read(&path).unwrap(), 16);
    let tenant = TenantConfig {
        name: "engine-tenant".into(),
        token: "s3cret-engine-token".into(),
        quota_pages: 0,
        shm: true,
    };
    let srv = TestServer::start(&layout, vec![tenant]);
    let engine = |token: &str| {
        Command::new(env!("CARGO_BIN_EXE_radixkv-engine"))
            .args(["serve", "--listen", "127.0.0.1:0", "--model"])
            .arg(&path)
            .args(["--remote", &srv.target()])
            .env("RADIXKV_TOKEN", token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };

    // A wrong token: the engine does not start.
    let mut bad = engine("not-the-token");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = bad.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "an engine with a bad token runs");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());

    let mut child = engine("s3cret-engine-token");
    let addr = wait_ready(&mut child);
    let body = serde_json::json!({
        "messages": [
            {"role": "system", "content": "You are a concise assistant. Answer in one short paragraph, and prefer plain words."},
            {"role": "user", "content": "What is a page?"},
        ],
        "max_tokens": 2,
    })
    .to_string();
    let first = post(addr, "/v1/chat/completions", &body);
    let second = post(addr, "/v1/chat/completions", &body);
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(first["usage"]["prompt_tokens_details"]["cached_tokens"], 0);
    let prompt = first["usage"]["prompt_tokens"].as_u64().unwrap();
    assert_eq!(
        second["usage"]["prompt_tokens_details"]["cached_tokens"],
        prompt / 16 * 16
    );
    assert_eq!(second["choices"], first["choices"]);
    // The pages are the server's, in the token's tenant.
    assert!(srv.server().cache().index().stats().pages >= prompt / 16);
}
