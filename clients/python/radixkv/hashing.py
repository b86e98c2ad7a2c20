"""Chained page hashes, computed exactly as the server names pages.

The algorithm (see ``proto/proto/radixkv/v1/cache.proto``):

- namespace seed = XXH3-128 (seed 0) of the namespace key bytes: the four
  fields (tenant, model, layout, adapter), each as a u32 little-endian length
  followed by its UTF-8 bytes;
- page hash ``i`` = XXH3-128 (seed 0) of the previous page's hash (the
  namespace seed for page 0) as 16 little-endian bytes, followed by the
  page's tokens, each a u32 little-endian.

Hashes are ``bytes`` of length 16, little-endian (low 64 bits first), as on
the wire. ``Client.info()`` returns the caller's namespace seed, so a client
only needs :func:`page_hashes` (or :func:`chain`) to name its pages.
"""

from __future__ import annotations

import struct
from typing import List, Sequence

import xxhash

__all__ = ["HASH_BYTES", "ZERO_HASH", "chain", "namespace_key", "namespace_seed", "page_hashes"]

#: Length of a page hash (and of a namespace seed) in bytes.
HASH_BYTES = 16
#: The all-zero hash (``PageHash(0)`` on the server side).
ZERO_HASH = bytes(HASH_BYTES)

_U32_MAX = 0xFFFF_FFFF


def _xxh3_128_le(data: bytes) -> bytes:
    return xxhash.xxh3_128_intdigest(data).to_bytes(HASH_BYTES, "little")


def _tokens_le(tokens: Sequence[int]) -> bytes:
    try:
        return struct.pack(f"<{len(tokens)}I", *tokens)
    except struct.error as e:
        bad = next((t for t in tokens if not isinstance(t, int) or not 0 <= t <= _U32_MAX), None)
        raise ValueError(f"tokens must be integers in 0..2**32-1 (got {bad!r})") from e


def _check_hash(h: bytes, what: str) -> bytes:
    h = bytes(h)
    if len(h) != HASH_BYTES:
        raise ValueError(f"{what} must be {HASH_BYTES} bytes, got {len(h)}")
    return h


def chain(parent: bytes, tokens: Sequence[int]) -> bytes:
    """The hash of the page ``tokens`` whose parent page hash (or namespace
    seed, for a first page) is ``parent``."""
    return _xxh3_128_le(_check_hash(parent, "parent") + _tokens_le(tokens))


def page_hashes(seed: bytes, tokens: Sequence[int], page_size: int) -> List[bytes]:
    """The hash of every whole page of ``tokens`` (a partial tail is ignored,
    as the server ignores it), chained from the namespace ``seed``.

    ``seed`` is ``Info.namespace_seed`` (16 bytes); ``page_size`` is
    ``Info.page_size``. Returns one 16-byte hash per whole page, in order.
    """
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    prev = _check_hash(seed, "seed")
    data = _tokens_le(tokens)
    step = 4 * page_size
    out: List[bytes] = []
    for start in range(0, (len(tokens) // page_size) * step, step):
        prev = _xxh3_128_le(prev + data[start : start + step])
        out.append(prev)
    return out


def namespace_key(tenant: str, model: str, layout: str, adapter: str = "") -> bytes:
    """The namespace key bytes: each field as a u32 LE length + UTF-8 bytes."""
    out = bytearray()
    for field in (tenant, model, layout, adapter):
        raw = field.encode("utf-8")
        out += struct.pack("<I", len(raw)) + raw
    return bytes(out)


def namespace_seed(tenant: str, model: str, layout: str, adapter: str = "") -> bytes:
    """The namespace seed of (tenant, model, layout, adapter). A client
    normally takes it from ``Client.info()`` instead."""
    return _xxh3_128_le(namespace_key(tenant, model, layout, adapter))
