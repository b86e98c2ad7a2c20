"""The client against the real radixkv-server binary on loopback."""

from __future__ import annotations

import os
import queue
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

import radixkv
from radixkv import (
    Client,
    EventKind,
    InvalidArgumentError,
    PermissionDeniedError,
    RadixKvError,
    SetPage,
    SharedMemory,
    Tier,
    UnauthenticatedError,
    namespace_seed,
    page_hashes,
)

from conftest import BLOCK_BYTES, CONFIG, LAYOUT, PAGE_SIZE, start_server

pytestmark = pytest.mark.server


def prompt(pages: int, tail: int = 0, *, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(pages * PAGE_SIZE + tail)]


def blocks_for(pages: int, *, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(pages * BLOCK_BYTES)


def split(data: bytes) -> list:
    return [data[i : i + BLOCK_BYTES] for i in range(0, len(data), BLOCK_BYTES)]


@pytest.fixture
def alice(server, model):
    with Client(server.tcp, token="alice-token", model=model) as c:
        yield c


@pytest.fixture
def bob(server, model):
    with Client(server.tcp, token="bob-token", model=model) as c:
        yield c


def test_health_and_info(alice, bob, model):
    h = alice.health()
    assert h.serving and h.version
    info = alice.info()
    assert (info.page_size, info.block_bytes, info.layout, info.tenant) == (PAGE_SIZE, BLOCK_BYTES, LAYOUT, "alice")
    assert info.max_tokens_per_call > 0 and info.max_message_bytes >= BLOCK_BYTES
    # The seed is the documented XXH3-128 of the namespace key.
    assert info.namespace_seed == namespace_seed("alice", model, LAYOUT, "")
    assert alice.info(adapter="lora-7").namespace_seed == namespace_seed("alice", model, LAYOUT, "lora-7")
    # alice may map the shared-memory tier, bob may not.
    assert info.shm_path and info.shm_slot_stride >= BLOCK_BYTES
    b = bob.info()
    assert b.tenant == "bob" and b.shm_path == ""
    assert b.namespace_seed != info.namespace_seed


def test_store_then_lookup_and_load_return_the_same_bytes(alice):
    tokens = prompt(5, tail=3)
    kv = blocks_for(5)
    assert alice.lookup(tokens).pages == 0
    r = alice.store(tokens, kv)
    assert (r.cached_pages, r.stored_pages) == (0, 5)

    hit = alice.lookup(tokens, lease_ms=10_000)
    assert (hit.pages, hit.tokens) == (5, 5 * PAGE_SIZE)
    assert hit.tiers == [Tier.HOST] * 5 and hit.host_pages == 5
    assert hit.leased and hit.lease_expires_ms > 0
    blocks = alice.load(hit.lease_id)
    assert [b.page for b in blocks] == list(range(5))
    assert [b.hash for b in blocks] == hit.hashes
    assert b"".join(b.data for b in blocks) == kv
    # A sub-range of the lease.
    part = alice.load(hit.lease_id, first_page=2, pages=2)
    assert [b.page for b in part] == [2, 3]
    assert [b.data for b in part] == split(kv)[2:4]
    alice.release(hit.lease_id)

    # Storing again stores nothing new.
    again = alice.store(tokens, split(kv))
    assert (again.cached_pages, again.stored_pages) == (5, 0)
    # A prompt sharing the first three pages hits exactly those.
    other = tokens[: 3 * PAGE_SIZE] + prompt(2, seed=99)
    assert alice.lookup(other).pages == 3


def test_store_after_a_cached_prefix(alice):
    tokens = prompt(4)
    kv = blocks_for(4, seed=1)
    assert alice.store(tokens[: 2 * PAGE_SIZE], kv[: 2 * BLOCK_BYTES]).stored_pages == 2
    # A finished request says how much it generated (for the `odds` policy).
    r = alice.store(tokens, kv[2 * BLOCK_BYTES :], first_page=2, output_tokens=37)
    assert (r.cached_pages, r.stored_pages) == (2, 2)
    # Or says it after storing: a store of no blocks.
    r = alice.store(tokens, b"", first_page=4, output_tokens=37)
    assert (r.cached_pages, r.stored_pages) == (4, 0)
    hit = alice.lookup(tokens, lease_ms=5_000)
    assert hit.pages == 4
    assert b"".join(b.data for b in alice.load(hit.lease_id)) == kv
    alice.release(hit.lease_id)


def test_small_store_chunks_are_reassembled(server, model):
    tokens = prompt(3, seed=5)
    kv = blocks_for(3, seed=5)
    with Client(server.tcp, token="alice-token", model=model, chunk_bytes=1000) as c:
        assert c.store(tokens, kv).stored_pages == 3
        hit = c.lookup(tokens, lease_ms=5_000)
        assert b"".join(b.data for b in c.load(hit.lease_id)) == kv


def test_client_page_hashes_equal_lookup_hashes(alice):
    tokens = prompt(6, tail=7, seed=2)
    alice.store(tokens, blocks_for(6, seed=2))
    info = alice.info()
    local = page_hashes(info.namespace_seed, tokens, info.page_size)
    assert len(local) == 6
    assert alice.lookup(tokens).hashes == local
    assert alice.page_hashes(tokens) == local
    assert [b.hash for b in alice.get(local)] == local


def test_shm_load_returns_the_same_bytes(alice):
    tokens = prompt(4, seed=3)
    kv = blocks_for(4, seed=3)
    alice.store(tokens, kv)
    hit = alice.lookup(tokens, lease_ms=10_000)
    locs = alice.load_shm(hit.lease_id)
    assert locs.block_bytes == BLOCK_BYTES and len(locs.offsets) == 4
    assert locs.shm_path == alice.info().shm_path
    with alice.open_shm() as shm:
        assert shm.block_bytes == BLOCK_BYTES
        assert shm.slot_stride == alice.info().shm_slot_stride
        views = shm.blocks(locs.offsets)
        assert all(isinstance(v, memoryview) and v.readonly for v in views)
        assert b"".join(bytes(v) for v in views) == kv
        for v in views:
            v.release()
    # The client's own cached mapping, and a sub-range.
    views = alice.load_shm_views(hit.lease_id, first_page=1, pages=2)
    assert [bytes(v) for v in views] == split(kv)[1:3]
    alice.release(hit.lease_id)


def test_shm_store_writes_in_place(alice):
    tokens = prompt(3, tail=5, seed=4)
    kv = blocks_for(3, seed=4)
    r = alice.store_shm(tokens, kv)
    assert (r.cached_pages, r.stored_pages) == (0, 3)
    hit = alice.lookup(tokens, lease_ms=5_000)
    assert hit.pages == 3
    assert b"".join(b.data for b in alice.load(hit.lease_id)) == kv
    alice.release(hit.lease_id)
    # By hand: reserve, write, commit, for the pages after a cached prefix.
    longer = tokens[: 3 * PAGE_SIZE] + prompt(2, seed=44)
    more = blocks_for(2, seed=44)
    res = alice.reserve_shm(2, ttl_ms=5_000)
    assert len(res.offsets) == 2 and res.block_bytes == BLOCK_BYTES
    with SharedMemory(res.shm_path, writable=True) as shm:
        shm.write_blocks(res.offsets, split(more))
    r = alice.commit_shm(res.reservation_id, longer, first_page=3, output_tokens=12)
    assert (r.cached_pages, r.stored_pages) == (3, 2)
    hit = alice.lookup(longer, lease_ms=5_000)
    assert hit.pages == 5
    assert b"".join(b.data for b in alice.load(hit.lease_id)) == kv + more


def test_shm_is_refused_to_a_tenant_without_it(alice, bob):
    tokens = prompt(2, seed=6)
    bob.store(tokens, blocks_for(2, seed=6))
    hit = bob.lookup(tokens, lease_ms=5_000)
    with pytest.raises(PermissionDeniedError) as e:
        bob.load_shm(hit.lease_id)
    assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(PermissionDeniedError):
        bob.reserve_shm(1)
    with pytest.raises(radixkv.FailedPreconditionError):
        bob.open_shm()
    bob.release(hit.lease_id)


def test_hash_keyed_set_exists_get(alice):
    tokens = prompt(4, seed=7)
    kv = split(blocks_for(4, seed=7))
    info = alice.info()
    hashes = page_hashes(info.namespace_seed, tokens, PAGE_SIZE)
    assert alice.exists(hashes) == 0
    pages = [
        SetPage(hash=hashes[i], parent=hashes[i - 1] if i else b"", tokens=tokens[i * PAGE_SIZE : (i + 1) * PAGE_SIZE], data=kv[i])
        for i in range(3)
    ]
    r = alice.set(pages)
    assert (r.stored_pages, r.cached_pages) == (3, 0)
    assert alice.exists(hashes) == 3
    assert alice.exists(hashes[:2]) == 2
    assert alice.exists([bytes(16)] + hashes) == 0
    got = alice.get(hashes[:3])
    assert [b.hash for b in got] == hashes[:3]
    assert [b.data for b in got] == kv[:3]
    # The same pages are a prefix hit by tokens, and the 4th page can be set too.
    assert alice.lookup(tokens).pages == 3
    assert alice.set_prompt(tokens, b"".join(kv)).stored_pages == 1
    assert alice.exists(hashes) == 4
    # Tokens that do not chain to the hash are refused.
    bad = SetPage(hash=hashes[0], parent=b"", tokens=[t + 1 for t in tokens[:PAGE_SIZE]], data=kv[0])
    with pytest.raises(InvalidArgumentError):
        alice.set([bad])


def test_tenants_are_isolated(server, alice, bob, model):
    tokens = prompt(3, seed=8)
    kv = blocks_for(3, seed=8)
    alice.store(tokens, kv)
    a = alice.lookup(tokens, lease_ms=5_000)
    assert a.pages == 3
    # Same model, same tokens: a miss for bob.
    b = bob.lookup(tokens)
    assert (b.pages, b.tokens, b.lease_id) == (0, 0, 0)
    assert bob.exists(a.hashes) == 0
    try:
        got = bob.get(a.hashes)
    except RadixKvError:
        got = []
    assert all(blk.data != kv[:BLOCK_BYTES] for blk in got) and not got
    # bob cannot read alice's lease either.
    with pytest.raises(RadixKvError):
        bob.load(a.lease_id)
    # bob's own copy of the same prompt is his, and alice still hits hers.
    other = blocks_for(3, seed=80)
    assert bob.store(tokens, other).stored_pages == 3
    hb = bob.lookup(tokens, lease_ms=5_000)
    assert hb.hashes != a.hashes
    assert b"".join(x.data for x in bob.load(hb.lease_id)) == other
    assert b"".join(x.data for x in alice.load(a.lease_id)) == kv
    assert alice.stats().tenant == "alice" and bob.stats().tenant == "bob"


def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(alice):
    tokens = prompt(2, seed=9)
    for wrong in (b"\0" * (2 * BLOCK_BYTES - 1), b"\0" * (2 * BLOCK_BYTES + 1), b"\0" * BLOCK_BYTES, b""):
        with pytest.raises(InvalidArgumentError) as e:
            alice.store(tokens, wrong)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert isinstance(e.value, RadixKvError) and isinstance(e.value, ValueError)
    with pytest.raises(InvalidArgumentError):
        alice.store(tokens, blocks_for(1), first_page=3)  # past the prompt
    with pytest.raises(InvalidArgumentError):
        alice.exists([b"short"])
    for wrong_output in (-1, 2**32):
        with pytest.raises(ValueError, match="output_tokens"):
            alice.store(tokens, blocks_for(2, seed=9), output_tokens=wrong_output)
    assert alice.lookup(tokens).pages == 0  # nothing half-stored
    assert alice.health().serving
    assert alice.store(tokens, blocks_for(2, seed=9)).stored_pages == 2
    assert alice.lookup(tokens).pages == 2


def test_unknown_or_missing_token_is_unauthenticated(server, model):
    for token in (None, "not-a-token"):
        with Client(server.tcp, token=token, model=model) as c:
            with pytest.raises(UnauthenticatedError) as e:
                c.lookup(prompt(1))
            assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_unix_socket(server, model):
    assert server.unix
    with Client(f"unix:{server.unix}", token="alice-token", model=model) as c:
        tokens = prompt(2, seed=10)
        c.store(tokens, blocks_for(2, seed=10))
        assert c.lookup(tokens).pages == 2
        assert c.info().tenant == "alice"


def test_leases_renew_pin_unpin(alice):
    tokens = prompt(2, seed=11)
    alice.store(tokens, blocks_for(2, seed=11))
    hit = alice.lookup(tokens, lease_ms=1_000)
    assert alice.renew(hit.lease_id, 60_000) > hit.lease_expires_ms
    alice.release(hit.lease_id)
    with pytest.raises(RadixKvError):
        alice.load(hit.lease_id)  # released
    pin = alice.pin(tokens, 60_000, priority=3)
    assert pin.pages == 2 and pin.pin_id and pin.expires_ms > 0
    assert alice.stats().pinned_pages >= 2
    assert alice.renew(pin.pin_id, 120_000) >= pin.expires_ms
    alice.unpin(pin.pin_id)


def test_stats_count_lookups(alice):
    before = alice.stats()
    tokens = prompt(2, seed=12)
    alice.store(tokens, blocks_for(2, seed=12))
    alice.lookup(tokens)
    after = alice.stats()
    assert after.lookups >= before.lookups + 1
    assert after.hit_tokens >= before.hit_tokens + 2 * PAGE_SIZE
    assert after.pages >= before.pages + 2


def test_events_snapshot_then_live(alice, model):
    tokens = prompt(2, seed=13)
    got: "queue.Queue" = queue.Queue()
    stream = alice.events([(model, "")])

    def read() -> None:
        try:
            for batch in stream:
                got.put(batch)
        except Exception as e:  # surfaced below
            got.put(e)

    threading.Thread(target=read, daemon=True).start()
    # Wait for the (empty) snapshot so the store below is a live event.
    first = got.get(timeout=10)
    assert not isinstance(first, Exception), first
    assert first.snapshot
    alice.store(tokens, blocks_for(2, seed=13))
    hashes = set(alice.page_hashes(tokens))
    stored = set()
    deadline = time.monotonic() + 10
    while stored != hashes and time.monotonic() < deadline:
        batch = got.get(timeout=max(0.1, deadline - time.monotonic()))
        assert not isinstance(batch, Exception), batch
        for ev in batch.events:
            if ev.kind == EventKind.STORED:
                assert ev.model == model and ev.seq > 0
                stored.add(ev.hash)
    stream.cancel()
    assert stored == hashes


def test_admin_calls_need_the_admin_token(server, alice, model):
    tokens = prompt(2, seed=14)
    alice.store(tokens, blocks_for(2, seed=14))
    with pytest.raises(PermissionDeniedError):
        alice.cluster_stats()
    with Client(server.tcp, token="admin-secret", model=model) as admin:
        cs = admin.cluster_stats()
        assert cs.pages >= 2 and "alice" in {t.tenant for t in cs.tenants}
        assert admin.invalidate("alice") == 2
    assert alice.lookup(tokens).pages == 0


def test_example_runs(server):
    example = Path(__file__).resolve().parents[1] / "examples" / "basic.py"
    out = subprocess.run(
        [sys.executable, str(example), server.tcp, "--token", "alice-token", "--model", "example-model"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "loaded blocks match" in out.stdout


def test_sigterm_shuts_down_gracefully(tmp_path):
    srv = start_server(tmp_path / "own", shm=False)
    with Client(srv.tcp, token="alice-token", model="m") as c:
        tokens = prompt(2, seed=15)
        c.store(tokens, blocks_for(2, seed=15))
    assert srv.stop() == 0, srv.log_text()[-4000:]
    assert not os.path.exists(srv.unix)


def test_big_blocks_spill_to_disk_and_survive_a_restart(tmp_path):
    """Blocks over gRPC's default 4 MiB message size; a host tier of four
    blocks, so older pages move to disk; a restart comes back warm."""
    bb = 5 << 20
    geometry = dict(block_bytes=bb, host_blocks=4, disk_blocks=16)
    prompts = [prompt(2, seed=100 + i) for i in range(3)]
    kvs = [random.Random(100 + i).randbytes(2 * bb) for i in range(3)]

    def check(c: Client, allow_shm: bool) -> list:
        tiers = []
        for tokens, kv in zip(prompts, kvs):
            hit = c.lookup(tokens, lease_ms=10_000)
            assert hit.pages == 2, tiers
            tiers.append(hit.tiers)
            assert b"".join(b.data for b in c.load(hit.lease_id)) == kv
            if allow_shm:
                views = c.load_shm_views(hit.lease_id)  # promotes disk pages to host
                assert b"".join(bytes(v) for v in views) == kv
                for v in views:
                    v.release()
            c.release(hit.lease_id)
        return tiers

    srv = start_server(tmp_path / "big", **geometry)
    try:
        with Client(srv.tcp, token="alice-token", model="big") as c:
            assert c.info().block_bytes == bb
            for tokens, kv in zip(prompts, kvs):
                assert c.store(tokens, kv).stored_pages == 2
            # Six pages in a four-block host tier: the oldest went to disk.
            assert c.lookup(prompts[0]).tiers == [Tier.DISK, Tier.DISK]
            check(c, allow_shm=True)
            # Hash-keyed calls carry whole blocks in one message.
            extra, extra_kv = prompt(1, seed=109), random.Random(109).randbytes(bb)
            assert c.set_prompt(extra, extra_kv).stored_pages == 1
            assert [b.data for b in c.get(c.page_hashes(extra))] == [extra_kv]
    finally:
        assert srv.stop() == 0, srv.log_text()[-4000:]

    again = start_server(tmp_path / "big", **geometry)
    try:
        with Client(again.tcp, token="alice-token", model="big") as c:
            tiers = check(c, allow_shm=False)
            assert all(t == [Tier.DISK, Tier.DISK] for t in tiers), tiers
    finally:
        assert again.stop() == 0


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_tls_with_a_root_certificate(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    config = CONFIG + f'\n[tls]\ncert = "{cert}"\nkey = "{key}"\n'
    srv = start_server(tmp_path / "tls", config, shm=False)
    try:
        port = srv.tcp.rsplit(":", 1)[1]
        with Client(f"localhost:{port}", token="alice-token", model="m", root_cert=str(cert)) as c:
            tokens = prompt(1, seed=16)
            assert c.store(tokens, blocks_for(1, seed=16)).stored_pages == 1
            assert c.info().tenant == "alice"
        with Client(srv.tcp, token="alice-token", model="m", root_cert=cert.read_bytes(), timeout=5) as c:
            assert c.lookup(tokens).pages == 1  # by IP: the certificate names 127.0.0.1 too
        # Plaintext to a TLS port fails (UNAVAILABLE), it does not hang.
        with Client(srv.tcp, token="alice-token", model="m", timeout=5) as c:
            with pytest.raises(RadixKvError) as e:
                c.health()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        assert srv.stop() == 0
