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
    }
}
