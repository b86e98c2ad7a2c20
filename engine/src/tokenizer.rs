//! The tokenizer, built from the GGUF's own tables: byte-level BPE over the
//! file's tokens and merges, with the `smollm` pre-tokenizer (every digit
//! its own piece, then GPT-2's byte-level split) and the control tokens
//! (`<|im_start|>`, `<|im_end|>`, ...) recognised in text. No BOS is added.
//!
//! candle's GGUF tokenizer converter gets this model wrong (it adds a
//! leading space), hence this one.

use crate::error::{EngineError, Result};
use crate::gguf::GgufFile;
use tokenizers::models::bpe::BPE;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::{AddedToken, PreTokenizerWrapper};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// Text to token ids and back.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab: usize,
    bos: Option<u32>,
    eos: Option<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.vocab)
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish()
    }
}

fn err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

impl Tokenizer {
    pub(crate) fn from_gguf(file: &GgufFile) -> Result<Self> {
        let model = file.string("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(err(format!(
                "tokenizer model {model:?}; only gpt2 (byte-level BPE) is supported"
            )));
        }
        let pre = file.string("tokenizer.ggml.pre").unwrap_or("default");
        if pre != "smollm" {
            return Err(err(format!(
                "pre-tokenizer {pre:?}; only smollm is supported"
            )));
        }
        let tokens = file.strings("tokenizer.ggml.tokens")?;
        let types = file.ints("tokenizer.ggml.token_type")?;
        if types.len() != tokens.len() {
            return Err(err("token and token-type tables differ in length"));
        }
        let merges = file
            .strings("tokenizer.ggml.merges")?
            .into_iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| err(format!("malformed merge {m:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let vocab: tokenizers::models::bpe::Vocab = tokens
            .iter()
            .enumerate()
            .map(|(i, t)| ((*t).to_owned(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        let pre_tokenizer = Sequence::new(vec![
            PreTokenizerWrapper::Digits(Digits::new(true)),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true)),
        ]);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevel::default()));
        let special: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, t)| matches!(**t, TOKEN_TYPE_CONTROL | TOKEN_TYPE_USER_DEFINED))
            .map(|(tok, _)| AddedToken::from(*tok, true))
            .collect();
        inner.add_special_tokens(special).map_err(err)?;
        let id = |key: &str| file.u32(key).ok().filter(|&i| (i as usize) < tokens.len());
        Ok(Self {
            inner,
            vocab: tokens.len(),
            bos: id("tokenizer.ggml.bos_token_id"),
            eos: id("tokenizer.ggml.eos_token_id"),
        })
    }

    /// Token ids of `text`; special tokens written in the text are parsed
    /// as such. No BOS is added (the chat template writes `<|im_start|>`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode_fast(text, false)
            .map_err(err)?
            .get_ids()
            .to_vec())
    }

    /// The text of `ids`, special tokens included.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(EngineError::TokenOutOfVocab {
                id,
                vocab: self.vocab,
            });
        }
        self.inner.decode(ids, false).map_err(err)
    }

    /// The text of one token (for streaming: bytes of a character split
    /// across tokens come out as U+FFFD; use [`Tokenizer::decode`] on the
    /// whole run for exact text).
    pub fn token_text(&self, id: u32) -> Result<String> {
        self.decode(&[id])
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab
    }

    /// Beginning of sequence (`<|im_start|>` for SmolLM2).
    pub fn bos(&self) -> Option<u32> {
        self.bos
    }

    /// End of sequence (`<|im_end|>` for SmolLM2): greedy generation stops here.
    pub fn eos(&self) -> Option<u32> {
        self.eos
    }
}
