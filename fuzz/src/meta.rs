//! `meta_decode`: the block metadata record (`cache_server::meta`), which
//! comes back from disk (slot trailers and the journal) after a restart.
//!
//! - `decode` never panics;
//! - a record that decodes re-encodes to the very same bytes (one record,
//!   one encoding: the format has no slack a corrupted record could hide in);
//! - encode → decode gives back what was encoded, for a record built from
//!   the input, and the encoding fits `max_len`.

use crate::Input;
use cache_server::meta::{decode, encode, max_len};
use radix_tree::{NamespaceKey, PageHash};

pub fn run(data: &[u8]) {
    let mut buf = Vec::new();
    if let Ok(m) = decode(data) {
        encode(&m.namespace.to_bytes(), m.parent, &m.tokens, &mut buf);
        assert!(
            buf == data,
            "meta::decode accepted bytes that meta::encode does not produce:\n  input     {data:02x?}\n  decoded   {m:?}\n  re-encoded {buf:02x?}"
        );
        assert!(buf.len() <= max_len(&m.namespace, m.tokens.len()));
    }

    // Encode → decode for a record built from the input.
    let mut u = Input::new(data);
    let mut field = || {
        let n = usize::from(u.byte() % 24);
        String::from_utf8_lossy(u.bytes(n)).into_owned()
    };
    let key = NamespaceKey::new(field(), field(), field(), field());
    let parent = match u.byte() % 3 {
        0 => None,
        _ => Some(PageHash(u128::from(u.u64()) << 64 | u128::from(u.u64()))),
    };
    let count = usize::from(u.byte() % 20);
    let tokens: Vec<u32> = (0..count).map(|_| u.u32()).collect();
    encode(&key.to_bytes(), parent, &tokens, &mut buf);
    assert!(buf.len() <= max_len(&key, tokens.len()));
    let m = decode(&buf).expect("an encoded record decodes");
    assert_eq!((m.namespace, m.parent, m.tokens), (key, parent, tokens));
    // Every strict prefix of a record is an error, never a shorter record.
    for cut in [0, 1, buf.len() / 2, buf.len() - 1] {
        assert!(decode(&buf[..cut]).is_err(), "a {cut}-byte prefix decoded");
    }
}

pub fn seeds() -> Vec<Vec<u8>> {
    let key = NamespaceKey::new("tenant-a", "smollm2-135m", "layout-0123abcd", "");
    let lora = NamespaceKey::new("t", "m", "l", "lora-7");
    let mut out = Vec::new();
    for (key, parent, tokens) in [
        (&key, None, (0..16).collect::<Vec<u32>>()),
        (
            &key,
            Some(PageHash(0x0123_4567_89ab_cdef_fedc_ba98_7654_3210)),
            (16..32).collect(),
        ),
        (&lora, Some(PageHash(7)), vec![1, 2, 3, 4]),
        (&lora, None, vec![]),
        (&NamespaceKey::default(), None, vec![u32::MAX]),
    ] {
        let mut buf = Vec::new();
        encode(&key.to_bytes(), parent, &tokens, &mut buf);
        out.push(buf);
    }
    out
}
