use crate::SlotId;

/// Everything a pool call can fail with. `Corrupt` is its own kind: the
/// caller turns it into a miss (and drops the block), never into data.
#[derive(Debug, thiserror::Error)]
pub enum TierError {
    /// No free slot: the caller evicts, then retries.
    #[error("no free slot")]
    Full,
    /// The stored block failed its checksum or header check.
    #[error("block in slot {0:?} is corrupt")]
    Corrupt(SlotId),
    /// The slot holds no readable block (free, or still being written).
    #[error("slot {0:?} holds no readable block")]
    Empty(SlotId),
    /// The slot number is outside the pool.
    #[error("slot {slot:?} is outside the pool of {capacity} slots")]
    NoSuchSlot { slot: SlotId, capacity: u32 },
    #[error("buffer of {got} bytes, blocks are {expected}")]
    WrongLength { got: usize, expected: usize },
    #[error("metadata of {got} bytes exceeds the pool's limit of {limit}")]
    MetaTooLarge { got: usize, limit: usize },
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("device error: {0}")]
    Device(String),
}

pub type Result<T, E = TierError> = std::result::Result<T, E>;
