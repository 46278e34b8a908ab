"""Lossless stage: independent raw DEFLATE (RFC 1951) streams of at most 64 KiB each.

Raw DEFLATE per 64 KiB chunk is what nvCOMP's ``Deflate`` codec in RAW mode reads and
writes, so a blob made here decodes on a GPU and the reverse. The blob keeps its own index
(offset, compressed size, uncompressed size) since raw streams carry no sizes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

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

    def __init__(self, level: int = 1, strategy: int = zlib.Z_HUFFMAN_ONLY):
        self.level = level
        self.strategy = strategy

    def compress(self, sections: list[bytes]) -> tuple[bytes, list[ChunkEntry]]:
        """Compress each section in chunks of ≤ 64 KiB (a chunk never spans two sections).

        Keeping sections apart lets a report attribute compressed bytes to each of them.
        Returns (payload, index).
        """
        out = bytearray()
        index = []
        for section in sections:
            view = memoryview(section).cast("B")
            for begin in range(0, len(view), CHUNK_SIZE):
                raw = view[begin : begin + CHUNK_SIZE]
                coder = zlib.compressobj(self.level, zlib.DEFLATED, -15, 9, self.strategy)
                packed = coder.compress(raw) + coder.flush()
                out += bytes(-len(out) % CHUNK_ALIGNMENT)
                index.append(ChunkEntry(len(out), len(packed), len(raw)))
                out += packed
        return bytes(out), index

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
