//! The cache saves work and changes nothing: greedy output with a cached
//! prefix is token for token the output without it.

mod common;

use engine::{GenerateOptions, Stored};
use std::sync::atomic::Ordering;

use common::chat;

fn options(max: usize, use_cache: bool, tenant: &str) -> GenerateOptions {
    let mut o = GenerateOptions::new(max);
    o.use_cache = use_cache;
    o.stop_at_eos = false;
    o.tenant = tenant.into();
    o
}

#[test]
fn a_repeated_prompt_is_served_from_the_cache_with_identical_output() {
    let Some(engine) = common::engine() else {
        return;
    };
    let prompt = chat(
        engine,
        &[
            ("system", "You are a concise assistant. Answer in one short paragraph, and prefer plain words."),
            ("user", "Why do caches speed up programs? Give one example from web browsers."),
        ],
    );
    let n = 12;
    let cold = engine
        .generate(&prompt, &options(n, false, "repeat"))
        .unwrap();
    let first = engine
        .generate(&prompt, &options(n, true, "repeat"))
        .unwrap();
    let second = engine
        .generate(&prompt, &options(n, true, "repeat"))
        .unwrap();
    assert_eq!(first.cached_tokens, 0);
    assert_eq!(first.computed_prompt_tokens, prompt.len());
    assert!(first.stored_pages >= prompt.len() / 16);
    let ps = engine.layout().page_size;
    assert_eq!(second.cached_tokens, prompt.len() / ps * ps);
    assert!(
        second.computed_prompt_tokens < 16,
        "{} computed",
        second.computed_prompt_tokens
    );
    assert_eq!(first.tokens, cold.tokens);
    assert_eq!(second.tokens, cold.tokens);
}

#[test]
fn a_wholly_cached_prompt_reruns_only_its_last_token() {
    let Some(engine) = common::engine() else {
        return;
    };
    let mut prompt = chat(engine, &[("user", "Name three colours of the rainbow.")]);
    let ps = engine.layout().page_size;
    prompt.truncate(prompt.len() / ps * ps);
    assert!(prompt.len() >= ps);
    let n = 6;
    let cold = engine
        .generate(&prompt, &options(n, false, "whole"))
        .unwrap();
    engine
        .generate(&prompt, &options(n, true, "whole"))
        .unwrap();
    let warm = engine
        .generate(&prompt, &options(n, true, "whole"))
        .unwrap();
    assert_eq!(warm.cached_tokens, prompt.len());
    assert_eq!(warm.computed_prompt_tokens, 1);
    assert_eq!(warm.tokens, cold.tokens);
}

#[test]
fn the_next_turn_finds_the_whole_history_cached() {
    let Some(engine) = common::engine() else {
        return;
    };
    let system = ("system", "You are a helpful assistant who answers briefly.");
    let turn1 = chat(engine, &[system, ("user", "What is a prefix tree?")]);
    let n = 24;
    let out1 = engine.generate(&turn1, &options(n, true, "turns")).unwrap();
    let reply = engine.tokenizer().decode(&out1.tokens).unwrap();
    // Turn 2: turn 1's prompt and reply, then a new user message.
    let mut turn2 = turn1.clone();
    turn2.extend_from_slice(&out1.tokens);
    turn2.extend(engine.tokenizer().encode("<|im_end|>\n<|im_start|>user\nAnd a radix tree?<|im_end|>\n<|im_start|>assistant\n").unwrap());
    let warm = engine.generate(&turn2, &options(n, true, "turns")).unwrap();
    let cold = engine
        .generate(&turn2, &options(n, false, "turns"))
        .unwrap();
    let ps = engine.layout().page_size;
    // Every whole page of turn 1's prompt and of its reply (the last reply
    // token was never run, so its KV does not exist).
    let history = (turn1.len() + out1.tokens.len() - 1) / ps * ps;
    assert!(
        warm.cached_tokens >= history,
        "{} cached of {history} ({reply:?})",
        warm.cached_tokens
    );
    assert!(
        warm.cached_tokens > turn1.len(),
        "the reply's pages are cached too"
    );
    assert_eq!(
        warm.computed_prompt_tokens,
        turn2.len() - warm.cached_tokens
    );
    assert_eq!(warm.tokens, cold.tokens);
}

#[test]
fn bad_requests_get_typed_errors() {
    let Some(engine) = common::engine() else {
        return;
    };
    use engine::EngineError;
    let o = GenerateOptions::new(4);
    assert!(matches!(
        engine.generate(&[], &o),
        Err(EngineError::EmptyPrompt)
    ));
    assert!(matches!(
        engine.generate(&[1, 49152], &o),
        Err(EngineError::TokenOutOfVocab { id: 49152, .. })
    ));
    let long = vec![198u32; 8190];
    assert!(matches!(
        engine.generate(&long, &o),
        Err(EngineError::ContextTooLong { .. })
    ));
    assert!(matches!(
        engine.generate(&[1, 2], &GenerateOptions::new(0)),
        Err(EngineError::InvalidArgument(_))
    ));
}

/// What a [`Recording`] store saw and what it is told to do.
#[derive(Debug, Default)]
struct Script {
    /// Each store call's first page and page count.
    calls: Vec<(usize, usize)>,
    /// Each finished request's tokens (whole pages) and output length.
    finished: Vec<(usize, u32)>,
    /// Answer the call of this index "prefix missing" (storing nothing).
    lose_at: Option<usize>,
    /// Fail the call of this index.
    fail_at: Option<usize>,
}

/// An embedded cache that records the engine's store calls.
#[derive(Debug)]
struct Recording {
    inner: engine::EmbeddedStore,
    script: std::sync::Arc<std::sync::Mutex<Script>>,
}

#[derive(Debug)]
struct RecordingNs {
    inner: std::sync::Arc<dyn engine::KvNamespace>,
    script: std::sync::Arc<std::sync::Mutex<Script>>,
    block_bytes: usize,
}

impl engine::KvStore for Recording {
    fn page_size(&self) -> usize {
        self.inner.page_size()
    }
    fn block_bytes(&self) -> usize {
        self.inner.block_bytes()
    }
    fn layout(&self) -> String {
        self.inner.layout()
    }
    fn namespace(
        &self,
        tenant: &str,
        model: &str,
    ) -> engine::Result<std::sync::Arc<dyn engine::KvNamespace>> {
        Ok(std::sync::Arc::new(RecordingNs {
            inner: self.inner.namespace(tenant, model)?,
            script: self.script.clone(),
            block_bytes: self.inner.block_bytes(),
        }))
    }
}

impl engine::KvNamespace for RecordingNs {
    fn lookup(
        &self,
        tokens: &[u32],
        ttl: std::time::Duration,
    ) -> engine::Result<Option<Box<dyn engine::CachedPrefix>>> {
        self.inner.lookup(tokens, ttl)
    }

    fn store(&self, tokens: &[u32], first_page: usize, data: &[u8]) -> engine::Result<Stored> {
        let mut s = self.script.lock().unwrap();
        let call = s.calls.len();
        s.calls.push((first_page, data.len() / self.block_bytes));
        if s.lose_at == Some(call) {
            return Ok(Stored::PrefixMissing);
        }
        if s.fail_at == Some(call) {
            return Err(engine::EngineError::Remote("injected".into()));
        }
        self.inner.store(tokens, first_page, data)
    }

    fn finished(&self, tokens: &[u32], output_tokens: u32) -> engine::Result<()> {
        let mut s = self.script.lock().unwrap();
        s.finished.push((tokens.len(), output_tokens));
        self.inner.finished(tokens, output_tokens)
    }
}

#[test]
fn each_page_is_handed_to_the_store_once_and_again_only_after_a_loss() {
    let path = engine::default_model_path();
    if !path.exists() {
        return; // common::engine() says why.
    }
    let ps = 8;
    let layout = engine::KvLayout::new(&engine::ModelConfig::read(&path).unwrap(), ps);
    let cache = cache_server::Cache::open(
        cache_server::CacheConfig::builder(ps, layout.block_bytes(), layout.digest())
            .host_bytes(64 * layout.block_bytes())
            .build()
            .unwrap(),
    )
    .unwrap();
    let script = std::sync::Arc::new(std::sync::Mutex::new(Script {
        lose_at: Some(2),
        ..Script::default()
    }));
    let engine = engine::Engine::load(
        engine::EngineConfig::builder()
            .model_path(&path)
            .page_size(ps)
            .store(std::sync::Arc::new(Recording {
                inner: engine::EmbeddedStore(std::sync::Arc::new(cache)),
                script: script.clone(),
            }))
            .build()
            .unwrap(),
    )
    .unwrap();
    // 20 prompt tokens (2 whole pages), then 40 more: 7 whole pages.
    let mut prompt = chat(
        &engine,
        &[
            ("system", "You are brief."),
            ("user", "List some fruits, please."),
        ],
    );
    assert!(prompt.len() >= 20);
    prompt.truncate(20);
    let n = 40;
    let pages = (prompt.len() + n - 1) / ps;
    assert_eq!(pages, 7);
    let g = engine
        .generate(&prompt, &options(n, true, "handed"))
        .unwrap();
    // The prompt's pages after prefill, then each page as decode fills it;
    // the third call is told page 2 was lost, so pages 0..4 go again.
    assert_eq!(
        script.lock().unwrap().calls,
        [(0, 2), (2, 1), (3, 1), (0, 4), (4, 1), (5, 1), (6, 1)]
    );
    assert_eq!(g.stored_pages, pages);
    // Then the request's output length, on the pages it stored.
    assert_eq!(
        script.lock().unwrap().finished,
        [(pages * ps, g.tokens.len() as u32)]
    );
    let stats = engine.stats();
    assert_eq!(
        stats.sent_pages.load(Ordering::Relaxed),
        2 + 1 + 1 + 4 + 1 + 1 + 1
    );
    assert_eq!(stats.store_errors.load(Ordering::Relaxed), 0);

    // A store that fails: the sequence stores no more (no resending of a
    // growing run of pages to a failing cache).
    *script.lock().unwrap() = Script {
        fail_at: Some(1),
        ..Script::default()
    };
    let mut other = prompt.clone();
    other[2] += 1;
    let g = engine
        .generate(&other, &options(n, true, "handed"))
        .unwrap();
    assert_eq!(script.lock().unwrap().calls, [(0, 2), (2, 1)]);
    // Nothing of it is cached for sure: no output length is told.
    assert!(script.lock().unwrap().finished.is_empty());
    assert_eq!(g.stored_pages, 2);
    assert_eq!(stats.store_errors.load(Ordering::Relaxed), 1);
}
