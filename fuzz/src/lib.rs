//! radixkv's fuzz harnesses: one function per fuzz target, so that the
//! libFuzzer binaries under `fuzz_targets/` stay one line each, and so that
//! the seed generator (`examples/gen_corpus.rs`) and the replay test below
//! use the very same code.
//!
//! Each harness must never panic on any input, except where an assertion of
//! its own finds a bug in the crates (a round trip that does not hold, an
//! index invariant that breaks): that panic is the finding.
//!
//! Checksummed formats: a fuzzer almost never guesses an XXH3 checksum, so
//! the disk and shared-memory harnesses take a mode bit that recomputes the
//! checksums in the input before parsing it. With the bit clear the bytes
//! go to the parsers as they are.

pub mod disk;
pub mod grpc;
pub mod index_ops;
pub mod meta;
pub mod shm;

/// A cursor over the fuzz input: reads past the end give zeros, so every
/// input is a valid program.
#[derive(Debug, Clone)]
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Self { data }
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }

    pub fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }

    /// Everything left.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.data)
    }
}

/// A harness: runs one input.
pub type Harness = fn(&[u8]);

/// The fuzz targets, by name, with their harness (for the replay test and
/// the seed generator).
pub const TARGETS: &[(&str, Harness)] = &[
    ("meta_decode", meta::run),
    ("disk_headers", disk::run),
    ("shm_header", shm::run),
    ("index_ops", index_ops::run),
    ("grpc_requests", grpc::run),
];

/// Seed inputs for a target (valid inputs, made by the encoders).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "meta_decode" => meta::seeds(),
        "disk_headers" => disk::seeds(),
        "shm_header" => shm::seeds(),
        "index_ops" => index_ops::seeds(),
        "grpc_requests" => grpc::seeds(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    /// Runs every committed seed and regression input through its harness
    /// (what `scripts/fuzz` does with the libFuzzer binaries), without
    /// libFuzzer: `cargo test --manifest-path fuzz/Cargo.toml`.
    #[test]
    fn replay_corpus_and_regressions() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        for (name, run) in TARGETS {
            for dir in ["corpus", "regressions"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.unwrap().path();
                    if path.is_file() {
                        eprintln!("{name}: {}", path.display());
                        run(&std::fs::read(&path).unwrap());
                    }
                }
            }
        }
    }

    /// The generated seeds run clean (a harness or encoder change that
    /// breaks them shows here first).
    #[test]
    fn seeds_run_clean() {
        for (name, run) in TARGETS {
            let seeds = seeds(name);
            assert!(!seeds.is_empty(), "{name} has no seeds");
            for s in seeds {
                run(&s);
            }
        }
    }

    #[test]
    fn empty_and_short_inputs() {
        for (_, run) in TARGETS {
            for len in 0..80 {
                run(&vec![0u8; len]);
                run(&vec![0xffu8; len]);
            }
        }
    }
}
