"""The server's shared-memory host tier, mapped into this process.

A server started with a shared-memory host tier (``--shm-path``) keeps its
host-RAM blocks in one file (for instance under ``/dev/shm``); a local
client whose tenant may map it (``Info.shm_path`` is non-empty) reads leased
blocks in place and writes new blocks in place, so block bytes never cross
the socket:

- read: ``Client.lookup(..., lease_ms=...)`` then ``Client.load_shm(lease)``
  gives file offsets; :meth:`SharedMemory.blocks` turns them into zero-copy
  ``memoryview`` objects (valid while the lease lives: after it ends the
  slot may be reused for another block);
- write: ``Client.reserve_shm(pages)`` gives offsets of reserved slots;
  :meth:`SharedMemory.write_blocks` copies the blocks in; then
  ``Client.commit_shm`` makes them cached pages (``Client.store_shm`` does
  all three).

File format (version 1), all integers little-endian, a header page of
4096 bytes:

======  ====  ==========================================================
offset  size  field
======  ====  ==========================================================
0       8     magic ``RDXKVHST``
8       4     format version (1)
12      4     header size in bytes (4096)
16      8     ``block_bytes``
24      8     ``max_meta_bytes``
32      8     ``layout_digest``
40      8     slot count
48      8     slot stride (bytes from one slot to the next, >= block_bytes)
56      8     data offset (where slot 0 starts)
64      8     XXH3-64 of bytes 0..64
======  ====  ==========================================================

Slot ``i`` is the ``block_bytes`` bytes at ``data offset + i * stride``.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import xxhash

__all__ = [
    "SHM_MAGIC",
    "SHM_FORMAT_VERSION",
    "SHM_HEADER_BYTES",
    "ShmFormatError",
    "ShmHeader",
    "SharedMemory",
]

SHM_MAGIC = b"RDXKVHST"
SHM_FORMAT_VERSION = 1
SHM_HEADER_BYTES = 4096
#: Header bytes covered by the checksum; the checksum (u64) follows them.
_CHECKED = 64
_U32_MAX = 0xFFFF_FFFF

BytesLike = Union[bytes, bytearray, memoryview]


class ShmFormatError(ValueError):
    """The file is not a radixkv shared-memory pool of a format this client
    reads: bad magic, another version, a checksum mismatch, truncated..."""


@dataclass(frozen=True)
class ShmHeader:
    """The decoded header of a shared-memory pool file."""

    block_bytes: int
    max_meta_bytes: int
    layout_digest: int
    slots: int
    stride: int
    data_offset: int
    header_bytes: int = SHM_HEADER_BYTES

    def slot_offset(self, slot: int) -> int:
        """File offset of slot ``slot``'s block."""
        if not 0 <= slot < self.slots:
            raise IndexError(f"slot {slot} out of range (the pool has {self.slots})")
        return self.data_offset + slot * self.stride

    def check_offset(self, offset: int) -> int:
        """``offset`` if it is the start of a slot, else ``ValueError``;
        returns the slot number."""
        rel = offset - self.data_offset
        if rel < 0 or rel % self.stride or rel // self.stride >= self.slots:
            raise ValueError(f"offset {offset} is not the start of a slot")
        return rel // self.stride

    def encode(self) -> bytes:
        """The checked part of the header and its checksum (72 bytes); a
        file's header page is this, zero-padded to ``header_bytes``."""
        head = SHM_MAGIC + struct.pack(
            "<II6Q",
            SHM_FORMAT_VERSION,
            self.header_bytes,
            self.block_bytes,
            self.max_meta_bytes,
            self.layout_digest,
            self.slots,
            self.stride,
            self.data_offset,
        )
        return head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head))

    @classmethod
    def decode(cls, data: BytesLike, file_len: Optional[int] = None) -> "ShmHeader":
        """Parses and checks a header; ``file_len``, when given, is the size of
        the file it came from (every slot must lie inside it). Raises
        :class:`ShmFormatError` saying what is wrong."""
        data = bytes(data[: _CHECKED + 8])
        if len(data) < _CHECKED + 8:
            raise ShmFormatError(f"{len(data)} bytes are too short for a header")
        if data[:8] != SHM_MAGIC:
            raise ShmFormatError("not a radixkv host pool (bad magic)")
        version, header_bytes = struct.unpack_from("<II", data, 8)
        if version != SHM_FORMAT_VERSION:
            raise ShmFormatError(f"format version {version}, this client reads {SHM_FORMAT_VERSION}")
        (checksum,) = struct.unpack_from("<Q", data, _CHECKED)
        if checksum != xxhash.xxh3_64_intdigest(data[:_CHECKED]):
            raise ShmFormatError("header checksum mismatch (corrupt header)")
        if header_bytes != SHM_HEADER_BYTES:
            raise ShmFormatError(f"header size {header_bytes}, this format's is {SHM_HEADER_BYTES}")
        block_bytes, max_meta, digest, slots, stride, data_offset = struct.unpack_from("<6Q", data, 16)
        if block_bytes == 0:
            raise ShmFormatError("block size 0")
        if slots == 0 or slots >= _U32_MAX:
            raise ShmFormatError(f"bad slot count {slots}")
        if stride < block_bytes:
            raise ShmFormatError(f"slot stride {stride} is below the block size {block_bytes}")
        if data_offset < header_bytes:
            raise ShmFormatError(f"data offset {data_offset} overlaps the header of {header_bytes} bytes")
        end = data_offset + slots * stride
        if file_len is not None and end > file_len:
            raise ShmFormatError(
                f"file of {file_len} bytes is shorter than its {end} bytes of slots (truncated)"
            )
        return cls(block_bytes, max_meta, digest, slots, stride, data_offset, header_bytes)


class SharedMemory:
    """A mapping of the server's shared-memory pool file.

    Open it with the path from ``Client.info().shm_path`` (or
    ``Client.open_shm()``). Read-only by default; ``writable=True`` maps it
    shared and writable, for ``reserve_shm`` / ``commit_shm`` stores.

    Views returned by :meth:`block` and :meth:`blocks` share the mapping:
    the mapping is unmapped only when :meth:`close` has been called *and*
    every view is gone (release them with ``memoryview.release()`` or drop
    them). Use as a context manager.
    """

    def __init__(
        self,
        path: Union[str, "os.PathLike[str]"],
        *,
        writable: bool = False,
        block_bytes: Optional[int] = None,
    ) -> None:
        self.path = os.fspath(path)
        self.writable = writable
        with open(self.path, "r+b" if writable else "rb") as f:
            file_len = os.fstat(f.fileno()).st_size
            if file_len < SHM_HEADER_BYTES:
                raise ShmFormatError(f"shared-memory pool {self.path}: file of {file_len} bytes holds no header")
            access = mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ
            # The mapping outlives the file object (mmap dups the descriptor).
            self._map: Optional[mmap.mmap] = mmap.mmap(f.fileno(), file_len, access=access)
        try:
            self.header = ShmHeader.decode(self._map[:SHM_HEADER_BYTES], file_len)
        except ShmFormatError as e:
            self._map.close()
            raise ShmFormatError(f"shared-memory pool {self.path}: {e}") from None
        if block_bytes is not None and block_bytes != self.header.block_bytes:
            self._map.close()
            raise ShmFormatError(
                f"shared-memory pool {self.path}: blocks of {self.header.block_bytes} bytes, "
                f"expected {block_bytes}"
            )
        self._view: Optional[memoryview] = memoryview(self._map)

    # -- geometry ---------------------------------------------------------

    @property
    def block_bytes(self) -> int:
        return self.header.block_bytes

    @property
    def slot_count(self) -> int:
        return self.header.slots

    @property
    def slot_stride(self) -> int:
        return self.header.stride

    @property
    def data_offset(self) -> int:
        return self.header.data_offset

    # -- access -----------------------------------------------------------

    def _mapped(self) -> memoryview:
        if self._view is None:
            raise ValueError(f"shared-memory pool {self.path} is closed")
        return self._view

    def block(self, offset: int) -> memoryview:
        """The block at file ``offset`` (a slot's start, as ``load_shm`` and
        ``reserve_shm`` give them), in place: no copy. Read-only unless the
        mapping is writable."""
        view = self._mapped()
        self.header.check_offset(offset)
        return view[offset : offset + self.header.block_bytes]

    def blocks(self, offsets: Sequence[int]) -> List[memoryview]:
        """:meth:`block` for each offset."""
        return [self.block(o) for o in offsets]

    def read(self, offset: int) -> bytes:
        """A copy of the block at ``offset``."""
        return bytes(self.block(offset))

    def write(self, offset: int, data: BytesLike) -> None:
        """Copies one whole block into the slot at ``offset`` (one that
        ``reserve_shm`` reserved for this client)."""
        if not self.writable:
            raise ValueError(f"shared-memory pool {self.path} is mapped read-only (open it writable=True)")
        src = memoryview(data).cast("B")
        if src.nbytes != self.header.block_bytes:
            raise ValueError(f"a block is {self.header.block_bytes} bytes, got {src.nbytes}")
        self.block(offset)[:] = src

    def write_blocks(self, offsets: Sequence[int], blocks: Union[BytesLike, Sequence[BytesLike]]) -> None:
        """Writes one block per offset; ``blocks`` is either one buffer of
        ``len(offsets) * block_bytes`` bytes or a sequence of blocks."""
        bb = self.header.block_bytes
        if isinstance(blocks, (bytes, bytearray, memoryview)):
            src = memoryview(blocks).cast("B")
            if src.nbytes != len(offsets) * bb:
                raise ValueError(f"{len(offsets)} blocks of {bb} bytes are {len(offsets) * bb} bytes, got {src.nbytes}")
            parts: Sequence[BytesLike] = [src[i * bb : (i + 1) * bb] for i in range(len(offsets))]
        else:
            parts = blocks
            if len(parts) != len(offsets):
                raise ValueError(f"{len(parts)} blocks for {len(offsets)} slots")
        for off, part in zip(offsets, parts):
            self.write(off, part)

    # -- life cycle ---------------------------------------------------------

    def close(self) -> None:
        """Unmaps the file, or, while views of it are still alive, lets the
        last of them unmap it."""
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # views alive: unmapped when the last one is collected
            self._map = None

    @property
    def closed(self) -> bool:
        return self._view is None

    def __enter__(self) -> "SharedMemory":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        h = self.header
        return (
            f"SharedMemory({self.path!r}, slots={h.slots}, block_bytes={h.block_bytes}, "
            f"stride={h.stride}, writable={self.writable})"
        )
