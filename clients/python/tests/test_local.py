"""The local socket (:class:`radixkv.LocalClient`) against the real server."""

from __future__ import annotations

import random
import socket
import struct

import pytest

from radixkv import Client, InvalidArgumentError, LocalClient, NotFoundError, UnauthenticatedError

from conftest import BLOCK_BYTES, PAGE_SIZE

pytestmark = pytest.mark.server


def prompt(pages: int, *, seed: int) -> list:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(pages * PAGE_SIZE)]


@pytest.fixture
def local_path(server):
    if not server.local:
        pytest.fail("the server printed no local= in its READY line")
    return server.local


def test_local_lookup_equals_grpc_and_its_lease_is_the_servers(server, local_path, model):
    tokens = prompt(4, seed=1)
    kv = bytes(random.Random(2).randrange(256) for _ in range(4 * BLOCK_BYTES))
    with Client(server.tcp, token="alice-token", model=model) as grpc_client, LocalClient(
        local_path, token="alice-token", model=model
    ) as local:
        grpc_client.store(tokens, kv)
        assert local.health()
        by_grpc = grpc_client.lookup(tokens)
        by_local = local.lookup(tokens)
        assert (by_local.pages, by_local.tokens) == (4, 4 * PAGE_SIZE)
        assert by_local.hashes == by_grpc.hashes and by_local.tiers == by_grpc.tiers
        assert local.lookup(prompt(2, seed=3)).pages == 0

        hit = local.lookup(tokens, lease_ms=10_000)
        assert hit.leased
        assert b"".join(b.data for b in grpc_client.load(hit.lease_id)) == kv
        assert local.renew(hit.lease_id, 20_000) >= hit.lease_expires_ms
        local.release(hit.lease_id)
        with pytest.raises(NotFoundError):
            local.release(hit.lease_id)


def test_local_socket_tenancy(server, local_path, model):
    tokens = prompt(2, seed=4)
    with Client(server.tcp, token="alice-token", model=model) as alice:
        alice.store(tokens, bytes(2 * BLOCK_BYTES))
    with pytest.raises(UnauthenticatedError):
        LocalClient(local_path, token="not-a-token")
    with LocalClient(local_path, model=model) as anonymous, pytest.raises(UnauthenticatedError):
        anonymous.lookup(tokens)
    with LocalClient(local_path, token="alice-token", model=model) as alice, LocalClient(
        local_path, token="bob-token", model=model
    ) as bob:
        assert alice.lookup(tokens).pages == 2
        assert bob.lookup(tokens).pages == 0
        lease = alice.lookup(tokens, lease_ms=5_000).lease_id
        with pytest.raises(NotFoundError):
            bob.release(lease)
        alice.release(lease)


def test_local_socket_bad_frames_are_statuses(server, local_path, model):
    with LocalClient(local_path, token="alice-token", model=model) as c:
        with pytest.raises(InvalidArgumentError):
            c._call("Lookup", 1, b"\xff\xff\xff")  # not a LookupRequest
        assert c.lookup(prompt(1, seed=5)).pages == 0  # the connection goes on
    raw = socket.socket(socket.AF_UNIX)
    raw.connect(local_path)
    raw.sendall(struct.pack("<IB", 0, 77))
    length, status = struct.unpack("<IB", raw.recv(5))
    assert status == 3  # INVALID_ARGUMENT
    assert b"unknown call" in raw.recv(length)
    raw.close()
    with LocalClient(local_path, token="alice-token", model=model) as c:
        assert c.health()
