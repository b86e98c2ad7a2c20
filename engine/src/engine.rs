//! The engine: a model, its tokenizer and the cache, running sequences.
//!
//! A [`Sequence`] is one request: its tokens, the pages of its prefix that
//! the cache holds (leased for the sequence's life and read in place each
//! step), and the pages it computes itself. [`Engine::step`] runs one
//! forward pass over several sequences at once — each gets its next
//! prefill chunk or its next decode token — which is the unit continuous
//! batching schedules; [`Engine::generate`] drives one sequence to the end.

use crate::error::{EngineError, Result};
use crate::forward::{forward, Chunk, PAGE_SIZES};
use crate::gguf::default_model_path;
use crate::kv::{as_f32, KvLayout, PrivatePages};
use crate::model::Model;
use crate::tokenizer::Tokenizer;
use cache_server::{Cache, CacheConfig, LookupOptions};
use radix_tree::{Lease, NamespaceId, PageHash};
use std::borrow::Cow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settings of an [`Engine`]. Build with [`EngineConfig::builder`].
#[derive(Debug, Clone)]
pub struct EngineConfig {
    model_path: PathBuf,
    page_size: usize,
    host_bytes: usize,
    cache: Option<Arc<Cache>>,
    lease_ttl: Duration,
    prefill_chunk: usize,
}

impl EngineConfig {
    /// Defaults: the model at [`default_model_path`], 16-token pages, an
    /// embedded cache with 512 MiB of host RAM, 512-token prefill chunks.
    pub fn builder() -> EngineConfigBuilder {
        EngineConfigBuilder(EngineConfig {
            model_path: default_model_path(),
            page_size: 16,
            host_bytes: 512 << 20,
            cache: None,
            lease_ttl: Duration::from_secs(600),
            prefill_chunk: 512,
        })
    }
}

/// Builder for [`EngineConfig`].
#[derive(Debug, Clone)]
pub struct EngineConfigBuilder(EngineConfig);

impl EngineConfigBuilder {
    pub fn model_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.0.model_path = path.into();
        self
    }

    /// Tokens per KV page (8, 16, 32 or 64).
    pub fn page_size(mut self, n: usize) -> Self {
        self.0.page_size = n;
        self
    }

    /// Host RAM of the embedded cache.
    pub fn host_bytes(mut self, n: usize) -> Self {
        self.0.host_bytes = n;
        self
    }

    /// Use this cache instead of an embedded one. It must have been opened
    /// with the engine's page size, block size and [`KvLayout::digest`].
    pub fn cache(mut self, cache: Arc<Cache>) -> Self {
        self.0.cache = Some(cache);
        self
    }

    /// How long a sequence's lease on its cached prefix lasts at most.
    pub fn lease_ttl(mut self, ttl: Duration) -> Self {
        self.0.lease_ttl = ttl;
        self
    }

    /// Most prompt tokens one sequence runs in one step.
    pub fn prefill_chunk(mut self, n: usize) -> Self {
        self.0.prefill_chunk = n;
        self
    }

    pub fn build(self) -> Result<EngineConfig> {
        let c = &self.0;
        if !PAGE_SIZES.contains(&c.page_size) {
            return Err(EngineError::InvalidConfig(format!(
                "page size {}; supported: {PAGE_SIZES:?}",
                c.page_size
            )));
        }
        if c.prefill_chunk == 0 {
            return Err(EngineError::InvalidConfig(
                "prefill chunk of zero tokens".into(),
            ));
        }
        if c.lease_ttl.is_zero() {
            return Err(EngineError::InvalidConfig("lease TTL of zero".into()));
        }
        Ok(self.0)
    }
}

/// What a request asks of generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Look the prompt up in the cache and store the pages computed
    /// (default on). Off: every token is computed, nothing is stored.
    pub use_cache: bool,
    /// Stop after the end-of-sequence token (default on).
    pub stop_at_eos: bool,
    /// The cache namespace's tenant (a server derives it from credentials).
    pub tenant: String,
}

impl GenerateOptions {
    pub fn new(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            use_cache: true,
            stop_at_eos: true,
            tenant: "default".into(),
        }
    }
}

/// Why a sequence stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It produced `max_new_tokens`.
    Length,
    /// It produced the end-of-sequence token.
    Eos,
}

/// The result of a finished sequence.
#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    /// Prompt tokens whose KV came from the cache.
    pub cached_tokens: usize,
    /// Prompt tokens run through the model (when the whole prompt is
    /// cached, its last token is run again for its logits).
    pub computed_prompt_tokens: usize,
    /// Pages this sequence stored into the cache.
    pub stored_pages: usize,
    pub finish: FinishReason,
    /// From the start of the request (lookup included) to the first token.
    pub ttft: Duration,
    /// Forward time of the prefill steps.
    pub prefill_time: Duration,
    /// Forward time of the decode steps.
    pub decode_time: Duration,
}

/// Counters of an engine.
#[derive(Debug, Default)]
pub struct EngineStats {
    pub sequences: AtomicU64,
    pub cached_tokens: AtomicU64,
    pub computed_tokens: AtomicU64,
    pub stored_pages: AtomicU64,
    /// Lookups that failed (the prompt was computed cold).
    pub lookup_errors: AtomicU64,
    /// Stores that failed (the pages stay private to their sequence).
    pub store_errors: AtomicU64,
}

/// One request in flight. See the module docs.
#[derive(Debug)]
pub struct Sequence {
    /// Prompt, then generated tokens; the last generated one is not run yet.
    tokens: Vec<u32>,
    prompt_len: usize,
    page_size: usize,
    max_new: usize,
    stop_at_eos: bool,
    /// The next position to run.
    pos: usize,
    /// Positions whose KV is in the pages.
    kv_len: usize,
    /// The cache's namespace, or `None` with the cache off.
    ns: Option<NamespaceId>,
    lease: Option<Lease>,
    /// The block table's cached part: pages `0..cached.len()`, leased.
    cached: Vec<PageHash>,
    /// The block table's own part: pages from `cached.len()` on.
    private: PrivatePages,
    /// Whole pages known to be in the cache.
    stored_upto: usize,
    stored_pages: usize,
    computed_prompt: usize,
    finish: Option<FinishReason>,
    started: Instant,
    ttft: Option<Duration>,
    prefill_time: Duration,
    decode_time: Duration,
}

impl Sequence {
    pub fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    /// Tokens generated so far.
    pub fn generated(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Prompt tokens whose KV came from the cache.
    pub fn cached_tokens(&self) -> usize {
        self.cached.len() * self.page_size
    }
}

/// A model, its tokenizer and a cache; see the crate docs.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    tokenizer: Tokenizer,
    layout: KvLayout,
    cache: Arc<Cache>,
    config: EngineConfig,
    stats: EngineStats,
}

impl Engine {
    /// Loads the model (dequantizing its weights) and opens the embedded
    /// cache, or checks the given one.
    pub fn load(config: EngineConfig) -> Result<Engine> {
        let (model, tokenizer) = Model::load(&config.model_path)?;
        let layout = KvLayout::new(model.config(), config.page_size);
        let cache = match &config.cache {
            Some(cache) => {
                let c = cache.config();
                if c.page_size() != layout.page_size || c.block_bytes() != layout.block_bytes() {
                    return Err(EngineError::InvalidConfig(format!(
                        "the cache has {}-token pages of {} bytes; this model needs {} of {}",
                        c.page_size(),
                        c.block_bytes(),
                        layout.page_size,
                        layout.block_bytes()
                    )));
                }
                cache.clone()
            }
            None => Arc::new(Cache::open(
                CacheConfig::builder(layout.page_size, layout.block_bytes(), layout.digest())
                    .host_bytes(config.host_bytes)
                    .build()?,
            )?),
        };
        Ok(Engine {
            model,
            tokenizer,
            layout,
            cache,
            config,
            stats: EngineStats::default(),
        })
    }

    pub fn model(&self) -> &Model {
        &self.model
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Greedy generation of one prompt, start to finish.
    pub fn generate(&self, prompt: &[u32], options: &GenerateOptions) -> Result<Generation> {
        let mut seq = self.start(prompt, options)?;
        while !seq.is_finished() {
            if let Err(e) = self.step(&mut [&mut seq]) {
                self.finish(seq);
                return Err(e);
            }
        }
        Ok(self.finish(seq))
    }

    /// Checks a request, looks its prompt up in the cache (leasing the
    /// cached pages and promoting them to host RAM) and returns the
    /// sequence, ready for [`Engine::step`].
    pub fn start(&self, prompt: &[u32], options: &GenerateOptions) -> Result<Sequence> {
        let started = Instant::now();
        let vocab = self.model.config().vocab;
        let context = self.model.config().context;
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some(&id) = prompt.iter().find(|&&id| id as usize >= vocab) {
            return Err(EngineError::TokenOutOfVocab { id, vocab });
        }
        if options.max_new_tokens == 0 {
            return Err(EngineError::InvalidArgument(
                "max_new_tokens must be at least 1".into(),
            ));
        }
        let requested = prompt.len().saturating_add(options.max_new_tokens);
        if requested > context {
            return Err(EngineError::ContextTooLong { requested, context });
        }
        let (ns, lease, cached) = if options.use_cache {
            let ns = self.cache.namespace(&options.tenant, self.model.id(), "")?;
            let (lease, cached) = self.lookup(ns, prompt);
            (Some(ns), lease, cached)
        } else {
            (None, None, Vec::new())
        };
        let ps = self.layout.page_size;
        let cached_tokens = cached.len() * ps;
        self.stats.sequences.fetch_add(1, Ordering::Relaxed);
        self.stats
            .cached_tokens
            .fetch_add(cached_tokens as u64, Ordering::Relaxed);
        let mut tokens = Vec::with_capacity(prompt.len() + options.max_new_tokens);
        tokens.extend_from_slice(prompt);
        Ok(Sequence {
            prompt_len: prompt.len(),
            page_size: ps,
            max_new: options.max_new_tokens,
            stop_at_eos: options.stop_at_eos,
            // A wholly cached prompt still runs its last token, for logits.
            pos: cached_tokens.min(prompt.len() - 1),
            kv_len: cached_tokens,
            ns,
            lease,
            private: PrivatePages::new(cached.len(), &self.layout),
            stored_upto: cached.len(),
            cached,
            tokens,
            stored_pages: 0,
            computed_prompt: 0,
            finish: None,
            started,
            ttft: None,
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
        })
    }

    /// The cached prefix of `prompt`, leased and in host RAM. A cache that
    /// fails only costs the work it would have saved.
    fn lookup(&self, ns: NamespaceId, prompt: &[u32]) -> (Option<Lease>, Vec<PageHash>) {
        let options = LookupOptions {
            lease: Some(self.config.lease_ttl),
            promote: true,
        };
        match self.cache.lookup(ns, prompt, options) {
            Ok(hit) => {
                if let Some(id) = hit.prefetch {
                    self.cache.wait(id);
                }
                match hit.lease {
                    Some(lease) => (Some(lease), hit.hashes),
                    None => (None, Vec::new()),
                }
            }
            Err(_) => {
                self.stats.lookup_errors.fetch_add(1, Ordering::Relaxed);
                (None, Vec::new())
            }
        }
    }

    /// One forward pass over the unfinished sequences of `seqs`: each runs
    /// its next prefill chunk or its next decode token, and those that
    /// reach the end of their input get their next token. New whole pages
    /// go to the cache.
    pub fn step(&self, seqs: &mut [&mut Sequence]) -> Result<()> {
        let ps = self.layout.page_size;
        let mut running: Vec<&mut Sequence> = seqs
            .iter_mut()
            .map(|s| &mut **s)
            .filter(|s| !s.is_finished())
            .collect();
        if running.is_empty() {
            return Ok(());
        }
        // Borrow every cached page in place for the length of the step (the
        // sequence's lease keeps them in host RAM).
        let mut sources = Vec::with_capacity(running.len());
        for seq in &running {
            let mut pages = Vec::with_capacity(seq.cached.len());
            for (page, &hash) in seq.cached.iter().enumerate() {
                let ns = seq.ns.expect("cached pages come with a namespace");
                pages.push(match self.cache.borrow(ns, hash)? {
                    Some(block) => PageSource::InPlace(block),
                    None => {
                        // Not in host RAM after all: read a copy from
                        // wherever it is.
                        let mut buf = vec![0u8; self.layout.block_bytes()];
                        match self.cache.read_page(ns, hash, &mut buf)? {
                            Some(_) => PageSource::Copied(buf),
                            None => return Err(EngineError::KvLost { page }),
                        }
                    }
                });
            }
            sources.push(pages);
        }
        let views: Vec<Vec<Cow<'_, [f32]>>> = sources
            .iter()
            .map(|pages| pages.iter().map(|p| as_f32(p.bytes())).collect())
            .collect();
        let slices: Vec<Vec<&[f32]>> = views
            .iter()
            .map(|v| v.iter().map(|c| &**c).collect())
            .collect();
        let mut chunks: Vec<Chunk<'_>> = running
            .iter_mut()
            .zip(&slices)
            .map(|(seq, cached)| {
                let end = seq.tokens.len().min(seq.pos + self.config.prefill_chunk);
                Chunk {
                    tokens: &seq.tokens[seq.pos..end],
                    start: seq.pos,
                    kv_len: seq.kv_len,
                    cached,
                    private: &mut seq.private,
                    logits: end == seq.tokens.len(),
                }
            })
            .collect();
        let began = Instant::now();
        let logits = forward(&self.model, &self.layout, &mut chunks);
        let elapsed = began.elapsed();
        let ran: Vec<usize> = chunks.iter().map(|c| c.tokens.len()).collect();
        drop(chunks);
        drop(slices);
        drop(views);
        drop(sources);

        for ((seq, logits), n) in running.iter_mut().zip(logits).zip(ran) {
            let end = seq.pos + n;
            if seq.pos < seq.prompt_len {
                seq.computed_prompt += n;
                seq.prefill_time += elapsed;
            } else {
                seq.decode_time += elapsed;
            }
            self.stats
                .computed_tokens
                .fetch_add(n as u64, Ordering::Relaxed);
            seq.pos = end;
            seq.kv_len = seq.kv_len.max(end);
            if let Some(logits) = logits {
                let next = argmax(&logits);
                seq.tokens.push(next);
                if seq.ttft.is_none() {
                    seq.ttft = Some(seq.started.elapsed());
                }
                if seq.stop_at_eos && Some(next) == self.tokenizer.eos() {
                    seq.finish = Some(FinishReason::Eos);
                } else if seq.tokens.len() - seq.prompt_len >= seq.max_new {
                    seq.finish = Some(FinishReason::Length);
                }
            }
            self.store_full_pages(seq, ps);
        }
        Ok(())
    }

    /// Stores the sequence's whole pages that the cache does not have yet.
    fn store_full_pages(&self, seq: &mut Sequence, ps: usize) {
        let Some(ns) = seq.ns else { return };
        let full = seq.kv_len / ps;
        if full <= seq.stored_upto {
            return;
        }
        let first = seq.private.first_page();
        let data = seq.private.bytes(first..full);
        match self.cache.store(ns, &seq.tokens[..full * ps], first, data) {
            Ok(out) => {
                seq.stored_pages += out.stored_pages;
                self.stats
                    .stored_pages
                    .fetch_add(out.stored_pages as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        seq.stored_upto = full;
    }

    /// The logits of the token after `prompt`, computed without the cache.
    pub fn next_token_logits(&self, prompt: &[u32]) -> Result<Vec<f32>> {
        let mut options = GenerateOptions::new(1);
        options.use_cache = false;
        let mut seq = self.start(prompt, &options)?;
        let mut chunks = [Chunk {
            tokens: &seq.tokens[..],
            start: 0,
            kv_len: 0,
            cached: &[],
            private: &mut seq.private,
            logits: true,
        }];
        let logits = forward(&self.model, &self.layout, &mut chunks);
        Ok(logits
            .into_iter()
            .next()
            .flatten()
            .expect("asked for logits"))
    }

    /// Ends a sequence (finished or not): releases its lease and reports.
    pub fn finish(&self, seq: Sequence) -> Generation {
        if let Some(lease) = &seq.lease {
            // An expired lease is already gone; nothing else can fail here.
            let _ = self.cache.release(lease);
        }
        Generation {
            tokens: seq.tokens[seq.prompt_len..].to_vec(),
            prompt_tokens: seq.prompt_len,
            cached_tokens: seq.cached_tokens(),
            computed_prompt_tokens: seq.computed_prompt,
            stored_pages: seq.stored_pages,
            finish: seq.finish.unwrap_or(FinishReason::Length),
            ttft: seq.ttft.unwrap_or_default(),
            prefill_time: seq.prefill_time,
            decode_time: seq.decode_time,
        }
    }
}

/// Where a cached page's bytes are for one step.
enum PageSource<B> {
    /// Borrowed from the host tier, in place.
    InPlace(B),
    /// Read from a slower tier into a private copy.
    Copied(Vec<u8>),
}

impl<B: std::ops::Deref<Target = [u8]>> PageSource<B> {
    fn bytes(&self) -> &[u8] {
        match self {
            PageSource::InPlace(b) => b,
            PageSource::Copied(v) => v,
        }
    }
}

/// The first index of the largest logit (greedy decoding).
fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}
