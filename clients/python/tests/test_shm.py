"""The shared-memory helper on synthetic pool files (no server needed)."""

import os
import struct
from typing import Optional

import pytest
import xxhash

from radixkv.shm import SHM_HEADER_BYTES, SHM_MAGIC, SharedMemory, ShmFormatError, ShmHeader

BLOCK = 256
STRIDE = 320
SLOTS = 4


def header(**kw) -> ShmHeader:
    fields = dict(
        block_bytes=BLOCK, max_meta_bytes=128, layout_digest=0xABCDEF, slots=SLOTS, stride=STRIDE, data_offset=SHM_HEADER_BYTES
    )
    fields.update(kw)
    return ShmHeader(**fields)


def make_pool(path, h: Optional[ShmHeader] = None, *, raw_header: Optional[bytes] = None, truncate: int = 0) -> None:
    h = h or header()
    head = raw_header if raw_header is not None else h.encode()
    body = bytearray(head.ljust(SHM_HEADER_BYTES, b"\0"))
    body = body.ljust(h.data_offset, b"\0")
    for i in range(h.slots):
        body += bytes([i + 1]) * h.block_bytes + b"\xee" * (h.stride - h.block_bytes)
    with open(path, "wb") as f:
        f.write(body[: len(body) - truncate])


def test_header_layout_is_the_documented_one():
    raw = header().encode()
    assert len(raw) == 72
    assert raw[:8] == SHM_MAGIC == b"RDXKVHST"
    assert struct.unpack_from("<II6Q", raw, 8) == (1, 4096, BLOCK, 128, 0xABCDEF, SLOTS, STRIDE, 4096)
    assert struct.unpack_from("<Q", raw, 64)[0] == xxhash.xxh3_64_intdigest(raw[:64])
    assert ShmHeader.decode(raw) == header()


def test_blocks_are_zero_copy_views(tmp_path):
    path = tmp_path / "pool"
    make_pool(path)
    with SharedMemory(path, block_bytes=BLOCK) as shm:
        assert (shm.block_bytes, shm.slot_count, shm.slot_stride, shm.data_offset) == (BLOCK, SLOTS, STRIDE, 4096)
        offsets = [shm.header.slot_offset(i) for i in range(SLOTS)]
        views = shm.blocks(offsets)
        for i, v in enumerate(views):
            assert isinstance(v, memoryview) and v.readonly
            assert bytes(v) == bytes([i + 1]) * BLOCK
        # Another writer changes the file: the view shows it (a mapping, not a copy).
        with open(path, "r+b") as f:
            f.seek(offsets[2])
            f.write(b"\x42" * BLOCK)
        assert bytes(views[2]) == b"\x42" * BLOCK
        assert shm.read(offsets[2]) == b"\x42" * BLOCK
        with pytest.raises(ValueError):
            shm.write(offsets[0], b"x" * BLOCK)  # read-only mapping
        for bad in (0, 4095, offsets[0] + 1, offsets[-1] + STRIDE):
            with pytest.raises(ValueError):
                shm.block(bad)
        for v in views:
            v.release()
    assert shm.closed


def test_writes_land_in_the_file(tmp_path):
    path = tmp_path / "pool"
    make_pool(path)
    with SharedMemory(path, writable=True) as shm:
        o1, o3 = shm.header.slot_offset(1), shm.header.slot_offset(3)
        shm.write_blocks([o1, o3], b"\x07" * BLOCK + b"\x09" * BLOCK)
        shm.write(shm.header.slot_offset(0), bytearray(b"\x05" * BLOCK))
        with pytest.raises(ValueError):
            shm.write(o1, b"short")
        with pytest.raises(ValueError):
            shm.write_blocks([o1], [b"\0" * BLOCK, b"\0" * BLOCK])
    data = path.read_bytes()
    assert data[4096 : 4096 + BLOCK] == b"\x05" * BLOCK
    assert data[4096 + STRIDE : 4096 + STRIDE + BLOCK] == b"\x07" * BLOCK
    assert data[4096 + 3 * STRIDE : 4096 + 3 * STRIDE + BLOCK] == b"\x09" * BLOCK
    # The padding between blocks is untouched.
    assert data[4096 + STRIDE + BLOCK : 4096 + 2 * STRIDE] == b"\xee" * (STRIDE - BLOCK)


def test_close_with_live_views_defers_the_unmap(tmp_path):
    path = tmp_path / "pool"
    make_pool(path)
    shm = SharedMemory(path)
    view = shm.block(shm.header.slot_offset(0))
    shm.close()  # must not raise while `view` is alive
    assert bytes(view) == b"\x01" * BLOCK
    with pytest.raises(ValueError):
        shm.block(shm.header.slot_offset(0))


def corrupt(raw: bytes, at: int, value: bytes, *, fix_checksum: bool) -> bytes:
    b = bytearray(raw)
    b[at : at + len(value)] = value
    if fix_checksum:
        b[64:72] = struct.pack("<Q", xxhash.xxh3_64_intdigest(bytes(b[:64])))
    return bytes(b)


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda r: corrupt(r, 0, b"NOTAPOOL", fix_checksum=True), "magic"),
        (lambda r: corrupt(r, 8, struct.pack("<I", 2), fix_checksum=True), "version 2"),
        (lambda r: corrupt(r, 16, struct.pack("<Q", BLOCK + 1), fix_checksum=False), "checksum"),
        (lambda r: corrupt(r, 12, struct.pack("<I", 512), fix_checksum=True), "header size"),
        (lambda r: corrupt(r, 48, struct.pack("<Q", BLOCK - 1), fix_checksum=True), "stride"),
        (lambda r: corrupt(r, 40, struct.pack("<Q", 0), fix_checksum=True), "slot count"),
        (lambda r: corrupt(r, 56, struct.pack("<Q", 100), fix_checksum=True), "overlaps"),
    ],
)
def test_bad_headers_are_refused(tmp_path, mutate, needle):
    path = tmp_path / "pool"
    make_pool(path, raw_header=mutate(header().encode()))
    with pytest.raises(ShmFormatError, match=needle):
        SharedMemory(path)


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = tmp_path / "pool"
    make_pool(path, truncate=1)
    with pytest.raises(ShmFormatError, match="truncated"):
        SharedMemory(path)
    path.write_bytes(b"tiny")
    with pytest.raises(ShmFormatError, match="no header"):
        SharedMemory(path)
    make_pool(path)
    with pytest.raises(ShmFormatError, match="expected 4096"):
        SharedMemory(path, block_bytes=4096)
    with pytest.raises(FileNotFoundError):
        SharedMemory(tmp_path / "missing")
    assert os.path.exists(path)
