//! Reading the model file: hyperparameters and tokenizer tables from the
//! GGUF metadata, and weights, raw or dequantized to F32 (candle's GGUF
//! reader and dequantizers).

use crate::error::{EngineError, Result};
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::Device;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

/// Hyperparameters of a llama-architecture model.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub layers: usize,
    pub hidden: usize,
    pub ffn: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub vocab: usize,
    pub context: usize,
    pub rope_base: f32,
    pub rms_eps: f32,
}

impl ModelConfig {
    /// The geometry of the model file at `path`, without loading its
    /// weights.
    pub fn read(path: &Path) -> Result<ModelConfig> {
        GgufFile::open(path)?.config()
    }

    /// Query heads that share one KV head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    fn check(&self) -> Result<()> {
        let bad = |what: &str| Err(EngineError::Model(format!("unsupported model: {what}")));
        if [
            self.layers,
            self.hidden,
            self.ffn,
            self.heads,
            self.kv_heads,
            self.vocab,
        ]
        .contains(&0)
        {
            return bad("a zero dimension");
        }
        if !self.hidden.is_multiple_of(self.heads) || !self.heads.is_multiple_of(self.kv_heads) {
            return bad("heads do not divide the hidden size or each other");
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad("odd head dimension");
        }
        Ok(())
    }
}

/// The default model: `<repo>/models/SmolLM2-135M-Instruct.Q4_1.gguf`, or
/// the file named by `RADIXKV_MODEL`.
pub fn default_model_path() -> PathBuf {
    if let Some(p) = std::env::var_os("RADIXKV_MODEL") {
        return PathBuf::from(p);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."))
        .join("models")
        .join("SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// An open GGUF file: its metadata, and its tensors on demand.
pub(crate) struct GgufFile {
    path: PathBuf,
    content: Content,
    reader: BufReader<File>,
    /// XXH3-64 of the whole file: part of the model id, so KV blocks of
    /// different weights never share a namespace.
    pub digest: u64,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .finish()
    }
}

impl GgufFile {
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| EngineError::Io {
            path: path.to_owned(),
            source,
        };
        if !path.exists() {
            return Err(EngineError::ModelNotFound(path.to_owned()));
        }
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        let mut file = File::open(path).map_err(io)?;
        let mut buf = vec![0; 1 << 20];
        loop {
            let n = file.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        let mut reader = BufReader::new(File::open(path).map_err(io)?);
        let content = Content::read(&mut reader)?;
        Ok(Self {
            path: path.to_owned(),
            content,
            reader,
            digest: hasher.digest(),
        })
    }

    fn get(&self, key: &str) -> Result<&Value> {
        self.content
            .metadata
            .get(key)
            .ok_or_else(|| EngineError::Model(format!("metadata key {key} is missing")))
    }

    pub fn u32(&self, key: &str) -> Result<u32> {
        Ok(self.get(key)?.to_u32()?)
    }

    fn f32(&self, key: &str) -> Result<f32> {
        Ok(self.get(key)?.to_f32()?)
    }

    pub fn string(&self, key: &str) -> Result<&str> {
        Ok(self.get(key)?.to_string()?.as_str())
    }

    /// A metadata array of strings.
    pub fn strings(&self, key: &str) -> Result<Vec<&str>> {
        self.get(key)?
            .to_vec()?
            .iter()
            .map(|v| Ok(v.to_string()?.as_str()))
            .collect()
    }

    /// A metadata array of integers.
    pub fn ints(&self, key: &str) -> Result<Vec<i64>> {
        self.get(key)?
            .to_vec()?
            .iter()
            .map(|v| match v {
                Value::I32(x) => Ok(i64::from(*x)),
                Value::U32(x) => Ok(i64::from(*x)),
                Value::I64(x) => Ok(*x),
                Value::U8(x) => Ok(i64::from(*x)),
                Value::I8(x) => Ok(i64::from(*x)),
                other => Err(EngineError::Model(format!(
                    "{key}: an integer array holds {:?}",
                    other.value_type()
                ))),
            })
            .collect()
    }

    /// The hyperparameters of a llama-architecture model.
    pub fn config(&self) -> Result<ModelConfig> {
        let arch = self.string("general.architecture")?;
        if arch != "llama" {
            return Err(EngineError::Model(format!(
                "architecture {arch:?}; this engine runs llama"
            )));
        }
        let hidden = self.u32("llama.embedding_length")? as usize;
        let heads = self.u32("llama.attention.head_count")? as usize;
        let vocab = match self.u32("llama.vocab_size") {
            Ok(v) => v as usize,
            Err(_) => self.strings("tokenizer.ggml.tokens")?.len(),
        };
        let config = ModelConfig {
            layers: self.u32("llama.block_count")? as usize,
            hidden,
            ffn: self.u32("llama.feed_forward_length")? as usize,
            heads,
            kv_heads: self.u32("llama.attention.head_count_kv")? as usize,
            head_dim: hidden / heads.max(1),
            vocab,
            context: self.u32("llama.context_length")? as usize,
            rope_base: self.f32("llama.rope.freq_base").unwrap_or(10_000.0),
            rms_eps: self.f32("llama.attention.layer_norm_rms_epsilon")?,
        };
        config.check()?;
        if let Ok(rope_dims) = self.u32("llama.rope.dimension_count") {
            if rope_dims as usize != config.head_dim {
                return Err(EngineError::Model(
                    "partial rotary embeddings are not supported".into(),
                ));
            }
        }
        Ok(config)
    }

    pub fn has_tensor(&self, name: &str) -> bool {
        self.content.tensor_infos.contains_key(name)
    }

    /// A tensor dequantized to F32, row-major, checked against `shape`
    /// (rows, columns: GGUF lists dimensions innermost first, so a weight
    /// of shape `[out, in]` is listed `[in, out]`).
    pub fn tensor(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.qtensor(name, shape)?;
        Ok(t.dequantize(&Device::Cpu)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }

    /// A tensor as the file stores it: its type and its raw blocks
    /// (row-major, checked against `shape` as for [`GgufFile::tensor`]).
    pub fn raw_tensor(&mut self, name: &str, shape: &[usize]) -> Result<(GgmlDType, Vec<u8>)> {
        let t = self.qtensor(name, shape)?;
        Ok((t.dtype(), t.data()?.into_owned()))
    }

    fn qtensor(&mut self, name: &str, shape: &[usize]) -> Result<QTensor> {
        let t = self
            .content
            .tensor(&mut self.reader, name, &Device::Cpu)
            .map_err(|e| EngineError::Model(format!("tensor {name}: {e}")))?;
        if t.shape().dims() != shape {
            return Err(EngineError::Model(format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                t.shape().dims()
            )));
        }
        Ok(t)
    }
}
