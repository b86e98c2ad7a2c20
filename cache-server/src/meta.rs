//! The metadata record each stored block carries down to the tiers: enough
//! to put the page back into the index after a restart (its namespace, its
//! parent page and its tokens), while the tiers keep treating it as bytes.
//!
//! Layout (little-endian): version `u8` = 1; namespace key as four
//! length-prefixed (`u32`) UTF-8 fields; a flag `u8` (1 = has a parent)
//! followed by the parent's 16-byte hash if set; token count `u32`; tokens.

use radix_tree::{NamespaceKey, PageHash};

const VERSION: u8 = 1;

/// A decoded metadata record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMeta {
    pub namespace: NamespaceKey,
    pub parent: Option<PageHash>,
    pub tokens: Vec<u32>,
}

/// Why a record could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("metadata record is truncated")]
    Truncated,
    #[error("metadata version {0} is not supported")]
    Version(u8),
    #[error("metadata field is not UTF-8")]
    NotUtf8,
    #[error("metadata has {0} trailing bytes")]
    Trailing(usize),
    #[error("metadata parent flag {0} is neither 0 nor 1")]
    ParentFlag(u8),
}

/// Bytes a record for this key and page size needs at most.
pub fn max_len(key: &NamespaceKey, page_size: usize) -> usize {
    1 + key.to_bytes().len() + 1 + 16 + 4 + 4 * page_size
}

pub fn encode(key_bytes: &[u8], parent: Option<PageHash>, tokens: &[u32], out: &mut Vec<u8>) {
    out.clear();
    out.push(VERSION);
    out.extend_from_slice(key_bytes);
    match parent {
        Some(p) => {
            out.push(1);
            out.extend_from_slice(&p.to_le_bytes());
        }
        None => out.push(0),
    }
    out.extend_from_slice(&(tokens.len() as u32).to_le_bytes());
    for t in tokens {
        out.extend_from_slice(&t.to_le_bytes());
    }
}

/// Decodes a record; never panics, whatever the bytes.
pub fn decode(bytes: &[u8]) -> Result<BlockMeta, MetaError> {
    let mut r = Reader(bytes);
    let version = r.u8()?;
    if version != VERSION {
        return Err(MetaError::Version(version));
    }
    let mut field = || -> Result<String, MetaError> {
        let len = r.u32()? as usize;
        String::from_utf8(r.take(len)?.to_vec()).map_err(|_| MetaError::NotUtf8)
    };
    let namespace = NamespaceKey::new(field()?, field()?, field()?, field()?);
    let parent = match r.u8()? {
        0 => None,
        1 => Some(PageHash::from_le_bytes(
            r.take(16)?.try_into().expect("16 bytes"),
        )),
        flag => return Err(MetaError::ParentFlag(flag)),
    };
    let count = r.u32()? as usize;
    let raw = r.take(count.checked_mul(4).ok_or(MetaError::Truncated)?)?;
    let tokens = raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes")))
        .collect();
    if !r.0.is_empty() {
        return Err(MetaError::Trailing(r.0.len()));
    }
    Ok(BlockMeta {
        namespace,
        parent,
        tokens,
    })
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MetaError> {
        if self.0.len() < n {
            return Err(MetaError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, MetaError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, MetaError> {
        Ok(u32::from_le_bytes(
            self.take(4)?.try_into().expect("4 bytes"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_garbage() {
        let key = NamespaceKey::new("tenant", "model", "layout", "lora");
        let mut buf = Vec::new();
        encode(&key.to_bytes(), Some(PageHash(7)), &[1, 2, 3], &mut buf);
        assert!(buf.len() <= max_len(&key, 3));
        let m = decode(&buf).unwrap();
        assert_eq!(
            (m.namespace, m.parent, m.tokens),
            (key.clone(), Some(PageHash(7)), vec![1, 2, 3])
        );
        encode(&key.to_bytes(), None, &[], &mut buf);
        assert_eq!(decode(&buf).unwrap().parent, None);
        for cut in 0..buf.len() {
            assert!(
                decode(&buf[..cut]).is_err(),
                "prefix of {cut} bytes decoded"
            );
        }
        let mut extra = buf.clone();
        extra.push(0);
        assert_eq!(decode(&extra), Err(MetaError::Trailing(1)));
        assert_eq!(decode(&[9]), Err(MetaError::Version(9)));
        // Only 0 and 1 are parent flags (found by fuzzing: 2 decoded as 1).
        let mut bad_flag = vec![VERSION];
        bad_flag.extend_from_slice(&key.to_bytes());
        bad_flag.push(2);
        bad_flag.extend_from_slice(&[0; 20]);
        assert_eq!(decode(&bad_flag), Err(MetaError::ParentFlag(2)));
        // A huge token count fails cleanly instead of allocating.
        let mut huge = vec![VERSION];
        huge.extend_from_slice(&key.to_bytes());
        huge.push(0);
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&huge), Err(MetaError::Truncated));
    }
}
