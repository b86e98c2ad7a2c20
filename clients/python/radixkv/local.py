"""The server's local socket: Lookup, Release, Renew and Health without
HTTP/2, for an engine on the same machine whose every request starts with a
lookup. A call is one write and one read on a Unix socket (tens of
microseconds where a gRPC call costs a hundred or more); the messages,
statuses, tenancy and limits are the gRPC calls' own.

>>> from radixkv.local import LocalClient
>>> with LocalClient("radixkv-data/radixkv-local.sock", token="alice-token", model="m") as c:
...     hit = c.lookup(prompt, lease_ms=5_000)
...     # load the leased pages (shared memory or gRPC), then:
...     c.release(hit.lease_id)

Framing (both directions): ``u32`` little-endian body length, one byte (the
call on the way in: 0 authenticate, 1 Lookup, 2 Release, 3 Renew,
4 Health; the gRPC status code on the way out), then the body (a
``radixkv.v1`` message, or a UTF-8 error when the status is not 0).
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Any, Dict, Optional, Sequence, Type

import grpc

from .client import _lookup, _lookup_request, pb
from .errors import _BY_CODE, RadixKvError
from .types import Lookup

__all__ = ["LocalClient"]

_AUTHENTICATE, _LOOKUP, _RELEASE, _RENEW, _HEALTH = range(5)
_HEADER = struct.Struct("<IB")
_CODES: Dict[int, grpc.StatusCode] = {c.value[0]: c for c in grpc.StatusCode}


class LocalClient:
    """A client of the local socket at ``path``. Thread-safe (calls take
    turns on one connection); open one per thread for parallel calls.

    :param token: the tenant's bearer token; ``None`` for a server without
        tenants. An unknown token raises ``UnauthenticatedError`` here.
    :param model: the default model of calls (part of the namespace).
    :param timeout: seconds a call may wait for the server (None: forever).
    """

    def __init__(
        self,
        path: str,
        *,
        token: Optional[str] = None,
        model: Optional[str] = None,
        adapter: str = "",
        timeout: Optional[float] = None,
    ) -> None:
        self.model = model
        self.adapter = adapter
        self._lock = threading.Lock()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
            if token is not None:
                self._call("Authenticate", _AUTHENTICATE, token.encode())
        except BaseException:
            self._sock.close()
            raise

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "LocalClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def lookup(
        self,
        tokens: Sequence[int],
        *,
        lease_ms: int = 0,
        prefetch: bool = False,
        model: Optional[str] = None,
        adapter: Optional[str] = None,
    ) -> Lookup:
        """As :meth:`radixkv.Client.lookup`."""
        m = self.model if model is None else model
        if m is None:
            raise ValueError("no model: pass model= to the call or to LocalClient(...)")
        scope = pb.Scope(model=m, adapter=self.adapter if adapter is None else adapter)
        req = _lookup_request(scope, tokens, lease_ms, prefetch)
        return _lookup(self._message("Lookup", _LOOKUP, req, pb.LookupResponse))

    def release(self, lease_id: int) -> None:
        self._message("Release", _RELEASE, pb.ReleaseRequest(lease_id=lease_id), pb.ReleaseResponse)

    def renew(self, lease_id: int, ttl_ms: int) -> int:
        """Extends a lease or pin to ``ttl_ms`` from now; the new expiry."""
        r = self._message("Renew", _RENEW, pb.RenewRequest(lease_id=lease_id, ttl_ms=ttl_ms), pb.RenewResponse)
        return r.expires_ms

    def health(self) -> bool:
        return self._message("Health", _HEALTH, pb.HealthRequest(), pb.HealthResponse).serving

    def _message(self, name: str, call: int, request: Any, response: Type[Any]) -> Any:
        return response.FromString(self._call(name, call, request.SerializeToString()))

    def _call(self, name: str, call: int, body: bytes) -> bytes:
        with self._lock:
            try:
                self._sock.sendall(_HEADER.pack(len(body), call) + body)
                length, status = _HEADER.unpack(self._read(_HEADER.size))
                answer = self._read(length)
            except (OSError, ConnectionError) as e:
                raise _BY_CODE[grpc.StatusCode.UNAVAILABLE](f"local socket: {e}", method=name) from e
        if status != 0:
            code = _CODES.get(status, grpc.StatusCode.UNKNOWN)
            cls = _BY_CODE.get(code, RadixKvError)
            raise cls(answer.decode("utf-8", "replace"), code, name)
        return answer

    def _read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self._sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("the server closed the connection")
            out += chunk
        return bytes(out)
