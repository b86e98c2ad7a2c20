"""Python client for radixkv, the prefix-sharing KV-cache sidecar.

- :class:`Client`: every call of the ``radixkv.v1.Cache`` service (and the
  ``Admin`` one) with plain Python types; failures raise
  :class:`RadixKvError` subclasses carrying the gRPC status code.
- :mod:`radixkv.hashing`: the chained page hashes the server names pages by.
- :mod:`radixkv.shm`: maps the server's shared-memory host tier for
  zero-copy loads and in-place stores.
- :class:`LocalClient` (:mod:`radixkv.local`): Lookup, Release, Renew and
  Health over the server's local socket, without HTTP/2.

Set up with ``scripts/python-client`` (it generates the gRPC stubs).
"""

from . import errors, hashing, local, shm
from .client import Client, EventStream
from .local import LocalClient
from .errors import *  # noqa: F403
from .errors import RadixKvError
from .hashing import chain, namespace_seed, page_hashes
from .shm import SharedMemory, ShmFormatError, ShmHeader
from .types import *  # noqa: F403
from .types import (
    Block,
    ClusterStats,
    Event,
    EventBatch,
    EventKind,
    Health,
    Info,
    Lookup,
    Pin,
    SetPage,
    SetResult,
    ShmLocations,
    ShmReservation,
    Stats,
    StoreResult,
    Tier,
    TierStats,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "EventStream",
    "LocalClient",
    "RadixKvError",
    "SharedMemory",
    "ShmFormatError",
    "ShmHeader",
    "chain",
    "namespace_seed",
    "page_hashes",
    "errors",
    "hashing",
    "local",
    "shm",
    "Block",
    "ClusterStats",
    "Event",
    "EventBatch",
    "EventKind",
    "Health",
    "Info",
    "Lookup",
    "Pin",
    "SetPage",
    "SetResult",
    "ShmLocations",
    "ShmReservation",
    "Stats",
    "StoreResult",
    "Tier",
    "TierStats",
] + list(errors.__all__)
