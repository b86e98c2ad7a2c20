//! Capacities on the command line: token counts with SI suffixes
//! (`1M` = 10^6 tokens), turned into whole blocks.

use anyhow::{bail, Context, Result};

/// A capacity as given and in blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capacity {
    pub label: String,
    pub tokens: u64,
    pub blocks: u64,
}

pub fn parse_tokens(s: &str) -> Result<u64> {
    let s = s.trim();
    let (digits, mult) = match s.chars().last() {
        Some('k' | 'K') => (&s[..s.len() - 1], 1_000.0),
        Some('m' | 'M') => (&s[..s.len() - 1], 1_000_000.0),
        Some('g' | 'G') => (&s[..s.len() - 1], 1_000_000_000.0),
        _ => (s, 1.0),
    };
    let v: f64 = digits
        .parse()
        .with_context(|| format!("capacity {s:?} is not a number of tokens (like 3M)"))?;
    if !v.is_finite() || v <= 0.0 {
        bail!("capacity {s:?} must be above zero");
    }
    Ok((v * mult).round() as u64)
}

/// A tier's size as tokens (`3M`, SI suffixes) or as bytes of KV with a
/// `B` suffix (`512MB`, `64GB` decimal; `16GiB` binary), turned into tokens
/// at `kv_bytes_per_token`. `0` is zero (no tier).
pub fn parse_tokens_or_bytes(s: &str, kv_bytes_per_token: u64) -> Result<u64> {
    let s = s.trim();
    if s == "0" {
        return Ok(0);
    }
    let Some(rest) = s.strip_suffix('B') else {
        return parse_tokens(s);
    };
    if kv_bytes_per_token == 0 {
        bail!("a size in bytes needs the KV bytes per token");
    }
    let (digits, mult) = if let Some(r) = rest.strip_suffix('i') {
        match r.chars().last() {
            Some('K') => (&r[..r.len() - 1], 1024f64),
            Some('M') => (&r[..r.len() - 1], 1024f64.powi(2)),
            Some('G') => (&r[..r.len() - 1], 1024f64.powi(3)),
            Some('T') => (&r[..r.len() - 1], 1024f64.powi(4)),
            _ => bail!("size {s:?}: use KiB, MiB, GiB or TiB"),
        }
    } else {
        match rest.chars().last() {
            Some('k' | 'K') => (&rest[..rest.len() - 1], 1e3),
            Some('M') => (&rest[..rest.len() - 1], 1e6),
            Some('G') => (&rest[..rest.len() - 1], 1e9),
            Some('T') => (&rest[..rest.len() - 1], 1e12),
            _ => (rest, 1.0),
        }
    };
    let v: f64 = digits
        .trim()
        .parse()
        .with_context(|| format!("size {s:?} is not a number of bytes (like 64GB)"))?;
    if !v.is_finite() || v < 0.0 {
        bail!("size {s:?} must not be negative");
    }
    Ok((v * mult / kv_bytes_per_token as f64).floor() as u64)
}

/// Parses `1M,3M,10M` into capacities of `block_tokens`-token blocks.
pub fn parse_list(list: &str, block_tokens: u64) -> Result<Vec<Capacity>> {
    if block_tokens == 0 {
        bail!("block size must be above zero tokens");
    }
    list.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            let tokens = parse_tokens(s)?;
            let blocks = tokens / block_tokens;
            if blocks == 0 {
                bail!("capacity {s} holds less than one {block_tokens}-token block");
            }
            Ok(Capacity {
                label: s.trim().to_string(),
                tokens,
                blocks,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_si_tokens_into_blocks() {
        let caps = parse_list("1M,3M,10M", 512).unwrap();
        assert_eq!(
            caps.iter().map(|c| c.blocks).collect::<Vec<_>>(),
            vec![1953, 5859, 19531]
        );
        assert_eq!(parse_tokens("2.5k").unwrap(), 2500);
        assert!(parse_tokens("0").is_err());
        assert!(parse_tokens("x").is_err());
        assert!(parse_list("100", 512).is_err());
        assert_eq!(parse_tokens_or_bytes("0", 1).unwrap(), 0);
        assert_eq!(parse_tokens_or_bytes("2M", 1).unwrap(), 2_000_000);
        assert_eq!(parse_tokens_or_bytes("1GiB", 1 << 17).unwrap(), 8192);
        assert_eq!(parse_tokens_or_bytes("1.31072GB", 131_072).unwrap(), 10_000);
        assert_eq!(parse_tokens_or_bytes("4096B", 1024).unwrap(), 4);
        assert!(parse_tokens_or_bytes("1XiB", 1).is_err());
    }
}
