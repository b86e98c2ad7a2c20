//! The model's weights, packed for [`matmul`](crate::matmul) in the file's
//! own quantization (Q4_1 and Q8_0 blocks, about 100 MB for SmolLM2-135M),
//! and the RoPE tables.
//!
//! The quantized weights multiply activations quantized to 8 bits per
//! block, in integer dot products, as llama.cpp does (see `quant`): a
//! sixth of the F32 weights' memory traffic and a fourth of their work per
//! multiply-add. Their values are candle's dequantization bit for bit, and
//! loading with `f32_weights` runs exactly the F32 arithmetic on them (for
//! a float reference). Other tensor types are dequantized to F32 at load.

use crate::error::{EngineError, Result};
use crate::gguf::{GgufFile, ModelConfig};
use crate::matmul::{Packed, PANEL};
use crate::quant::QK;
use crate::tokenizer::Tokenizer;
use candle_core::quantized::GgmlDType;
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

/// The weight `name` (`rows × cols`), packed: quantized as the file has it
/// where the kernels take that type (unless `f32` asks otherwise), else
/// dequantized to F32.
fn weight(file: &mut GgufFile, name: &str, rows: usize, cols: usize, f32: bool) -> Result<Packed> {
    let (dtype, raw) = file.raw_tensor(name, &[rows, cols])?;
    Ok(match dtype {
        GgmlDType::Q4_1 if !f32 && cols.is_multiple_of(QK) => Packed::pack_q4_1(&raw, rows, cols),
        GgmlDType::Q8_0 if !f32 && cols.is_multiple_of(QK) => Packed::pack_q8_0(&raw, rows, cols),
        _ => Packed::pack(&file.tensor(name, &[rows, cols])?, rows, cols),
    })
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
    /// Loads the model and its tokenizer from a GGUF file; with
    /// `f32_weights`, every weight dequantized to F32 (exact F32
    /// arithmetic: see `matmul`).
    pub fn load(path: &Path, f32_weights: bool) -> Result<(Model, Tokenizer)> {
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
            let mut weight = |name: &str, rows: usize, cols: usize| {
                weight(
                    &mut file,
                    &format!("blk.{i}.{name}.weight"),
                    rows,
                    cols,
                    f32_weights,
                )
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
        let embed = weight(&mut file, "token_embd.weight", config.vocab, h, f32_weights)?;
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
            // The arithmetic too: the two give different KV.
            id: format!(
                "{stem}@{:016x}{}",
                file.digest,
                if f32_weights { "+f32" } else { "+q8" }
            ),
        };
        Ok((model, tokenizer))
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The model's name, the digest of its file and its arithmetic
    /// (`+q8`: quantized weights times 8-bit activations; `+f32`: F32
    /// weights): the cache namespace's model id, so different weights or
    /// arithmetic never share KV.
    pub fn id(&self) -> &str {
        &self.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::forward::{forward, Chunk};
    use crate::kv::{KvLayout, PrivatePages};
    use crate::matmul::{matmul_with, Isa};

    /// The fetched model's path, or `None` (with a message) when it is not.
    fn model_path() -> Option<std::path::PathBuf> {
        let path = crate::default_model_path();
        if path.exists() {
            return Some(path);
        }
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: model not fetched; run scripts/fetch-model ({} is missing)",
            path.display()
        );
        None
    }

    impl Model {
        /// The same model with every weight in F32: what loading used to
        /// give (the values the quantized kernels multiply by).
        fn to_f32(&self) -> Model {
            Model {
                config: self.config.clone(),
                layers: self
                    .layers
                    .iter()
                    .map(|l| Layer {
                        attn_norm: l.attn_norm.clone(),
                        qkv: l.qkv.to_f32(),
                        out: l.out.to_f32(),
                        ffn_norm: l.ffn_norm.clone(),
                        gate_up: l.gate_up.to_f32(),
                        down: l.down.to_f32(),
                    })
                    .collect(),
                embed: self.embed.to_f32(),
                output_norm: self.output_norm.clone(),
                rope: Rope::new(&self.config),
                id: self.id.clone(),
            }
        }
    }

    /// Every weight of the real model, as packed, holds candle's F32
    /// dequantization of the file bit for bit, and multiplies to the same
    /// bits on every kernel path (SIMD and scalar, any rows).
    #[test]
    fn every_weight_is_candles_dequantization_and_multiplies_alike_everywhere() {
        let Some(path) = model_path() else {
            return;
        };
        let (model, _) = Model::load(&path, false).unwrap();
        let mut file = GgufFile::open(&path).unwrap();
        let c = model.config.clone();
        let (h, kv) = (c.hidden, c.kv_heads * c.head_dim);
        let mut stacked = |names: &[(&str, usize)], cols: usize| -> Packed {
            let mut rows = Vec::new();
            let mut n = 0;
            for &(name, r) in names {
                rows.extend(file.tensor(name, &[r, cols]).unwrap());
                n += r;
            }
            Packed::pack(&rows, n, cols)
        };
        let mut pairs = Vec::new();
        for (i, l) in model.layers.iter().enumerate() {
            let name = |w: &str| format!("blk.{i}.{w}.weight");
            let (q, k, v) = (name("attn_q"), name("attn_k"), name("attn_v"));
            let qkv = stacked(&[(&q, c.heads * c.head_dim), (&k, kv), (&v, kv)], h);
            let out = stacked(&[(&name("attn_output"), h)], c.heads * c.head_dim);
            let (g, u) = (name("ffn_gate"), name("ffn_up"));
            let gate_up = stacked(&[(&g, c.ffn), (&u, c.ffn)], h);
            let down = stacked(&[(&name("ffn_down"), h)], c.ffn);
            pairs.extend([
                (format!("{i}.qkv"), &l.qkv, qkv),
                (format!("{i}.out"), &l.out, out),
                (format!("{i}.gate_up"), &l.gate_up, gate_up),
                (format!("{i}.down"), &l.down, down),
            ]);
        }
        let embed = stacked(&[("token_embd.weight", c.vocab)], h);
        pairs.push(("embed".into(), &model.embed, embed));
        for (name, packed, reference) in pairs {
            assert!(packed.is_quantized(), "{name} is not kept quantized");
            assert!(packed.same_bits(&reference), "{name}: values differ");
            let (n, k) = (reference.n(), reference.k());
            let x: Vec<f32> = (0..13 * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 64.0)
                .collect();
            let mut want = vec![0.0; 13 * n];
            matmul_with(&x, 13, packed, &mut want, Isa::Scalar);
            // Each SIMD ISA, one tile and more; rows' outputs the scalar
            // code's bits whatever the batch.
            let simd = Isa::all().into_iter().filter(|&isa| isa != Isa::Scalar);
            for (m, isa) in simd.flat_map(|isa| [1, 3, 8, 13].map(|m| (m, isa))) {
                let mut got = vec![0.0; m * n];
                matmul_with(&x[..m * k], m, packed, &mut got, isa);
                assert!(
                    got.iter()
                        .zip(&want)
                        .all(|(a, b)| a.to_bits() == b.to_bits()),
                    "{name}: m = {m}, {isa:?}"
                );
            }
        }
    }

    /// The whole model on quantized weights gives the same logits, bit for
    /// bit, for a token decoded after a prefill and for the same token at
    /// the end of one prefill of it all; and logits near those of the
    /// same model on F32 weights (exact arithmetic), with the same choices.
    #[test]
    fn logits_are_the_same_bits_prefilled_or_decoded_and_near_the_f32_models() {
        let Some(path) = model_path() else {
            return;
        };
        let (model, tokenizer) = Model::load(&path, false).unwrap();
        let reference = model.to_f32();
        let layout = KvLayout::new(&model.config, 16);
        let prompt = tokenizer
            .encode("<|im_start|>user\nWhat is a radix tree? Explain it to a child.<|im_end|>\n<|im_start|>assistant\n")
            .unwrap();
        // Greedy steps: a prefill (many rows), then decode steps (one row
        // each).
        let run = |m: &Model, tokens: &[u32], steps: usize| -> Vec<Vec<f32>> {
            let mut private = PrivatePages::new(0, &layout);
            let mut tokens = tokens.to_vec();
            let mut out = Vec::new();
            for step in 0..steps {
                let start = if step == 0 { 0 } else { tokens.len() - 1 };
                let mut chunks = [Chunk {
                    tokens: &tokens[start..],
                    start,
                    kv_len: start,
                    cached: &[],
                    private: &mut private,
                    logits: true,
                }];
                let l = forward(m, &layout, &mut chunks).remove(0).unwrap();
                let next = (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap();
                out.push(l);
                tokens.push(next as u32);
            }
            out
        };
        let argmax = |l: &[f32]| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap();
        let stepped = run(&model, &prompt, 4);
        let mut tokens = prompt.clone();
        for (step, l) in stepped.iter().enumerate() {
            let once = run(&model, &tokens, 1).remove(0);
            assert!(
                once.iter().zip(l).all(|(a, b)| a.to_bits() == b.to_bits()),
                "step {step}: a prefill's logits differ from a decode step's"
            );
            tokens.push(argmax(l) as u32);
        }
        let exact = run(&reference, &prompt, 4);
        for (step, (a, b)) in stepped.iter().zip(&exact).enumerate() {
            let diff = a
                .iter()
                .zip(b)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            eprintln!("step {step}: logits within {diff} of the F32 weights'");
            assert_eq!(argmax(a), argmax(b), "step {step}: another token");
            assert!(diff < LOGIT_TOLERANCE, "step {step}: logits {diff} apart");
        }
    }

    /// How far the quantized arithmetic's logits may stray from the F32
    /// weights' here, the most over the whole vocabulary (they span about
    /// 30; measured: up to 1.3).
    const LOGIT_TOLERANCE: f32 = 2.0;
}
