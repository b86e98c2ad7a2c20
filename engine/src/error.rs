use cache_server::CacheError;
use std::path::PathBuf;

/// Errors of the engine. Cache trouble during generation is not one of
/// them: a failed lookup computes the prompt cold and a failed store is
/// counted, since the cache only ever saves work.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model file is missing; `scripts/fetch-model` fetches it.
    #[error("model file {0} not found; run scripts/fetch-model")]
    ModelNotFound(PathBuf),
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The GGUF file is malformed or not a model this engine runs.
    #[error("model file: {0}")]
    Model(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is outside the vocabulary of {vocab}")]
    TokenOutOfVocab { id: u32, vocab: usize },
    /// Prompt plus requested output exceed the model's context.
    #[error("{requested} tokens (prompt and output) exceed the context of {context}")]
    ContextTooLong { requested: usize, context: usize },
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A cached page that the sequence holds a lease on could not be read
    /// (its lease ran out, or the block failed its checksum).
    #[error("cached KV page {page} is no longer readable")]
    KvLost { page: usize },
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A radixkv server could not be reached or refused a call.
    #[error("cache server: {0}")]
    Remote(String),
}

impl From<candle_core::Error> for EngineError {
    fn from(e: candle_core::Error) -> Self {
        EngineError::Model(e.to_string())
    }
}

pub type Result<T, E = EngineError> = std::result::Result<T, E>;
