"""Plain Python values the client returns (and a few it takes)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import List, Sequence

__all__ = [
    "Tier",
    "EventKind",
    "Info",
    "Lookup",
    "Block",
    "ShmLocations",
    "ShmReservation",
    "StoreResult",
    "SetPage",
    "SetResult",
    "Pin",
    "TierStats",
    "Stats",
    "Event",
    "EventBatch",
    "Health",
    "ClusterStats",
]


class Tier(enum.IntEnum):
    """Where a page's fastest copy sits (``radixkv.v1.Tier``)."""

    UNSPECIFIED = 0
    DEVICE = 1
    HOST = 2
    DISK = 3


class EventKind(enum.IntEnum):
    """``radixkv.v1.Event.Kind``."""

    UNSPECIFIED = 0
    STORED = 1
    REMOVED = 2
    CLEARED = 3


def _tier(v: int) -> Tier:
    try:
        return Tier(v)
    except ValueError:
        return Tier.UNSPECIFIED


@dataclass(frozen=True)
class Info:
    """The server's block geometry, its shared-memory file, and the caller's
    namespace seed for one (model, adapter)."""

    page_size: int
    block_bytes: int
    layout: str
    #: Empty when the host tier is not in shared memory or this tenant may
    #: not map it.
    shm_path: str
    shm_slot_stride: int
    #: 16 bytes: the first page's hash chains from it (see :mod:`radixkv.hashing`).
    namespace_seed: bytes
    max_tokens_per_call: int
    max_message_bytes: int
    tenant: str


@dataclass(frozen=True)
class Lookup:
    """The longest cached prefix of a prompt."""

    #: Whole pages cached from the start (the leased ones if a lease was asked).
    pages: int
    tokens: int
    #: The fastest tier of each page.
    tiers: List[Tier]
    device_pages: int
    host_pages: int
    disk_pages: int
    #: Each page's 16-byte hash.
    hashes: List[bytes]
    #: 0 when no lease was taken.
    lease_id: int
    lease_expires_ms: int

    @property
    def leased(self) -> bool:
        return self.lease_id != 0


@dataclass(frozen=True)
class Block:
    """One page's KV block."""

    page: int
    hash: bytes
    tier: Tier
    data: bytes


@dataclass(frozen=True)
class ShmLocations:
    """Where each leased block sits in the shared-memory file."""

    shm_path: str
    offsets: List[int]
    block_bytes: int


@dataclass(frozen=True)
class ShmReservation:
    """Reserved host slots to write in place, then commit."""

    reservation_id: int
    shm_path: str
    offsets: List[int]
    block_bytes: int


@dataclass(frozen=True)
class StoreResult:
    #: Leading pages that were cached already.
    cached_pages: int
    stored_pages: int


@dataclass(frozen=True)
class SetPage:
    """One page for :meth:`Client.set`: its hash, its parent's (``b""`` for a
    first page), its tokens (the server checks that they chain to the hash)
    and its whole block."""

    hash: bytes
    parent: bytes
    tokens: Sequence[int]
    data: bytes


@dataclass(frozen=True)
class SetResult:
    stored_pages: int
    cached_pages: int


@dataclass(frozen=True)
class Pin:
    #: Shares the lease id space: ``renew`` and ``unpin`` take it.
    pin_id: int
    pages: int
    expires_ms: int


@dataclass(frozen=True)
class TierStats:
    tier: Tier
    pages: int
    hit_tokens: int


@dataclass(frozen=True)
class Stats:
    """One tenant's statistics."""

    tenant: str
    lookups: int
    lookup_tokens: int
    hit_tokens: int
    tiers: List[TierStats]
    pages: int
    pinned_pages: int
    leases: int
    quota_pages: int


@dataclass(frozen=True)
class Event:
    seq: int
    kind: EventKind
    model: str
    adapter: str
    hash: bytes
    parent: bytes
    tier: Tier


@dataclass(frozen=True)
class EventBatch:
    #: True for the batches of the snapshot sent on subscribe.
    snapshot: bool
    events: List[Event]
    #: Events missed by reading too slowly (the stream then ends).
    lagged: int
    seq: int


@dataclass(frozen=True)
class Health:
    serving: bool
    version: str


@dataclass(frozen=True)
class ClusterStats:
    tenants: List[Stats] = field(default_factory=list)
    namespaces: int = 0
    pages: int = 0
    tiers: List[TierStats] = field(default_factory=list)
    corrupt_blocks: int = 0
    io_errors: int = 0
    demotions: int = 0
    promotions: int = 0
    index_memory_bytes: int = 0
