//! radixkv's attached decode engine: a real small model (SmolLM2-135M, a
//! llama-family GGUF) running on CPU, whose KV lives in pages that the
//! radixkv cache indexes, so that a prompt's cached prefix is read, not
//! recomputed.
//!
//! - [`Model`] reads the GGUF (candle's reader), keeps its Q4_1 and Q8_0
//!   weights quantized (the matmul multiplies them by activations
//!   quantized to 8 bits per block, in exact integer dot products, as
//!   llama.cpp does; `EngineConfigBuilder::f32_weights` loads them as F32
//!   for exact F32 arithmetic instead) and runs the llama forward written
//!   here (RMSNorm, RoPE, grouped-query attention, SwiGLU) with a
//!   batch-invariant matmul.
//! - [`Tokenizer`] is the model's byte-level BPE, built from the GGUF.
//! - [`Engine`] looks each prompt up in the [`Cache`](cache_server::Cache),
//!   leases the cached pages and reads them in place through the
//!   sequence's block table, computes only the uncached suffix, and stores
//!   every new whole page (prompt and output) for the next turn.
//! - [`KvStore`] is where pages are cached: the embedded cache (the
//!   default) or a radixkv server ([`RemoteStore`], over gRPC and its
//!   shared memory).
//! - [`sampling`] chooses each token: greedy by default, or sampled at a
//!   temperature from a `top_p` nucleus with a seeded per-sequence
//!   generator; [`GenerateOptions`] also carries stop strings.
//! - [`Scheduler`] batches requests continuously on a worker thread
//!   (chunked prefill, a KV page budget with preemption, cancellation).
//! - [`http`] serves it as an OpenAI-compatible API (the binary
//!   `radixkv-engine`).
//!
//! ```no_run
//! use engine::{Engine, EngineConfig, GenerateOptions};
//! let engine = Engine::load(EngineConfig::builder().build()?)?;
//! let prompt = engine.tokenizer().encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")?;
//! let out = engine.generate(&prompt, &GenerateOptions::new(32))?;
//! println!("{} ({} prompt tokens cached)", engine.tokenizer().decode(&out.tokens)?, out.cached_tokens);
//! # Ok::<(), engine::EngineError>(())
//! ```
//!
//! What the engine must never do:
//! - change its output because of the cache or the batch: greedy output,
//!   and sampled output with a given seed, is token for token the same
//!   with a cached prefix or without, alone or batched, preempted or not
//!   (the kernels give every token the same arithmetic whatever batch it
//!   is computed in, and a token's random draw depends only on the seed
//!   and its place in the output);
//! - write into a block it borrowed from the cache, or read a cached page
//!   without holding a lease on it;
//! - fail a request because the cache failed: a failed lookup computes the
//!   prompt cold, a failed store leaves the pages private;
//! - hand the cache a sequence's page more than once, unless the cache
//!   lost a page before it meanwhile;
//! - load weights or data from anywhere but the local model file.

mod engine;
mod error;
mod exp;
mod forward;
mod gguf;
pub mod http;
mod kv;
mod matmul;
mod model;
mod quant;
pub mod sampling;
pub mod scheduler;
mod simd;
pub mod store;
mod tokenizer;

pub use engine::{
    stop_at, Engine, EngineConfig, EngineConfigBuilder, EngineStats, FinishReason, GenerateOptions,
    Generation, Sequence, MAX_STOP_BYTES, MAX_STOP_STRINGS,
};
pub use error::{EngineError, Result};
pub use gguf::{default_model_path, ModelConfig};
pub use kv::KvLayout;
pub use model::Model;
pub use sampling::Sampling;
pub use scheduler::{Event, Scheduler, SchedulerConfig, SchedulerStats};
pub use store::{
    CachedPrefix, EmbeddedStore, KvNamespace, KvStore, PageBytes, RemoteStore, Stored,
};
pub use tokenizer::Tokenizer;
