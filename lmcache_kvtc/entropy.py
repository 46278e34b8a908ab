"""Lossless stage: independent raw DEFLATE (RFC 1951) streams of at most 64 KiB each.

Raw DEFLATE per 64 KiB chunk is what nvCOMP's ``Deflate`` codec in RAW mode reads and
writes, so a blob made here decodes on a GPU and the reverse. The blob keeps its own index
(offset, compressed size, uncompressed size) since raw streams carry no sizes.

Every backend is an :class:`EntropyCoder`: the codec calls only ``compress`` and ``decompress_tensor``, so
a new backend is a new class (like :class:`DeflateCPU` here and ``entropy_gpu.DeflateNvcomp``) plus a line in
``entropy_gpu.select_coder``, never an edit to the codec.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .errors import CorruptBlobError

CHUNK_SIZE = 1 << 16
CODER_RAW_DEFLATE = 1
#: chunk starts are aligned so a GPU can decode them in place (nvCOMP wants ≥ 4 B; 16 B is safe).
CHUNK_ALIGNMENT = 16


@dataclass(frozen=True)
class ChunkEntry:
    offset: int  # from the start of the payload
    compressed: int
    raw: int


#: what a section to compress may be: host bytes, or a uint8 tensor on the coder's device
Section = bytes | bytearray | memoryview | torch.Tensor


class EntropyCoder(Protocol):
    """The lossless stage: sections -> raw DEFLATE chunks in the blob's container, and back on ``device``.

    Backends differ only in where the bytes are; a payload one writes, every other one reads."""

    device: torch.device

    def compress(self, sections: Sequence[Section]) -> tuple[bytes, list[ChunkEntry]]:
        """``(payload, chunk index)``; a chunk never spans two sections."""
        ...

    def decompress_tensor(self, payload: Section, index: list[ChunkEntry], total: int) -> torch.Tensor:
        """The ``total`` inflated bytes as a uint8 tensor on ``device``; ``CorruptBlobError`` if they are not."""
        ...


def check_index(index: list[ChunkEntry], payload_size: int, total: int | None = None) -> None:
    """The chunk index every reader trusts only after this: chunks in order, inside the payload, not
    overlapping, each inflating to 1..CHUNK_SIZE bytes (and to ``total`` together, when given)."""
    position = 0
    for i, c in enumerate(index):
        if c.offset < position or c.compressed <= 0 or c.offset + c.compressed > payload_size:
            raise CorruptBlobError(f"chunk {i} lies outside the payload")
        if not 0 < c.raw <= CHUNK_SIZE:
            raise CorruptBlobError(f"chunk {i} declares {c.raw} raw bytes")
        position = c.offset + c.compressed
    if total is not None and sum(c.raw for c in index) != total:
        raise CorruptBlobError(f"chunk index inflates to {sum(c.raw for c in index)} bytes, expected {total}")


class DeflateCPU:
    """zlib-compatible raw DEFLATE on the CPU.

    Huffman-only (no LZ77 matching) is the default: the symbols are nearly i.i.d. per
    component, where match finding costs time and gains nothing on real caches.
    """

    device = torch.device("cpu")

    def __init__(self, level: int = 1, strategy: int = zlib.Z_HUFFMAN_ONLY):
        self.level = level
        self.strategy = strategy

    def compress(self, sections: Sequence[Section]) -> tuple[bytes, list[ChunkEntry]]:
        """Compress each section in chunks of ≤ 64 KiB (a chunk never spans two sections).

        Keeping sections apart lets a report attribute compressed bytes to each of them.
        Returns (payload, index).
        """
        out = bytearray()
        index = []
        for section in sections:
            if isinstance(section, torch.Tensor):
                section = section.contiguous().cpu().numpy().tobytes()
            view = memoryview(section).cast("B")
            for begin in range(0, len(view), CHUNK_SIZE):
                raw = view[begin : begin + CHUNK_SIZE]
                coder = zlib.compressobj(self.level, zlib.DEFLATED, -15, 9, self.strategy)
                packed = coder.compress(raw) + coder.flush()
                out += bytes(-len(out) % CHUNK_ALIGNMENT)
                index.append(ChunkEntry(len(out), len(packed), len(raw)))
                out += packed
        return bytes(out), index

    def decompress_tensor(self, payload: Section, index: list[ChunkEntry], total: int) -> torch.Tensor:
        if isinstance(payload, torch.Tensor):
            payload = memoryview(payload.contiguous().cpu().numpy())
        data = self.decompress(payload, index, total)
        return torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)

    @staticmethod
    def decompress(payload: memoryview, index: list[ChunkEntry], total: int) -> bytearray:
        """Inflate every chunk into one buffer of ``total`` bytes, never past declared sizes."""
        out = bytearray(total)
        position = 0
        for entry in index:
            coder = zlib.decompressobj(-15)
            try:
                raw = coder.decompress(payload[entry.offset : entry.offset + entry.compressed], entry.raw)
            except zlib.error as exc:
                raise CorruptBlobError(f"chunk at payload offset {entry.offset} does not inflate: {exc}") from exc
            if len(raw) != entry.raw or not coder.eof or coder.unconsumed_tail or coder.unused_data:
                raise CorruptBlobError(f"chunk at payload offset {entry.offset} inflates to the wrong size")
            out[position : position + entry.raw] = raw
            position += entry.raw
        return out
