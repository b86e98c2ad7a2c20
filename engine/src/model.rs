//! The model's weights, dequantized to F32 once at load and packed for
//! [`matmul`](crate::matmul), and the RoPE tables.
//!
//! F32 rather than the file's Q4_1: candle's Q4_1 matmul is slow (no SIMD
//! path) and requantizing changes the outputs; dequantized F32 weights match
//! llama.cpp's greedy output (about 540 MB for SmolLM2-135M).

use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, ModelConfig};
use crate::matmul::{Packed, PANEL};
use crate::tokenizer::Tokenizer;
use std::path::Path;

/// Most query heads per KV head the attention kernel takes.
pub(crate) const MAX_GROUP: usize = 8;

/// One transformer block.
#[derive(Debug)]
pub(crate) struct Layer {
    pub attn_norm: Vec<f32>,
    /// Q, K and V stacked: `(heads + 2 × kv_heads) × head_dim` outputs.
    pub qkv: Packed,
    pub out: Packed,
    pub ffn_norm: Vec<f32>,
    /// Gate and up stacked: `2 × ffn` outputs.
    pub gate_up: Packed,
    pub down: Packed,
}

/// Rotary embedding tables, `[position][head_dim / 2]`, computed the way
/// llama.cpp does ("normal" rope on the GGUF's permuted Q/K weights: pairs
/// `(2i, 2i + 1)`, angle `pos × base^(-2i/d)` by repeated multiplication
/// in `f32`).
#[derive(Debug)]
pub(crate) struct Rope {
    pub half: usize,
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl Rope {
    fn new(config: &ModelConfig) -> Self {
        let half = config.head_dim / 2;
        let scale = config.rope_base.powf(-2.0 / config.head_dim as f32);
        let mut cos = Vec::with_capacity(config.context * half);
        let mut sin = Vec::with_capacity(config.context * half);
        for pos in 0..config.context {
            let mut theta = pos as f32;
            for _ in 0..half {
                cos.push(theta.cos());
                sin.push(theta.sin());
                theta *= scale;
            }
        }
        Self { half, cos, sin }
    }

    /// Rotates each `head_dim`-wide head of `x` to position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let cos = &self.cos[pos * self.half..][..self.half];
        let sin = &self.sin[pos * self.half..][..self.half];
        for head in x.chunks_exact_mut(2 * self.half) {
            for ((pair, &c), &s) in head.chunks_exact_mut(2).zip(cos).zip(sin) {
                let (x0, x1) = (pair[0], pair[1]);
                pair[0] = x0 * c - x1 * s;
                pair[1] = x0 * s + x1 * c;
            }
        }
    }
}

/// A llama-architecture model ready to run.
#[derive(Debug)]
pub struct Model {
    pub(crate) config: ModelConfig,
    pub(crate) layers: Vec<Layer>,
    /// The token embedding, also the output projection (tied embeddings).
    pub(crate) embed: Packed,
    pub(crate) output_norm: Vec<f32>,
    pub(crate) rope: Rope,
    id: String,
}

impl Model {
    /// Loads the model and its tokenizer from a GGUF file.
    pub fn load(path: &Path) -> Result<(Model, Tokenizer)> {
        let mut file = GgufFile::open(path)?;
        let config = file.config()?;
        let tokenizer = Tokenizer::from_gguf(&file)?;
        if tokenizer.vocab_size() != config.vocab {
            return Err(EngineError::Model(format!(
                "{} tokens for a vocabulary of {}",
                tokenizer.vocab_size(),
                config.vocab
            )));
        }
        if config.group() > MAX_GROUP {
            return Err(EngineError::Model(format!(
                "{} query heads per KV head; at most {MAX_GROUP} are supported",
                config.group()
            )));
        }
        let (h, hd) = (config.hidden, config.head_dim);
        for (what, n) in [
            ("the hidden size", h),
            ("the KV width", config.kv_heads * hd),
            ("the FFN size", config.ffn),
            ("the vocabulary", config.vocab),
        ] {
            if n % PANEL != 0 {
                return Err(EngineError::Model(format!(
                    "{what} ({n}) is not a multiple of {PANEL}"
                )));
            }
        }
        let mut layers = Vec::with_capacity(config.layers);
        for i in 0..config.layers {
            let mut weight = |name: &str, rows: usize, cols: usize| -> Result<Packed> {
                let w = file.tensor(&format!("blk.{i}.{name}.weight"), &[rows, cols])?;
                Ok(Packed::pack(&w, rows, cols))
            };
            let kv = config.kv_heads * hd;
            let qkv = Packed::concat(&[
                weight("attn_q", config.heads * hd, h)?,
                weight("attn_k", kv, h)?,
                weight("attn_v", kv, h)?,
            ]);
            let out = weight("attn_output", h, config.heads * hd)?;
            let gate_up = Packed::concat(&[
                weight("ffn_gate", config.ffn, h)?,
                weight("ffn_up", config.ffn, h)?,
            ]);
            let down = weight("ffn_down", h, config.ffn)?;
            layers.push(Layer {
                attn_norm: file.tensor(&format!("blk.{i}.attn_norm.weight"), &[h])?,
                qkv,
                out,
                ffn_norm: file.tensor(&format!("blk.{i}.ffn_norm.weight"), &[h])?,
                gate_up,
                down,
            });
        }
        if file.has_tensor("output.weight") {
            return Err(EngineError::Model(
                "an untied output projection (output.weight) is not supported".into(),
            ));
        }
        let embed = Packed::pack(
            &file.tensor("token_embd.weight", &[config.vocab, h])?,
            config.vocab,
            h,
        );
        let output_norm = file.tensor("output_norm.weight", &[h])?;
        let stem = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        let model = Model {
            rope: Rope::new(&config),
            config,
            layers,
            embed,
            output_norm,
            id: format!("{stem}@{:016x}", file.digest),
        };
        Ok((model, tokenizer))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The model's name and the digest of its file: the cache namespace's
    /// model id, so different weights never share KV.
    pub fn id(&self) -> &str {
        &self.id
    }
}
