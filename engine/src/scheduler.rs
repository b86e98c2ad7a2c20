//! Continuous batching: one worker thread owns the stepping of an
//! [`Engine`] and runs every admitted request in each forward pass.
//!
//! - Requests arrive through [`Scheduler::submit`] and join at the next
//!   step; each gets its tokens back through its own channel as they are
//!   produced ([`Event`]).
//! - Chunked prefill: a step runs one token of every decoding sequence and
//!   at most [`SchedulerConfig::prefill_tokens`] prompt tokens in all, so a
//!   long prompt never stalls the others' decoding for long.
//! - KV budget: the sequences' private pages (those the cache does not
//!   lend them) are capped at [`SchedulerConfig::kv_pages`]. A prefill
//!   that does not fit runs a smaller chunk or waits; a decode that needs a
//!   page when none is free preempts the newest sequence, which goes back
//!   to the head of the queue and later resumes from the pages it stored
//!   in the cache (recomputing what the cache lost). Requests are never
//!   failed for want of KV space: the oldest sequence always runs, even
//!   past the budget.
//! - A request whose receiver is dropped is cancelled at the next step and
//!   its lease released.
//!
//! Preemption and batching never change a token: the forward pass is batch
//! invariant (see [`matmul`](crate::matmul)), so a resumed or batched
//! sequence produces exactly what it would have alone.

use crate::engine::{Engine, FinishReason, GenerateOptions, Generation, Sequence};
use crate::error::{EngineError, Result};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// Settings of a [`Scheduler`].
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Most sequences in one step.
    pub max_batch: usize,
    /// Most prompt tokens (over all prefilling sequences) in one step.
    pub prefill_tokens: usize,
    /// Most private KV pages over all running sequences.
    pub kv_pages: usize,
    /// Times a request is retried after its step failed (a cached page it
    /// leased could not be read) before it fails.
    pub max_retries: u32,
}

impl Default for SchedulerConfig {
    /// 16 sequences, 256 prompt tokens a step, 2048 pages (1.5 GB of KV at
    /// SmolLM2's 737 KB pages).
    fn default() -> Self {
        Self {
            max_batch: 16,
            prefill_tokens: 256,
            kv_pages: 2048,
            max_retries: 3,
        }
    }
}

/// What a request's channel carries, in this order: `Started` once, then
/// `Token`s, then `Done` or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// Admitted for the first time: how much of the prompt the cache held.
    Started {
        prompt_tokens: usize,
        cached_tokens: usize,
    },
    /// The next generated token.
    Token(u32),
    /// Finished: the whole generation (its `ttft` is from submission).
    Done(Generation),
    Failed(EngineError),
}

/// The scheduler's counters, shared with whoever reports them.
#[derive(Debug, Default)]
pub struct SchedulerStats {
    pub submitted: AtomicU64,
    pub completed: AtomicU64,
    pub failed: AtomicU64,
    pub cancelled: AtomicU64,
    pub preempted: AtomicU64,
    /// Forward passes, and those that ran more than one sequence.
    pub steps: AtomicU64,
    pub batched_steps: AtomicU64,
    /// The largest number of sequences seen in one step.
    pub max_batch_seen: AtomicU64,
    /// Prompt tokens run, and tokens generated.
    pub prefill_tokens: AtomicU64,
    pub decode_tokens: AtomicU64,
    /// Time spent in forward passes.
    pub busy_nanos: AtomicU64,
    /// Running and waiting sequences now.
    pub running: AtomicU64,
    pub waiting: AtomicU64,
    /// Private KV pages held now.
    pub kv_pages: AtomicU64,
    /// Tokens per second over the last second or so of work (`f64` bits).
    prefill_rate: AtomicU64,
    decode_rate: AtomicU64,
}

impl SchedulerStats {
    /// Prompt tokens run per second lately (0 when idle).
    pub fn prefill_rate(&self) -> f64 {
        f64::from_bits(self.prefill_rate.load(Ordering::Relaxed))
    }

    /// Tokens generated per second lately, over all sequences (0 when idle).
    pub fn decode_rate(&self) -> f64 {
        f64::from_bits(self.decode_rate.load(Ordering::Relaxed))
    }
}

/// Tokens counted since `start`, published as rates once a second.
#[derive(Debug)]
struct RateWindow {
    start: Instant,
    prefill: u64,
    decode: u64,
}

impl RateWindow {
    const SPAN: Duration = Duration::from_secs(1);

    fn new() -> Self {
        Self {
            start: Instant::now(),
            prefill: 0,
            decode: 0,
        }
    }

    fn add(&mut self, stats: &SchedulerStats, prefill: u64, decode: u64) {
        self.prefill += prefill;
        self.decode += decode;
        let secs = self.start.elapsed().as_secs_f64();
        if secs >= Self::SPAN.as_secs_f64() {
            stats
                .prefill_rate
                .store((self.prefill as f64 / secs).to_bits(), Ordering::Relaxed);
            stats
                .decode_rate
                .store((self.decode as f64 / secs).to_bits(), Ordering::Relaxed);
            *self = Self::new();
        }
    }

    /// Idle: the rates are zero, and the next window starts with the work.
    fn idle(&mut self, stats: &SchedulerStats) {
        stats.prefill_rate.store(0, Ordering::Relaxed);
        stats.decode_rate.store(0, Ordering::Relaxed);
        *self = Self::new();
    }
}

/// A handle on the worker; dropping it cancels what is in flight and stops
/// the worker.
#[derive(Debug)]
pub struct Scheduler {
    engine: Arc<Engine>,
    tx: Option<mpsc::Sender<Request>>,
    stats: Arc<SchedulerStats>,
    worker: Option<JoinHandle<()>>,
}

struct Request {
    prompt: Vec<u32>,
    options: GenerateOptions,
    events: UnboundedSender<Event>,
    submitted: Instant,
}

/// A request in the scheduler: what it was asked, what it has produced
/// (across preemptions), and its sequence while admitted.
struct Entry {
    req: Request,
    generated: Vec<u32>,
    started: bool,
    cached_tokens: usize,
    computed_prompt: usize,
    stored_pages: usize,
    ttft: Option<Duration>,
    prefill_time: Duration,
    decode_time: Duration,
    retries: u32,
    seq: Option<Sequence>,
}

impl Scheduler {
    /// Starts the worker thread.
    pub fn start(engine: Arc<Engine>, config: SchedulerConfig) -> Result<Scheduler> {
        if config.max_batch == 0 || config.prefill_tokens == 0 || config.kv_pages == 0 {
            return Err(EngineError::InvalidConfig(
                "the scheduler needs a batch, a prefill chunk and KV pages of at least 1".into(),
            ));
        }
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(SchedulerStats::default());
        let worker = Worker {
            engine: engine.clone(),
            config,
            rx,
            stats: stats.clone(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            rates: RateWindow::new(),
        };
        let worker = std::thread::Builder::new()
            .name("radixkv-scheduler".into())
            .spawn(move || worker.run())
            .map_err(|e| EngineError::InvalidConfig(format!("spawning the scheduler: {e}")))?;
        Ok(Scheduler {
            engine,
            tx: Some(tx),
            stats,
            worker: Some(worker),
        })
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn stats(&self) -> &Arc<SchedulerStats> {
        &self.stats
    }

    /// Queues a request; its events arrive on the returned receiver
    /// (dropping it cancels the request). Bad requests fail at once.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        options: GenerateOptions,
    ) -> Result<UnboundedReceiver<Event>> {
        self.engine.check(&prompt, &options)?;
        let (events, rx) = unbounded_channel();
        let req = Request {
            prompt,
            options,
            events,
            submitted: Instant::now(),
        };
        self.stats.submitted.fetch_add(1, Ordering::Relaxed);
        self.tx
            .as_ref()
            .expect("the sender lives until drop")
            .send(req)
            .map_err(|_| EngineError::InvalidConfig("the scheduler has stopped".into()))?;
        Ok(rx)
    }

    /// Submits and waits for the end (for callers outside async code).
    pub fn generate(&self, prompt: Vec<u32>, options: GenerateOptions) -> Result<Generation> {
        let mut rx = self.submit(prompt, options)?;
        while let Some(event) = rx.blocking_recv() {
            match event {
                Event::Done(g) => return Ok(g),
                Event::Failed(e) => return Err(e),
                Event::Started { .. } | Event::Token(_) => {}
            }
        }
        Err(EngineError::InvalidConfig(
            "the scheduler has stopped".into(),
        ))
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.worker.take() {
            // A panicked worker has nothing more to clean up.
            let _ = w.join();
        }
    }
}

struct Worker {
    engine: Arc<Engine>,
    config: SchedulerConfig,
    rx: mpsc::Receiver<Request>,
    stats: Arc<SchedulerStats>,
    /// Not admitted, or preempted (at the front), in order.
    waiting: VecDeque<Entry>,
    /// Admitted, oldest first; each has its sequence.
    running: Vec<Entry>,
    rates: RateWindow,
}

impl Worker {
    fn run(mut self) {
        loop {
            // New requests; block only when there is nothing to do.
            if self.running.is_empty() && self.waiting.is_empty() {
                self.rates.idle(&self.stats);
                match self.rx.recv() {
                    Ok(req) => self.waiting.push_back(Entry::new(req)),
                    Err(_) => return,
                }
            }
            loop {
                match self.rx.try_recv() {
                    Ok(req) => self.waiting.push_back(Entry::new(req)),
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        // The handle is gone: cancel everything.
                        for e in self.running.drain(..).chain(self.waiting.drain(..)) {
                            if let Some(seq) = e.seq {
                                self.engine.finish(seq);
                            }
                        }
                        return;
                    }
                }
            }
            self.drop_cancelled();
            self.admit();
            let limits = self.plan();
            self.publish();
            if self.running.is_empty() {
                continue;
            }
            self.step(&limits);
            self.publish();
        }
    }

    /// Removes requests whose receiver is gone, releasing their leases.
    fn drop_cancelled(&mut self) {
        let engine = &self.engine;
        let stats = &self.stats;
        let mut cancel = |e: &mut Entry| {
            if !e.req.events.is_closed() {
                return true;
            }
            if let Some(seq) = e.seq.take() {
                engine.finish(seq);
            }
            stats.cancelled.fetch_add(1, Ordering::Relaxed);
            false
        };
        self.running.retain_mut(&mut cancel);
        self.waiting.retain_mut(&mut cancel);
    }

    fn held(&self) -> usize {
        self.running
            .iter()
            .map(|e| e.seq.as_ref().map_or(0, Sequence::private_pages))
            .sum()
    }

    /// Starts waiting requests (a cache lookup each) while the batch has
    /// room and a KV page is free after the decoders' next pages.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch {
            let committed: usize = self
                .running
                .iter()
                .map(|e| e.seq.as_ref().map_or(0, |s| s.private_pages_after(1)))
                .sum();
            if !self.running.is_empty() && committed >= self.config.kv_pages {
                return;
            }
            let Some(mut entry) = self.waiting.pop_front() else {
                return;
            };
            let mut tokens = entry.req.prompt.clone();
            tokens.extend_from_slice(&entry.generated);
            let mut options = entry.req.options.clone();
            options.max_new_tokens -= entry.generated.len();
            options.resumed = entry.generated.len();
            match self.engine.start(&tokens, &options) {
                Ok(seq) => {
                    if !entry.started {
                        entry.started = true;
                        entry.cached_tokens = seq.cached_tokens();
                        let _ = entry.req.events.send(Event::Started {
                            prompt_tokens: entry.req.prompt.len(),
                            cached_tokens: entry.cached_tokens,
                        });
                    }
                    entry.seq = Some(seq);
                    self.running.push(entry);
                }
                Err(e) => self.fail(entry, e),
            }
        }
    }

    /// How many tokens each running sequence runs this step, preempting
    /// the newest sequences while a decoder needs a page that is not free.
    fn plan(&mut self) -> Vec<usize> {
        'replan: loop {
            let mut free = self.config.kv_pages as isize;
            let mut prefill_left = self.config.prefill_tokens;
            let mut limits = Vec::with_capacity(self.running.len());
            for (i, e) in self.running.iter().enumerate() {
                let seq = e.seq.as_ref().expect("a running entry has its sequence");
                let avail = free.max(0) as usize;
                let n = if seq.is_decoding() {
                    if i > 0 && seq.private_pages_after(1) > avail {
                        self.preempt_newest();
                        continue 'replan;
                    }
                    1
                } else if i == 0 {
                    // The oldest always moves, budget or not.
                    seq.pending().min(prefill_left).max(1)
                } else {
                    seq.tokens_within(avail, prefill_left)
                };
                if !seq.is_decoding() {
                    prefill_left = prefill_left.saturating_sub(n);
                }
                free -= seq.private_pages_after(n) as isize;
                limits.push(n);
            }
            return limits;
        }
    }

    /// Ends the newest running sequence (its whole pages are in the cache)
    /// and queues it to resume first.
    fn preempt_newest(&mut self) {
        let mut e = self.running.pop().expect("a sequence to preempt");
        let seq = e.seq.take().expect("a running entry has its sequence");
        let g = self.engine.finish(seq);
        e.absorb(&g);
        self.stats.preempted.fetch_add(1, Ordering::Relaxed);
        self.waiting.push_front(e);
    }

    fn publish(&self) {
        let s = &self.stats;
        s.running
            .store(self.running.len() as u64, Ordering::Relaxed);
        s.waiting
            .store(self.waiting.len() as u64, Ordering::Relaxed);
        s.kv_pages.store(self.held() as u64, Ordering::Relaxed);
    }

    fn step(&mut self, limits: &[usize]) {
        let before: Vec<(usize, bool)> = self
            .running
            .iter()
            .map(|e| {
                let s = e.seq.as_ref().expect("a running entry has its sequence");
                (s.tokens().len(), s.is_decoding())
            })
            .collect();
        let began = Instant::now();
        let result = {
            let mut seqs: Vec<&mut Sequence> = self
                .running
                .iter_mut()
                .map(|e| e.seq.as_mut().expect("a running entry has its sequence"))
                .collect();
            self.engine.step_limited(&mut seqs, limits)
        };
        let elapsed = began.elapsed();
        let ran = limits.iter().filter(|&&n| n > 0).count() as u64;
        let s = &self.stats;
        s.steps.fetch_add(1, Ordering::Relaxed);
        if ran > 1 {
            s.batched_steps.fetch_add(1, Ordering::Relaxed);
        }
        s.max_batch_seen.fetch_max(ran, Ordering::Relaxed);
        s.busy_nanos
            .fetch_add(elapsed.as_nanos() as u64, Ordering::Relaxed);
        let (mut prefill, mut decode) = (0, 0);
        for (&(_, decoding), &n) in before.iter().zip(limits) {
            if decoding {
                decode += n as u64;
            } else {
                prefill += n as u64;
            }
        }
        s.prefill_tokens.fetch_add(prefill, Ordering::Relaxed);
        s.decode_tokens.fetch_add(decode, Ordering::Relaxed);
        self.rates.add(&self.stats, prefill, decode);
        if let Err(e) = result {
            // A cached page could not be read: start the batch over (the
            // lookups will not find the lost pages again).
            let mut retry = Vec::new();
            while !self.running.is_empty() {
                self.preempt_newest();
                let mut entry = self.waiting.pop_front().expect("just preempted");
                entry.retries += 1;
                retry.push(entry);
            }
            for entry in retry {
                if entry.retries > self.config.max_retries {
                    self.fail(entry, EngineError::InvalidArgument(e.to_string()));
                } else {
                    self.waiting.push_front(entry);
                }
            }
            return;
        }
        // New tokens out; finished sequences out.
        let mut i = 0;
        let mut k = 0;
        while i < self.running.len() {
            let e = &mut self.running[i];
            let seq = e.seq.as_ref().expect("a running entry has its sequence");
            for &t in &seq.tokens()[before[k].0..] {
                if e.ttft.is_none() {
                    e.ttft = Some(e.req.submitted.elapsed());
                }
                e.generated.push(t);
                let _ = e.req.events.send(Event::Token(t));
            }
            k += 1;
            if seq.is_finished() {
                let mut e = self.running.remove(i);
                let g = self.engine.finish(e.seq.take().expect("checked"));
                e.absorb(&g);
                let done = Generation {
                    tokens: std::mem::take(&mut e.generated),
                    prompt_tokens: e.req.prompt.len(),
                    cached_tokens: e.cached_tokens,
                    computed_prompt_tokens: e.computed_prompt,
                    stored_pages: e.stored_pages,
                    finish: g.finish,
                    ttft: e.ttft.unwrap_or_default(),
                    prefill_time: e.prefill_time,
                    decode_time: e.decode_time,
                };
                debug_assert!(
                    done.finish != FinishReason::Length
                        || done.tokens.len() == e.req.options.max_new_tokens
                );
                self.stats.completed.fetch_add(1, Ordering::Relaxed);
                let _ = e.req.events.send(Event::Done(done));
            } else {
                i += 1;
            }
        }
    }

    fn fail(&self, entry: Entry, e: EngineError) {
        if let Some(seq) = entry.seq {
            self.engine.finish(seq);
        }
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        let _ = entry.req.events.send(Event::Failed(e));
    }
}

impl Entry {
    fn new(req: Request) -> Self {
        Self {
            req,
            generated: Vec::new(),
            started: false,
            cached_tokens: 0,
            computed_prompt: 0,
            stored_pages: 0,
            ttft: None,
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
            retries: 0,
            seq: None,
        }
    }

    /// Adds up what one admission of the request did.
    fn absorb(&mut self, g: &Generation) {
        self.computed_prompt += g.computed_prompt_tokens;
        self.stored_pages += g.stored_pages;
        self.prefill_time += g.prefill_time;
        self.decode_time += g.decode_time;
    }
}
