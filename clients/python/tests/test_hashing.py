"""Page hashes computed client-side: pinned vectors (checked against the
Rust implementation) and the chaining rules."""

import struct

import pytest
import xxhash

from radixkv.hashing import ZERO_HASH, chain, namespace_key, namespace_seed, page_hashes


def xxh3_128_le(data: bytes) -> bytes:
    return xxhash.xxh3_128_intdigest(data).to_bytes(16, "little")


def test_reference_vector_from_the_rust_tests():
    # chain(PageHash(0), [1]) = xxh3_128(16 zero bytes ++ 1u32 LE), as 16 LE bytes.
    expected = xxh3_128_le(bytes(16) + (1).to_bytes(4, "little"))
    assert chain(ZERO_HASH, [1]) == expected
    # The same value as printed by radix-tree's PageHash(0).chain(&[1]).to_le_bytes().
    assert expected.hex() == "93fe5895577c01362b23888a4586f0d5"


def test_namespace_seed_and_chain_match_rust():
    # Values computed with the Rust xxhash-rust crate the server uses.
    assert namespace_key("alice", "m", "layout", "") == (
        struct.pack("<I", 5) + b"alice" + struct.pack("<I", 1) + b"m" + struct.pack("<I", 6) + b"layout" + struct.pack("<I", 0)
    )
    seed = namespace_seed("alice", "m", "layout", "")
    assert seed.hex() == "26d4fca12f1b841990e51f5a1ab2bd28"
    tokens = [i * 7 + 3 for i in range(40)]
    assert [h.hex() for h in page_hashes(seed, tokens, 16)] == [
        "169dc5a499cf9358532aa81e4e67e4e9",
        "0a583d89f8ea663f2ca6bb619ac9b3d4",
    ]


def test_page_hashes_chain_page_by_page_and_ignore_the_tail():
    seed = namespace_seed("t", "model", "layout", "lora-1")
    tokens = list(range(1000, 1000 + 4 * 8 + 5))
    hashes = page_hashes(seed, tokens, 8)
    assert len(hashes) == 4  # the 5-token tail is not a page
    prev = seed
    for i, h in enumerate(hashes):
        assert len(h) == 16
        assert h == chain(prev, tokens[i * 8 : (i + 1) * 8])
        prev = h
    # A prompt's pages are named the same whatever follows them.
    assert page_hashes(seed, tokens[:16], 8) == hashes[:2]
    assert page_hashes(seed, tokens[:7], 8) == []
    assert page_hashes(seed, [], 8) == []


def test_hashes_depend_on_order_namespace_and_parent():
    seed = namespace_seed("a", "m", "l")
    assert chain(seed, [1, 2, 3]) != chain(seed, [3, 2, 1])
    assert chain(seed, [1, 2, 3]) != chain(namespace_seed("b", "m", "l"), [1, 2, 3])
    # Length-prefixed fields: moving a byte between fields changes the seed.
    assert namespace_seed("ab", "c", "l") != namespace_seed("a", "bc", "l")
    # Tokens are full u32s.
    assert chain(seed, [0xFFFF_FFFF]) == xxh3_128_le(seed + b"\xff\xff\xff\xff")


@pytest.mark.parametrize("tokens", [[-1], [2**32], [1.5], ["a"]])
def test_tokens_outside_u32_are_refused(tokens):
    with pytest.raises(ValueError):
        page_hashes(ZERO_HASH, tokens, 1)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        page_hashes(b"short", [1], 1)
    with pytest.raises(ValueError):
        page_hashes(ZERO_HASH, [1], 0)
    with pytest.raises(ValueError):
        chain(b"\0" * 17, [1])
