//! Mooncake-format traces: one JSON object per line with `timestamp` (ms),
//! `input_length`, `output_length` and `hash_ids` (one id per block; an id
//! always has the same parent, so the ids of all requests form a prefix tree).

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader};
use std::path::Path;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
pub struct TraceRequest {
    #[serde(default)]
    pub timestamp: u64,
    #[serde(default)]
    pub input_length: u64,
    #[serde(default)]
    pub output_length: u64,
    pub hash_ids: Vec<u64>,
}

/// A whole trace in memory.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    pub requests: Vec<TraceRequest>,
}

impl Trace {
    pub fn load(path: &Path) -> Result<Trace> {
        let file = std::fs::File::open(path)
            .with_context(|| format!("opening trace {}", path.display()))?;
        let mut requests = Vec::new();
        for (i, line) in BufReader::new(file).lines().enumerate() {
            let line =
                line.with_context(|| format!("reading {} line {}", path.display(), i + 1))?;
            if line.trim().is_empty() {
                continue;
            }
            let req: TraceRequest = serde_json::from_str(&line).with_context(|| {
                format!(
                    "{} line {}: not a Mooncake trace record",
                    path.display(),
                    i + 1
                )
            })?;
            requests.push(req);
        }
        if requests.is_empty() {
            bail!("trace {} has no requests", path.display());
        }
        Ok(Trace { requests })
    }

    pub fn total_blocks(&self) -> usize {
        self.requests.iter().map(|r| r.hash_ids.len()).sum()
    }

    pub fn distinct_blocks(&self) -> usize {
        let mut ids: Vec<u64> = self
            .requests
            .iter()
            .flat_map(|r| r.hash_ids.iter().copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// The requests as token sequences for an index with one-token pages:
    /// each block id becomes one token. Ids must fit in `u32`.
    pub fn as_tokens(&self) -> Result<Vec<Vec<u32>>> {
        self.requests
            .iter()
            .map(|r| {
                r.hash_ids
                    .iter()
                    .map(|&id| u32::try_from(id).context("block id does not fit in u32"))
                    .collect()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let dir = std::env::temp_dir().join(format!("radixkv-trace-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let good = dir.join("good.jsonl");
        std::fs::write(&good, "{\"timestamp\": 0, \"input_length\": 1024, \"output_length\": 3, \"hash_ids\": [0, 1]}\n\n{\"hash_ids\": [0, 2]}\n").unwrap();
        let t = Trace::load(&good).unwrap();
        assert_eq!(t.requests.len(), 2);
        assert_eq!(t.total_blocks(), 4);
        assert_eq!(t.distinct_blocks(), 3);
        let bad = dir.join("bad.jsonl");
        std::fs::write(&bad, "{\"hash_ids\": [0, \"x\"]}\n").unwrap();
        let err = Trace::load(&bad).unwrap_err();
        assert!(format!("{err:#}").contains("line 1"), "{err:#}");
    }
}
