"""The radixkv gRPC client: plain Python types in, plain Python types out.

>>> from radixkv import Client
>>> with Client("127.0.0.1:50051", token="alice-token", model="llama-3-8b") as c:
...     info = c.info()
...     prompt = list(range(64))                      # token ids
...     kv = bytes(4 * info.block_bytes)              # one block per page
...     c.store(prompt, kv)
...     hit = c.lookup(prompt, lease_ms=5_000)
...     blocks = c.load(hit.lease_id)                 # [Block(page, hash, tier, data)]
...     c.release(hit.lease_id)

Requests name their namespace by (model, adapter): pass ``model=`` (and
``adapter=``) to the constructor as defaults, or to each call. The tenant
comes from the bearer token, never from a request.
"""

from __future__ import annotations

import struct
import threading
from typing import (
    Any,
    Callable,
    Dict,
    Iterable,
    Iterator,
    List,
    Optional,
    Sequence,
    Tuple,
    TypeVar,
    Union,
)

import grpc

from . import hashing
from .errors import FailedPreconditionError, error_from_rpc
from .shm import SharedMemory
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
    TierStats,
    _tier,
)

try:
    from ._generated import cache_pb2 as pb
    from ._generated import cache_pb2_grpc as pb_grpc
except ImportError as e:  # pragma: no cover - a setup problem, not a runtime one
    raise ImportError(
        "radixkv's gRPC stubs are missing or stale: run scripts/python-client "
        "(it generates them from proto/proto/radixkv/v1/cache.proto)"
    ) from e

__all__ = ["Client", "EventStream"]

BytesLike = Union[bytes, bytearray, memoryview]
Blocks = Union[BytesLike, Sequence[BytesLike]]
T = TypeVar("T")

#: Store messages carry at most this many block bytes each by default.
DEFAULT_CHUNK_BYTES = 1 << 20


def _buffers(blocks: Blocks) -> List[memoryview]:
    if isinstance(blocks, (bytes, bytearray, memoryview)):
        return [memoryview(blocks).cast("B")]
    return [memoryview(b).cast("B") for b in blocks]


class EventStream:
    """The live ``Events`` stream: iterate it for :class:`EventBatch` values
    (first the snapshot, then live events); :meth:`cancel` (or leaving the
    ``with`` block) ends it, after which iteration stops quietly."""

    def __init__(self, call: Any) -> None:
        self._call = call
        self._cancelled = False

    def __iter__(self) -> Iterator[EventBatch]:
        return self

    def __next__(self) -> EventBatch:
        try:
            msg = next(self._call)
        except grpc.RpcError as e:
            if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                raise StopIteration from None
            raise error_from_rpc(e, "Events") from None
        return EventBatch(
            snapshot=msg.snapshot,
            events=[
                Event(
                    seq=ev.seq,
                    kind=_kind(ev.kind),
                    model=ev.scope.model,
                    adapter=ev.scope.adapter,
                    hash=ev.hash,
                    parent=ev.parent,
                    tier=_tier(ev.tier),
                )
                for ev in msg.events
            ],
            lagged=msg.lagged,
            seq=msg.seq,
        )

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class Client:
    """A connection to a radixkv server.

    :param target: ``"host:port"`` (``"[::1]:port"`` for IPv6), or
        ``"unix:/path/to.sock"`` for a Unix socket.
    :param token: the tenant's bearer token (sent as ``authorization:
        Bearer <token>``); ``None`` for a server without tenants.
    :param root_cert: PEM root certificate(s), as bytes or a file path, to
        connect over TLS; ``tls=True`` with no ``root_cert`` uses the system
        roots. Plaintext otherwise.
    :param tls_server_name: overrides the name checked in the server's
        certificate (for tests with a certificate issued to another name).
    :param model: default model for calls that take ``model=``.
    :param adapter: default adapter (LoRA id; ``""`` for the base model).
    :param timeout: default deadline of each unary call and of a whole
        streaming call, in seconds (``None``: none). ``events()`` has none.
    :param chunk_bytes: block bytes per ``Store`` message.
    :param options: extra gRPC channel options.

    Thread-safe: one client may serve many threads. Use as a context
    manager, or call :meth:`close`.
    """

    def __init__(
        self,
        target: str,
        *,
        token: Optional[str] = None,
        root_cert: Union[bytes, str, None] = None,
        tls: Optional[bool] = None,
        tls_server_name: Optional[str] = None,
        model: Optional[str] = None,
        adapter: str = "",
        timeout: Optional[float] = 30.0,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        options: Sequence[Tuple[str, Any]] = (),
    ) -> None:
        if target.startswith("http://"):
            target = target[len("http://") :]
        elif target.startswith("https://"):
            target = target[len("https://") :]
            tls = True if tls is None else tls
        if chunk_bytes <= 0:
            raise ValueError("chunk_bytes must be positive")
        self.target = target
        self.model = model
        self.adapter = adapter
        self.timeout = timeout
        self.chunk_bytes = chunk_bytes
        self._metadata: Tuple[Tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        opts: List[Tuple[str, Any]] = [
            # Blocks can be megabytes; the server enforces its own limit.
            ("grpc.max_receive_message_length", -1),
            ("grpc.max_send_message_length", -1),
        ]
        if tls_server_name:
            opts.append(("grpc.ssl_target_name_override", tls_server_name))
        if target.startswith(("unix:", "unix-abstract:")) and not any(k == "grpc.default_authority" for k, _ in options):
            # gRPC core sends the socket path as :authority, which the
            # server's HTTP/2 stack (h2) refuses with PROTOCOL_ERROR.
            opts.append(("grpc.default_authority", "localhost"))
        opts.extend(options)
        if root_cert is not None or tls:
            if isinstance(root_cert, str):
                with open(root_cert, "rb") as f:
                    root_cert = f.read()
            creds = grpc.ssl_channel_credentials(root_certificates=root_cert)
            self._channel = grpc.secure_channel(target, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(target, options=opts)
        self._cache = pb_grpc.CacheStub(self._channel)
        self._admin = pb_grpc.AdminStub(self._channel)
        self._lock = threading.Lock()
        self._infos: Dict[Tuple[str, str], Info] = {}
        self._shm: Dict[bool, SharedMemory] = {}

    # -- plumbing -----------------------------------------------------------

    def close(self) -> None:
        """Closes the channel and unmaps any shared memory this client mapped."""
        with self._lock:
            for m in self._shm.values():
                m.close()
            self._shm.clear()
        self._channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r}, model={self.model!r}, adapter={self.adapter!r})"

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Blocks until the channel is connected (``UnavailableError`` after
        ``timeout`` seconds)."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise error_from_rpc(_Failed(grpc.StatusCode.UNAVAILABLE, f"{self.target} not ready after {timeout}s"), "connect") from None

    def _scope(self, model: Optional[str], adapter: Optional[str]) -> "pb.Scope":
        m = self.model if model is None else model
        if m is None:
            raise ValueError("no model: pass model= to the call or to Client(...)")
        a = self.adapter if adapter is None else adapter
        return pb.Scope(model=m, adapter=a)

    def _unary(self, name: str, method: Callable[..., T], request: Any, timeout: Optional[float]) -> T:
        try:
            return method(request, timeout=self._timeout(timeout), metadata=self._metadata)
        except grpc.RpcError as e:
            raise error_from_rpc(e, name) from None

    def _stream(self, name: str, call: Iterable[T]) -> Iterator[T]:
        try:
            yield from call
        except grpc.RpcError as e:
            raise error_from_rpc(e, name) from None
        finally:
            cancel = getattr(call, "cancel", None)
            if cancel is not None:
                cancel()

    def _timeout(self, timeout: Optional[float]) -> Optional[float]:
        return self.timeout if timeout is None else timeout

    # -- namespace and hashing ----------------------------------------------

    def info(self, *, model: Optional[str] = None, adapter: Optional[str] = None, timeout: Optional[float] = None) -> Info:
        """The server's geometry, shared-memory file and this tenant's
        namespace seed for (model, adapter)."""
        scope = self._scope(model, adapter)
        r = self._unary("Info", self._cache.Info, pb.InfoRequest(scope=scope), timeout)
        info = Info(
            page_size=r.page_size,
            block_bytes=r.block_bytes,
            layout=r.layout,
            shm_path=r.shm_path,
            shm_slot_stride=r.shm_slot_stride,
            namespace_seed=r.namespace_seed,
            max_tokens_per_call=r.max_tokens_per_call,
            max_message_bytes=r.max_message_bytes,
            tenant=r.tenant,
        )
        with self._lock:
            self._infos[(scope.model, scope.adapter)] = info
        return info

    def _info(self, model: Optional[str], adapter: Optional[str]) -> Info:
        scope = self._scope(model, adapter)
        with self._lock:
            info = self._infos.get((scope.model, scope.adapter))
        return info if info is not None else self.info(model=scope.model, adapter=scope.adapter)

    def page_hashes(self, tokens: Sequence[int], *, model: Optional[str] = None, adapter: Optional[str] = None) -> List[bytes]:
        """The hash of each whole page of ``tokens`` in this tenant's
        namespace, computed locally from the (cached) ``info()`` seed."""
        info = self._info(model, adapter)
        return hashing.page_hashes(info.namespace_seed, tokens, info.page_size)

    # -- prefix calls -------------------------------------------------------

    def lookup(
        self,
        tokens: Sequence[int],
        *,
        lease_ms: int = 0,
        prefetch: bool = False,
        model: Optional[str] = None,
        adapter: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> Lookup:
        """The longest cached prefix of ``tokens``; with ``lease_ms`` > 0 the
        matched pages are leased (readable by :meth:`load` / :meth:`load_shm`
        until :meth:`release` or expiry); ``prefetch`` starts copying
        disk-only pages up."""
        req = _lookup_request(self._scope(model, adapter), tokens, lease_ms, prefetch)
        return _lookup(self._unary("Lookup", self._cache.Lookup, req, timeout))

    def iter_load(self, lease_id: int, first_page: int = 0, pages: int = 0, *, timeout: Optional[float] = None) -> Iterator[Block]:
        """Streams the blocks of a leased range (``pages=0``: to the end of
        the lease), one :class:`Block` per page."""
        req = pb.LoadRequest(lease_id=lease_id, first_page=first_page, pages=pages)
        call = self._cache.Load(req, timeout=self._timeout(timeout), metadata=self._metadata)
        for b in self._stream("Load", call):
            yield Block(page=b.page, hash=b.hash, tier=_tier(b.tier), data=b.data)

    def load(self, lease_id: int, first_page: int = 0, pages: int = 0, *, timeout: Optional[float] = None) -> List[Block]:
        """:meth:`iter_load`, collected."""
        return list(self.iter_load(lease_id, first_page, pages, timeout=timeout))

    def load_shm(self, lease_id: int, first_page: int = 0, pages: int = 0, *, timeout: Optional[float] = None) -> ShmLocations:
        """Where each leased block sits in the shared-memory file (disk pages
        are promoted to host first). Map the file with :meth:`open_shm`, or
        use :meth:`load_shm_views`."""
        req = pb.LoadRequest(lease_id=lease_id, first_page=first_page, pages=pages)
        r = self._unary("LoadShm", self._cache.LoadShm, req, timeout)
        return ShmLocations(shm_path=r.shm_path, offsets=list(r.offsets), block_bytes=r.block_bytes)

    def load_shm_views(
        self, lease_id: int, first_page: int = 0, pages: int = 0, *, timeout: Optional[float] = None
    ) -> List[memoryview]:
        """The leased blocks as zero-copy views of the shared-memory file,
        valid while the lease lives (read them before :meth:`release`)."""
        locs = self.load_shm(lease_id, first_page, pages, timeout=timeout)
        shm = self._mapped(locs.shm_path, writable=False)
        return shm.blocks(locs.offsets)

    def store(
        self,
        tokens: Sequence[int],
        blocks: Blocks,
        *,
        first_page: int = 0,
        output_tokens: int = 0,
        model: Optional[str] = None,
        adapter: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> StoreResult:
        """Stores the blocks of pages ``first_page..`` of the prompt
        ``tokens`` (the whole prompt, prefix included; pages before
        ``first_page`` must be cached already). ``blocks`` is one buffer of
        every block back to back, or a sequence of blocks (or of any split);
        the server checks that they add up to one block per whole page.
        ``output_tokens``: how many tokens the request generated, when it
        has finished (0: not known); the ``odds`` policy learns from it
        which prompts come back. A request stored while it ran can say it
        at the end with no blocks: ``store(tokens, b"", first_page=pages,
        output_tokens=n)``."""
        header = self._store_header(tokens, first_page, output_tokens, model, adapter)
        chunk = self.chunk_bytes

        def requests() -> Iterator["pb.StoreRequest"]:
            first = True
            for buf in _buffers(blocks):
                for at in range(0, len(buf), chunk):
                    data = bytes(buf[at : at + chunk])
                    if first:
                        yield pb.StoreRequest(header=header, data=data)
                        first = False
                    else:
                        yield pb.StoreRequest(data=data)
            if first:
                yield pb.StoreRequest(header=header)

        r = self._unary("Store", self._cache.Store, requests(), timeout)
        return StoreResult(cached_pages=r.cached_pages, stored_pages=r.stored_pages)

    def reserve_shm(self, pages: int, *, ttl_ms: int = 30_000, timeout: Optional[float] = None) -> ShmReservation:
        """Reserves ``pages`` host slots to write in place (they go back to
        the server after ``ttl_ms`` unless committed)."""
        r = self._unary("ReserveShm", self._cache.ReserveShm, pb.ReserveShmRequest(pages=pages, ttl_ms=ttl_ms), timeout)
        return ShmReservation(
            reservation_id=r.reservation_id, shm_path=r.shm_path, offsets=list(r.offsets), block_bytes=r.block_bytes
        )

    def commit_shm(
        self,
        reservation_id: int,
        tokens: Sequence[int],
        *,
        first_page: int = 0,
        output_tokens: int = 0,
        model: Optional[str] = None,
        adapter: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> StoreResult:
        """Makes the written reserved slots the blocks of pages
        ``first_page..`` of ``tokens``, one slot per page in order
        (``output_tokens`` as in :meth:`store`)."""
        header = self._store_header(tokens, first_page, output_tokens, model, adapter)
        req = pb.CommitShmRequest(reservation_id=reservation_id, header=header)
        r = self._unary("CommitShm", self._cache.CommitShm, req, timeout)
        return StoreResult(cached_pages=r.cached_pages, stored_pages=r.stored_pages)

    def store_shm(
        self,
        tokens: Sequence[int],
        blocks: Blocks,
        *,
        first_page: int = 0,
        output_tokens: int = 0,
        ttl_ms: int = 30_000,
        model: Optional[str] = None,
        adapter: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> StoreResult:
        """:meth:`store` through shared memory: reserves one slot per page
        ``first_page..``, writes the blocks in place, commits."""
        info = self._info(model, adapter)
        pages = len(tokens) // info.page_size - first_page
        if pages < 0:
            raise ValueError(f"first_page {first_page} is past the prompt's {len(tokens) // info.page_size} pages")
        res = self.reserve_shm(pages, ttl_ms=ttl_ms, timeout=timeout)
        shm = self._mapped(res.shm_path, writable=True)
        shm.write_blocks(res.offsets, blocks)
        return self.commit_shm(
            res.reservation_id,
            tokens,
            first_page=first_page,
            output_tokens=output_tokens,
            model=model,
            adapter=adapter,
            timeout=timeout,
        )

    def _store_header(
        self, tokens: Sequence[int], first_page: int, output_tokens: int, model: Optional[str], adapter: Optional[str]
    ) -> "pb.StoreHeader":
        if not 0 <= output_tokens < 2**32:
            raise ValueError(f"output_tokens {output_tokens} is not a u32")
        return pb.StoreHeader(
            scope=self._scope(model, adapter),
            tokens=_wire_tokens(tokens),
            first_page=first_page,
            output_tokens=output_tokens,
        )

    def release(self, lease_id: int, *, timeout: Optional[float] = None) -> None:
        """Ends a lease."""
        self._unary("Release", self._cache.Release, pb.ReleaseRequest(lease_id=lease_id), timeout)

    def renew(self, lease_id: int, ttl_ms: int, *, timeout: Optional[float] = None) -> int:
        """Extends a lease or a pin by ``ttl_ms``; returns its new expiry (ms)."""
        r = self._unary("Renew", self._cache.Renew, pb.RenewRequest(lease_id=lease_id, ttl_ms=ttl_ms), timeout)
        return r.expires_ms

    def pin(
        self,
        tokens: Sequence[int],
        ttl_ms: int,
        *,
        priority: int = 0,
        model: Optional[str] = None,
        adapter: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> Pin:
        """Keeps the cached prefix of ``tokens`` warm for ``ttl_ms`` at
        ``priority`` (0..255, higher outlives lower)."""
        req = pb.PinRequest(scope=self._scope(model, adapter), tokens=_wire_tokens(tokens), ttl_ms=ttl_ms, priority=priority)
        r = self._unary("Pin", self._cache.Pin, req, timeout)
        return Pin(pin_id=r.pin_id, pages=r.pages, expires_ms=r.expires_ms)

    def unpin(self, pin_id: int, *, timeout: Optional[float] = None) -> None:
        self._unary("Unpin", self._cache.Unpin, pb.UnpinRequest(pin_id=pin_id), timeout)

    # -- hash-keyed calls ----------------------------------------------------

    def exists(
        self,
        hashes: Sequence[bytes],
        *,
        model: Optional[str] = None,
        adapter: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> int:
        """How many of ``hashes`` (16 bytes each, in prefix order), from the
        first, are cached."""
        req = pb.ExistsRequest(scope=self._scope(model, adapter), hashes=[bytes(h) for h in hashes])
        return self._unary("Exists", self._cache.Exists, req, timeout).pages

    def iter_get(
        self,
        hashes: Sequence[bytes],
        *,
        model: Optional[str] = None,
        adapter: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> Iterator[Block]:
        """Streams the blocks of pages named by hash."""
        req = pb.GetRequest(scope=self._scope(model, adapter), hashes=[bytes(h) for h in hashes])
        call = self._cache.Get(req, timeout=self._timeout(timeout), metadata=self._metadata)
        for b in self._stream("Get", call):
            yield Block(page=b.page, hash=b.hash, tier=_tier(b.tier), data=b.data)

    def get(
        self,
        hashes: Sequence[bytes],
        *,
        model: Optional[str] = None,
        adapter: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> List[Block]:
        """:meth:`iter_get`, collected."""
        return list(self.iter_get(hashes, model=model, adapter=adapter, timeout=timeout))

    def set(
        self,
        pages: Iterable[SetPage],
        *,
        model: Optional[str] = None,
        adapter: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> SetResult:
        """Stores pages named by hash, each with its parent's hash, its tokens
        and its whole block (one message per page)."""
        scope = self._scope(model, adapter)
        pages = list(pages)
        if not pages:
            return SetResult(stored_pages=0, cached_pages=0)

        def requests() -> Iterator["pb.SetRequest"]:
            for i, p in enumerate(pages):
                yield pb.SetRequest(
                    scope=scope if i == 0 else None,
                    hash=bytes(p.hash),
                    parent=bytes(p.parent),
                    tokens=_wire_tokens(p.tokens),
                    data=bytes(p.data),
                )

        r = self._unary("Set", self._cache.Set, requests(), timeout)
        return SetResult(stored_pages=r.stored_pages, cached_pages=r.cached_pages)

    def set_prompt(
        self,
        tokens: Sequence[int],
        blocks: Blocks,
        *,
        first_page: int = 0,
        model: Optional[str] = None,
        adapter: Optional[str] = None,
        timeout: Optional[float] = None,
    ) -> SetResult:
        """:meth:`set` for pages ``first_page..`` of a prompt, naming them with
        :meth:`page_hashes`. ``blocks`` as for :meth:`store`, split by the
        block size."""
        info = self._info(model, adapter)
        ps, bb = info.page_size, info.block_bytes
        hashes = hashing.page_hashes(info.namespace_seed, tokens, ps)
        data = b"".join(bytes(b) for b in _buffers(blocks))
        n = len(hashes) - first_page
        if n < 0 or len(data) != n * bb:
            raise ValueError(f"{len(data)} bytes for {max(n, 0)} blocks of {bb}")
        pages = [
            SetPage(
                hash=hashes[i],
                parent=hashes[i - 1] if i else b"",
                tokens=list(tokens[i * ps : (i + 1) * ps]),
                data=data[(i - first_page) * bb : (i - first_page + 1) * bb],
            )
            for i in range(first_page, len(hashes))
        ]
        return self.set(pages, model=model, adapter=adapter, timeout=timeout)

    # -- observability -------------------------------------------------------

    def stats(self, *, timeout: Optional[float] = None) -> Stats:
        """This tenant's statistics."""
        return _stats(self._unary("Stats", self._cache.Stats, pb.StatsRequest(), timeout))

    def events(self, scopes: Optional[Sequence[Tuple[str, str]]] = None) -> EventStream:
        """Subscribes to blocks stored / removed / cleared in this tenant's
        namespaces (``scopes``: (model, adapter) pairs; ``None``: all)."""
        req = pb.EventsRequest(scopes=[pb.Scope(model=m, adapter=a) for m, a in (scopes or ())])
        return EventStream(self._cache.Events(req, metadata=self._metadata))

    def health(self, *, timeout: Optional[float] = None) -> Health:
        r = self._unary("Health", self._cache.Health, pb.HealthRequest(), timeout)
        return Health(serving=r.serving, version=r.version)

    # -- admin (needs the admin token) ---------------------------------------

    def cluster_stats(self, *, timeout: Optional[float] = None) -> ClusterStats:
        r = self._unary("ClusterStats", self._admin.ClusterStats, pb.ClusterStatsRequest(), timeout)
        return ClusterStats(
            tenants=[_stats(t) for t in r.tenants],
            namespaces=r.namespaces,
            pages=r.pages,
            tiers=[_tier_stats(t) for t in r.tiers],
            corrupt_blocks=r.corrupt_blocks,
            io_errors=r.io_errors,
            demotions=r.demotions,
            promotions=r.promotions,
            index_memory_bytes=r.index_memory_bytes,
        )

    def invalidate(self, tenant: str, *, model: Optional[str] = None, adapter: Optional[str] = None, timeout: Optional[float] = None) -> int:
        """Drops every page of one tenant's namespace; returns how many."""
        req = pb.InvalidateRequest(tenant=tenant, scope=self._scope(model, adapter))
        return self._unary("Invalidate", self._admin.Invalidate, req, timeout).removed_pages

    # -- shared memory ---------------------------------------------------------

    def open_shm(self, *, writable: bool = False, model: Optional[str] = None, adapter: Optional[str] = None) -> SharedMemory:
        """A new mapping of the server's shared-memory file (the caller closes
        it). ``FailedPreconditionError`` if the server has none or this
        tenant may not map it."""
        info = self._info(model, adapter)
        if not info.shm_path:
            raise FailedPreconditionError(
                "the server's host tier is not in shared memory, or this tenant may not map it", method="open_shm"
            )
        return SharedMemory(info.shm_path, writable=writable, block_bytes=info.block_bytes)

    def _mapped(self, path: str, *, writable: bool) -> SharedMemory:
        """This client's cached mapping of ``path`` (a writable one serves
        reads too)."""
        if not path:
            raise FailedPreconditionError("the server gave no shared-memory file", method="shm")
        with self._lock:
            for w in ((True,) if writable else (False, True)):
                m = self._shm.get(w)
                if m is not None and m.path == path and not m.closed:
                    return m
            m = SharedMemory(path, writable=writable)
            old = self._shm.pop(writable, None)
            if old is not None:
                old.close()
            self._shm[writable] = m
            return m


class _Failed(grpc.RpcError):
    """A client-side failure dressed as an RPC error."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def _kind(v: int) -> EventKind:
    try:
        return EventKind(v)
    except ValueError:
        return EventKind.UNSPECIFIED


def _tier_stats(t: Any) -> TierStats:
    return TierStats(tier=_tier(t.tier), pages=t.pages, hit_tokens=t.hit_tokens)


def _stats(r: Any) -> Stats:
    return Stats(
        tenant=r.tenant,
        lookups=r.lookups,
        lookup_tokens=r.lookup_tokens,
        hit_tokens=r.hit_tokens,
        tiers=[_tier_stats(t) for t in r.tiers],
        pages=r.pages,
        pinned_pages=r.pinned_pages,
        leases=r.leases,
        quota_pages=r.quota_pages,
    )



def _lookup_request(scope: Any, tokens: Sequence[int], lease_ms: int, prefetch: bool) -> Any:
    return pb.LookupRequest(scope=scope, tokens=_wire_tokens(tokens), lease_ms=lease_ms, prefetch=prefetch)


def _lookup(r: Any) -> Lookup:
    h = r.hashes
    return Lookup(
        pages=r.pages,
        tokens=r.tokens,
        tiers=[_tier(t) for t in r.tiers],
        device_pages=r.device_pages,
        host_pages=r.host_pages,
        disk_pages=r.disk_pages,
        hashes=[h[i : i + hashing.HASH_BYTES] for i in range(0, len(h), hashing.HASH_BYTES)],
        lease_id=r.lease_id,
        lease_expires_ms=r.lease_expires_ms,
    )


def _wire_tokens(tokens: Sequence[int]) -> bytes:
    """Token ids as the contract carries them: u32 little-endian each."""
    try:
        return struct.pack(f"<{len(tokens)}I", *tokens)
    except struct.error as e:
        raise ValueError(f"token ids must be integers in 0..2**32: {e}") from None
