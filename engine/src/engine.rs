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
use crate::sampling::{Sampler, Sampling};
use crate::store::{
    CachedPrefix, EmbeddedStore, KvNamespace, KvStore, PageBytes, RemoteStore, Stored,
};
use crate::tokenizer::Tokenizer;
use cache_server::{Cache, CacheConfig};
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
    store: Option<StoreChoice>,
    lease_ttl: Duration,
    prefill_chunk: usize,
    f32_weights: bool,
}

impl EngineConfig {
    /// Defaults: the model at [`default_model_path`], 16-token pages, an
    /// embedded cache with 512 MiB of host RAM, 512-token prefill chunks.
    pub fn builder() -> EngineConfigBuilder {
        EngineConfigBuilder(EngineConfig {
            model_path: default_model_path(),
            page_size: 16,
            host_bytes: 512 << 20,
            store: None,
            lease_ttl: Duration::from_secs(600),
            prefill_chunk: 512,
            f32_weights: false,
        })
    }
}

/// Where an engine's pages go, when not in a fresh embedded cache.
#[derive(Debug, Clone)]
enum StoreChoice {
    Embedded(Arc<Cache>),
    Other(Arc<dyn KvStore>),
    Remote {
        target: String,
        token: Option<String>,
    },
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
        self.0.store = Some(StoreChoice::Embedded(cache));
        self
    }

    /// Keep the KV pages in this store (a [`RemoteStore`], say). It must
    /// have the engine's page size, block size and [`KvLayout::digest`].
    pub fn store(mut self, store: Arc<dyn KvStore>) -> Self {
        self.0.store = Some(StoreChoice::Other(store));
        self
    }

    /// Keep the KV pages in a radixkv server (`unix:/path` or
    /// `host:port`), connected to at load with the tenant's `token`.
    pub fn remote(mut self, target: impl Into<String>, token: Option<String>) -> Self {
        self.0.store = Some(StoreChoice::Remote {
            target: target.into(),
            token,
        });
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

    /// Dequantize the weights to F32 at load and run exact F32 arithmetic:
    /// the forward of the dequantized weights (what a float reference
    /// computes), at four times the memory and a fraction of the speed.
    /// By default quantized weights stay quantized and multiply 8-bit
    /// activations, as llama.cpp does (see `matmul`).
    pub fn f32_weights(mut self, yes: bool) -> Self {
        self.0.f32_weights = yes;
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

/// Most stop strings a request may give (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;
/// Longest stop string, in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// What a request asks of generation.
#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// How each token is chosen (default greedy).
    pub sampling: Sampling,
    /// Stop once the output's text contains one of these (at most
    /// [`MAX_STOP_STRINGS`], each 1 to [`MAX_STOP_BYTES`] bytes): the
    /// sequence ends with the token that completes it, with
    /// [`FinishReason::Stop`]. Leaving the stop string out of the text is
    /// the caller's part (see [`stop_at`](crate::stop_at)).
    pub stop: Vec<String>,
    /// Look the prompt up in the cache and store the pages computed
    /// (default on). Off: every token is computed, nothing is stored.
    pub use_cache: bool,
    /// Stop after the end-of-sequence token (default on).
    pub stop_at_eos: bool,
    /// The cache namespace's tenant (a server derives it from credentials).
    pub tenant: String,
    /// How many tokens at the end of the prompt are this request's own
    /// earlier output (0 for a new request; a preempted request resuming
    /// has them): sampling continues the request's random stream after
    /// them, and stop strings are looked for across them. The
    /// [`Scheduler`](crate::Scheduler) sets it when it resumes a request.
    pub resumed: usize,
}

impl GenerateOptions {
    /// Greedy, up to `max_new_tokens`, cached, stopping at end of sequence.
    pub fn new(max_new_tokens: usize) -> Self {
        Self {
            max_new_tokens,
            sampling: Sampling::greedy(),
            stop: Vec::new(),
            use_cache: true,
            stop_at_eos: true,
            tenant: "default".into(),
            resumed: 0,
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
    /// Its text came to contain one of its stop strings.
    Stop,
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
    /// Pages handed to the store: each whole page once, unless the cache
    /// lost an earlier one meanwhile (then the sequence's pages go again).
    pub sent_pages: AtomicU64,
    /// Lookups that failed (the prompt was computed cold).
    pub lookup_errors: AtomicU64,
    /// Stores that failed (that sequence stores no more: its pages stay
    /// private).
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
    sampler: Sampler,
    stop: Vec<String>,
    /// Where the request's output starts in `tokens` (before `prompt_len`
    /// when resumed).
    output_start: usize,
    /// The next position to run.
    pos: usize,
    /// Positions whose KV is in the pages.
    kv_len: usize,
    /// The cache's namespace, or `None` with the cache off.
    ns: Option<Arc<dyn KvNamespace>>,
    /// The block table's cached part: pages `0..cached`, leased (the lease
    /// goes with it).
    prefix: Option<Box<dyn CachedPrefix>>,
    cached: usize,
    /// The block table's own part: pages from `cached` on.
    private: PrivatePages,
    /// Whole pages handed to the cache (from `cached` on, its own).
    stored_upto: usize,
    /// A store failed: the sequence stores no more.
    store_failed: bool,
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
        self.cached * self.page_size
    }

    /// The prompt, then the tokens generated so far.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    pub fn prompt_len(&self) -> usize {
        self.prompt_len
    }

    /// Tokens not run yet: the rest of the prompt, or the one token a
    /// decode step runs.
    pub fn pending(&self) -> usize {
        self.tokens.len() - self.pos
    }

    /// Whether the prompt is run (the next step decodes).
    pub fn is_decoding(&self) -> bool {
        self.pos >= self.prompt_len
    }

    /// Private KV pages the sequence holds (its own, not the cache's).
    pub fn private_pages(&self) -> usize {
        self.private.held()
    }

    /// Private KV pages it would hold after running its next `n` tokens.
    pub fn private_pages_after(&self, n: usize) -> usize {
        let end = (self.pos + n.min(self.pending())).max(self.kv_len);
        let needed = end.div_ceil(self.page_size).saturating_sub(self.cached);
        needed.max(self.private.held())
    }

    /// The most of its next tokens (up to `want`) that it can run while
    /// holding at most `pages` private pages.
    pub fn tokens_within(&self, pages: usize, want: usize) -> usize {
        let want = want.min(self.pending());
        if self.private_pages_after(want) <= pages {
            return want;
        }
        // Positions below this end fit in `pages` private pages.
        let end = (self.cached + pages) * self.page_size;
        end.saturating_sub(self.pos).min(want)
    }
}

/// A model, its tokenizer and a cache; see the crate docs.
#[derive(Debug)]
pub struct Engine {
    model: Model,
    tokenizer: Tokenizer,
    layout: KvLayout,
    store: Arc<dyn KvStore>,
    /// The cache, when embedded.
    cache: Option<Arc<Cache>>,
    config: EngineConfig,
    stats: EngineStats,
}

impl Engine {
    /// Loads the model (packing its weights) and opens the embedded
    /// cache, or checks the given one.
    pub fn load(config: EngineConfig) -> Result<Engine> {
        let (model, tokenizer) = Model::load(&config.model_path, config.f32_weights)?;
        let layout = KvLayout::new(model.config(), config.page_size);
        let (store, cache): (Arc<dyn KvStore>, _) = match &config.store {
            Some(StoreChoice::Embedded(cache)) => {
                (Arc::new(EmbeddedStore(cache.clone())), Some(cache.clone()))
            }
            Some(StoreChoice::Other(store)) => (store.clone(), None),
            Some(StoreChoice::Remote { target, token }) => (
                Arc::new(RemoteStore::connect(target, token.as_deref())?),
                None,
            ),
            None => {
                let cache = Arc::new(Cache::open(
                    CacheConfig::builder(layout.page_size, layout.block_bytes(), layout.digest())
                        .host_bytes(config.host_bytes)
                        .build()?,
                )?);
                (Arc::new(EmbeddedStore(cache.clone())), Some(cache))
            }
        };
        if store.page_size() != layout.page_size
            || store.block_bytes() != layout.block_bytes()
            || store.layout() != layout.digest()
        {
            return Err(EngineError::InvalidConfig(format!(
                "the cache has {}-token pages of {} bytes in layout {:?}; this model needs {} of {} in {:?}",
                store.page_size(),
                store.block_bytes(),
                store.layout(),
                layout.page_size,
                layout.block_bytes(),
                layout.digest(),
            )));
        }
        Ok(Engine {
            model,
            tokenizer,
            layout,
            store,
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

    /// The embedded cache (`None` with another store).
    pub fn cache(&self) -> Option<&Arc<Cache>> {
        self.cache.as_ref()
    }

    /// Where the KV pages are cached.
    pub fn store(&self) -> &Arc<dyn KvStore> {
        &self.store
    }

    pub fn stats(&self) -> &EngineStats {
        &self.stats
    }

    /// Generation of one prompt, start to finish.
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

    /// Checks a request without starting it: an empty prompt, tokens
    /// outside the vocabulary, no output asked, more than the context, bad
    /// sampling settings or stop strings.
    pub fn check(&self, prompt: &[u32], options: &GenerateOptions) -> Result<()> {
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
        options.sampling.check()?;
        if options.stop.len() > MAX_STOP_STRINGS {
            return Err(EngineError::InvalidArgument(format!(
                "{} stop strings; at most {MAX_STOP_STRINGS}",
                options.stop.len()
            )));
        }
        if let Some(s) = options
            .stop
            .iter()
            .find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
        {
            return Err(EngineError::InvalidArgument(format!(
                "a stop string of {} bytes; each must be 1 to {MAX_STOP_BYTES}",
                s.len()
            )));
        }
        if options.resumed >= prompt.len() {
            return Err(EngineError::InvalidArgument(format!(
                "{} resumed tokens in a prompt of {}",
                options.resumed,
                prompt.len()
            )));
        }
        Ok(())
    }

    /// Checks a request, looks its prompt up in the cache (leasing the
    /// cached pages and promoting them to host RAM) and returns the
    /// sequence, ready for [`Engine::step`].
    pub fn start(&self, prompt: &[u32], options: &GenerateOptions) -> Result<Sequence> {
        let started = Instant::now();
        self.check(prompt, options)?;
        let (ns, prefix) = if options.use_cache {
            let ns = self.store.namespace(&options.tenant, self.model.id())?;
            let prefix = self.lookup(&*ns, prompt);
            (Some(ns), prefix)
        } else {
            (None, None)
        };
        let cached = prefix.as_ref().map_or(0, |p| p.pages());
        let ps = self.layout.page_size;
        let cached_tokens = cached * ps;
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
            sampler: Sampler::new(options.sampling, options.resumed),
            stop: options.stop.clone(),
            output_start: prompt.len() - options.resumed,
            // A wholly cached prompt still runs its last token, for logits.
            pos: cached_tokens.min(prompt.len() - 1),
            kv_len: cached_tokens,
            ns,
            prefix,
            private: PrivatePages::new(cached, &self.layout),
            stored_upto: cached,
            store_failed: false,
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
    fn lookup(&self, ns: &dyn KvNamespace, prompt: &[u32]) -> Option<Box<dyn CachedPrefix>> {
        match ns.lookup(prompt, self.config.lease_ttl) {
            Ok(prefix) => prefix,
            Err(_) => {
                self.stats.lookup_errors.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    /// One forward pass over the unfinished sequences of `seqs`: each runs
    /// its next prefill chunk or its next decode token, and those that
    /// reach the end of their input get their next token. New whole pages
    /// go to the cache.
    pub fn step(&self, seqs: &mut [&mut Sequence]) -> Result<()> {
        let limits = vec![self.config.prefill_chunk; seqs.len()];
        self.step_limited(seqs, &limits)
    }

    /// [`Engine::step`], running at most `limits[i]` tokens of `seqs[i]`
    /// (0: it sits this step out). A scheduler's lever for chunked prefill
    /// and for its KV budget.
    pub fn step_limited(&self, seqs: &mut [&mut Sequence], limits: &[usize]) -> Result<()> {
        assert_eq!(seqs.len(), limits.len(), "one limit per sequence");
        let mut running: Vec<(&mut Sequence, usize)> = seqs
            .iter_mut()
            .map(|s| &mut **s)
            .zip(limits.iter().copied())
            .filter(|(s, limit)| !s.is_finished() && *limit > 0)
            .collect();
        if running.is_empty() {
            return Ok(());
        }
        // Borrow every cached page in place for the length of the step (the
        // sequence's lease keeps them readable). The prefixes step aside
        // while the sequences are borrowed mutably.
        let prefixes: Vec<Option<Box<dyn CachedPrefix>>> =
            running.iter_mut().map(|(s, _)| s.prefix.take()).collect();
        let result = self.run_step(&mut running, &prefixes);
        for ((seq, _), prefix) in running.iter_mut().zip(prefixes) {
            seq.prefix = prefix;
        }
        let (logits, ran, elapsed) = result?;
        self.after_step(&mut running, logits, ran, elapsed);
        Ok(())
    }

    /// The forward pass of a step: logits, tokens run per sequence, time.
    #[allow(clippy::type_complexity)]
    fn run_step(
        &self,
        running: &mut [(&mut Sequence, usize)],
        prefixes: &[Option<Box<dyn CachedPrefix>>],
    ) -> Result<(Vec<Option<Vec<f32>>>, Vec<usize>, Duration)> {
        let mut sources: Vec<Vec<PageBytes<'_>>> = Vec::with_capacity(running.len());
        for ((seq, _), prefix) in running.iter().zip(prefixes) {
            let mut pages = Vec::with_capacity(seq.cached);
            if let Some(prefix) = prefix {
                for page in 0..seq.cached {
                    pages.push(prefix.page(page)?);
                }
            }
            sources.push(pages);
        }
        let views: Vec<Vec<Cow<'_, [f32]>>> = sources
            .iter()
            .map(|pages| pages.iter().map(|p| as_f32(p)).collect())
            .collect();
        let slices: Vec<Vec<&[f32]>> = views
            .iter()
            .map(|v| v.iter().map(|c| &**c).collect())
            .collect();
        let mut chunks: Vec<Chunk<'_>> = running
            .iter_mut()
            .zip(&slices)
            .map(|((seq, limit), cached)| {
                let end = seq
                    .tokens
                    .len()
                    .min(seq.pos + (*limit).min(self.config.prefill_chunk));
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
        Ok((logits, ran, elapsed))
    }

    /// Takes a step's results into its sequences: positions, next tokens,
    /// timings, and the new whole pages into the cache.
    fn after_step(
        &self,
        running: &mut [(&mut Sequence, usize)],
        logits: Vec<Option<Vec<f32>>>,
        ran: Vec<usize>,
        elapsed: Duration,
    ) {
        let ps = self.layout.page_size;
        for (((seq, _), logits), n) in running.iter_mut().zip(logits).zip(ran) {
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
                let next = seq.sampler.next(&logits);
                seq.tokens.push(next);
                if seq.ttft.is_none() {
                    seq.ttft = Some(seq.started.elapsed());
                }
                if seq.stop_at_eos && Some(next) == self.tokenizer.eos() {
                    seq.finish = Some(FinishReason::Eos);
                } else if self.hit_stop(seq) {
                    seq.finish = Some(FinishReason::Stop);
                } else if seq.tokens.len() - seq.prompt_len >= seq.max_new {
                    seq.finish = Some(FinishReason::Length);
                }
            }
            self.store_full_pages(seq, ps);
        }
    }

    /// Whether the token just generated completed one of the sequence's
    /// stop strings. Every token is at least one byte of text, so a stop
    /// string ending in this token lies within the last as many tokens as
    /// the longest stop string has bytes: only those are decoded (an
    /// earlier occurrence would have ended the sequence when it appeared).
    fn hit_stop(&self, seq: &Sequence) -> bool {
        if seq.stop.is_empty() {
            return false;
        }
        let longest = seq.stop.iter().map(String::len).max().unwrap_or(0);
        let from = seq
            .tokens
            .len()
            .saturating_sub(longest)
            .max(seq.output_start);
        match self.tokenizer.decode(&seq.tokens[from..]) {
            Ok(text) => stop_at(&text, &seq.stop).is_some(),
            Err(_) => false,
        }
    }

    /// Hands the cache the sequence's whole pages it has not handed yet,
    /// each once: the store is told they follow the pages handed before.
    /// If the cache lost one of those meanwhile, the sequence's own pages
    /// go again from its first (the ones before are leased, so cached).
    fn store_full_pages(&self, seq: &mut Sequence, ps: usize) {
        let Some(ns) = &seq.ns else { return };
        let full = seq.kv_len / ps;
        if full <= seq.stored_upto || seq.store_failed {
            return;
        }
        let tokens = &seq.tokens[..full * ps];
        let first = seq.private.first_page();
        let mut from = seq.stored_upto;
        let outcome = loop {
            self.stats
                .sent_pages
                .fetch_add((full - from) as u64, Ordering::Relaxed);
            match ns.store(tokens, from, seq.private.bytes(from..full)) {
                Ok(Stored::PrefixMissing) if from > first => from = first,
                other => break other,
            }
        };
        match outcome {
            Ok(Stored::Pages(stored)) => {
                seq.stored_pages += stored;
                self.stats
                    .stored_pages
                    .fetch_add(stored as u64, Ordering::Relaxed);
                seq.stored_upto = full;
            }
            Ok(Stored::PrefixMissing) | Err(_) => {
                self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
                seq.store_failed = true;
            }
        }
    }

    /// Says a finished sequence's output length to the cache, on the
    /// pages it holds there (cached or stored by the sequence).
    fn tell_output(&self, seq: &Sequence) {
        let (Some(ns), Some(_)) = (&seq.ns, seq.finish) else {
            return;
        };
        // `stored_upto` starts at `cached` and only grows.
        let pages = if seq.store_failed {
            seq.cached
        } else {
            seq.stored_upto
        };
        if pages == 0 {
            return;
        }
        let output = (seq.tokens.len() - seq.output_start).min(u32::MAX as usize) as u32;
        if ns
            .finished(&seq.tokens[..pages * seq.page_size], output)
            .is_err()
        {
            self.stats.store_errors.fetch_add(1, Ordering::Relaxed);
        }
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

    /// Ends a sequence (finished or not): releases its lease (dropping a
    /// sequence does too) and reports. A sequence that finished tells the
    /// cache how much it generated, for policies that learn from it.
    pub fn finish(&self, seq: Sequence) -> Generation {
        self.tell_output(&seq);
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

/// Where the text must be cut for `stop`: the start of the earliest stop
/// string in it, if any.
pub fn stop_at(text: &str, stop: &[String]) -> Option<usize> {
    stop.iter()
        .filter(|s| !s.is_empty())
        .filter_map(|s| text.find(s.as_str()))
        .min()
}
