"""The KVTC blob: a self-describing, versioned, little-endian container.

Wire format (version 2), all integers little-endian::

    offset size  field
    0      4     magic b"KVTC"
    4      2     format version (2)
    6      2     flags: bit0 PADDED (zero bytes may follow the payload, up to a fixed size)
                        bit1 START_ESTIMATED (``start`` was inferred from the data, not given)
    8      4     header_size: bytes from offset 0 to the end of the header CRC
    12     16    calibration fingerprint
    28     1     kv_size (2: K and V)
    29     1     dtype (1 bfloat16, 2 float16)
    30     1     plan index in the calibration's ladder
    31     1     coder (1 raw DEFLATE chunks)
    32     4     layers
    36     4     tokens
    40     4     hidden (kv_heads × head_dim)
    44     4     exact_head: leading tokens stored exactly (attention sinks)
    48     4     exact_tail: trailing tokens stored exactly (recent window)
    52     8     start: sequence position of the first token (0 ≤ start, start + tokens ≤ 2^40)
    60     4     n_chunks
    64     8     payload_size (bytes after the header)
    72     4     CRC32 of the payload
    76     2     model_id length m
    78     2     reserved (0)
    80     m     model id (UTF-8)
    80+m   16·n  chunk index: per chunk u64 offset (in the payload), u32 compressed, u32 raw size
    ...    4     CRC32 of every header byte before it

The payload is the chunks (each start 16-byte aligned). Their concatenated inflated bytes
are the *symbol stream*: exact tokens, then per stream (K, V) the plan's symbols (see
:mod:`.quantizer`); its size follows from the layout and the plan, which the decoder checks
before inflating. Version 1 (per-token min/max blocks) is refused as :class:`ForeignBlobError`.
:func:`parse` checks everything structural before any allocation; :func:`extent` is the bytes a blob declares
(what follows is padding, or an LMCache adapter's slack).

Group container (an LMCache object of several kernel groups; one group is a bare blob), little-endian::

    offset size  field
    0      4     magic b"KVTG"
    4      2     version (1)
    6      2     n: groups
    8      8·n   per group u64 length of its blob
    8+8n   ...   the n blobs, in order (:func:`pack_groups`, :func:`split_groups`)
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

import torch

from .entropy import ChunkEntry, check_index
from .errors import CorruptBlobError, ForeignBlobError, TruncatedBlobError

MAGIC = b"KVTC"
VERSION = 2
FLAG_PADDED = 1
FLAG_START_ESTIMATED = 2
_KNOWN_FLAGS = FLAG_PADDED | FLAG_START_ESTIMATED

_FIXED = struct.Struct("<4sHHI16sBBBBIIIIIqIQIHH")
_CHUNK = struct.Struct("<QII")
_CRC = struct.Struct("<I")
_GROUP_HEADER = struct.Struct("<4sHH")
_GROUP_LENGTH = struct.Struct("<Q")
GROUP_MAGIC = b"KVTG"
MAX_HEADER_SIZE = 1 << 20
MAX_TOKENS = 1 << 22
#: positions beyond any model's context; keeps ``start + tokens`` far from int64 overflow in the decoder
MAX_POSITION = 1 << 40

DTYPE_CODES = {torch.bfloat16: 1, torch.float16: 2}
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


@dataclass
class BlobHeader:
    fingerprint: bytes
    model_id: str
    kv_size: int
    dtype: torch.dtype
    plan: int
    coder: int
    layers: int
    tokens: int
    hidden: int
    exact_head: int
    exact_tail: int
    start: int
    payload_size: int = 0
    payload_crc: int = 0
    flags: int = 0
    chunks: list[ChunkEntry] = field(default_factory=list)

    @property
    def compressed_tokens(self) -> int:
        return self.tokens - self.exact_head - self.exact_tail

    @property
    def exact_bytes(self) -> int:
        """Bytes of the exactly stored tokens, the symbol stream's first section."""
        return exact_size(self.layers, self.exact_head + self.exact_tail, self.hidden, self.dtype)

    @property
    def stream_size(self) -> int:
        """Bytes of the inflated symbol stream."""
        return sum(c.raw for c in self.chunks)

    def to_bytes(self) -> bytes:
        model = self.model_id.encode()
        fixed = _FIXED.pack(
            MAGIC, VERSION, self.flags, header_size(len(model), len(self.chunks)), self.fingerprint,
            self.kv_size, DTYPE_CODES[self.dtype], self.plan, self.coder, self.layers, self.tokens,
            self.hidden, self.exact_head, self.exact_tail, self.start, len(self.chunks),
            self.payload_size, self.payload_crc, len(model), 0,
        )
        body = fixed + model + b"".join(_CHUNK.pack(c.offset, c.compressed, c.raw) for c in self.chunks)
        return body + _CRC.pack(zlib.crc32(body))


def header_size(model_id_bytes: int, n_chunks: int) -> int:
    return _FIXED.size + model_id_bytes + _CHUNK.size * n_chunks + _CRC.size


def exact_size(layers: int, tokens: int, hidden: int, dtype: torch.dtype) -> int:
    """Raw bytes of ``tokens`` exactly stored tokens (K and V of every layer)."""
    return 2 * layers * tokens * hidden * dtype.itemsize


def extent(data: bytes | bytearray | memoryview) -> int:
    """Bytes of header + payload a blob declares, at most ``len(data)``; ``len(data)`` for anything without a
    blob's fixed header, so that :func:`parse` gives the precise error. Nothing is validated here."""
    view = memoryview(data).cast("B")
    if len(view) < _FIXED.size or bytes(view[:4]) != MAGIC:
        return len(view)
    fields = _FIXED.unpack_from(view)
    size, payload_size = fields[3], fields[16]
    return min(len(view), size + payload_size)


def group_header_size(groups: int) -> int:
    """Bytes the group container adds to an object of ``groups`` kernel groups (none for one)."""
    return 0 if groups == 1 else _GROUP_HEADER.size + _GROUP_LENGTH.size * groups


def pack_groups(blobs: list[bytes]) -> bytes:
    """One stored object of one blob per kernel group: the blob itself, or a group container."""
    if len(blobs) == 1:
        return blobs[0]
    lengths = b"".join(_GROUP_LENGTH.pack(len(b)) for b in blobs)
    return _GROUP_HEADER.pack(GROUP_MAGIC, 1, len(blobs)) + lengths + b"".join(blobs)


def split_groups(data: memoryview, groups: int) -> list[memoryview]:
    """The blob(s) of a stored object of ``groups`` kernel groups; a single blob is cut to its :func:`extent`.
    ``CorruptBlobError`` for a container that does not hold exactly ``groups`` blobs within ``data``."""
    if groups == 1:
        return [data[: extent(data)]]
    if len(data) < _GROUP_HEADER.size or bytes(data[:4]) != GROUP_MAGIC:
        raise CorruptBlobError("multi-group kvtc object without its group header")
    _, version, count = _GROUP_HEADER.unpack_from(data)
    if version != 1 or count != groups:
        raise CorruptBlobError(f"group header declares {count} groups (version {version}); expected {groups}")
    offset = group_header_size(count)
    if offset > len(data):
        raise CorruptBlobError("group header extends past the stored object")
    out = []
    for i in range(count):
        (length,) = _GROUP_LENGTH.unpack_from(data, _GROUP_HEADER.size + _GROUP_LENGTH.size * i)
        if offset + length > len(data):
            raise CorruptBlobError(f"group {i} extends past the stored object")
        out.append(data[offset : offset + length])
        offset += length
    return out


def parse(blob: bytes | bytearray | memoryview) -> tuple[BlobHeader, memoryview]:
    """Validate the container and return its header and payload; raises a ``CodecError``."""
    view = memoryview(blob).cast("B")
    if len(view) < 4 or bytes(view[:4]) != MAGIC:
        raise ForeignBlobError("not a KVTC blob (bad magic)")
    if len(view) < _FIXED.size:
        raise TruncatedBlobError(f"blob of {len(view)} bytes is shorter than the {_FIXED.size}-byte header")
    (_, version, flags, size, fingerprint, kv_size, dtype, plan, coder, layers, tokens, hidden,
     exact_head, exact_tail, start, n_chunks, payload_size, payload_crc, model_len, reserved) = _FIXED.unpack_from(view)
    if version != VERSION:
        raise ForeignBlobError(f"KVTC blob format version {version}; this code reads version {VERSION}")
    if size > MAX_HEADER_SIZE or size != header_size(model_len, n_chunks):
        raise CorruptBlobError("header size field is inconsistent")
    if len(view) < size:
        raise TruncatedBlobError(f"blob of {len(view)} bytes ends inside its {size}-byte header")
    (stored_crc,) = _CRC.unpack_from(view, size - _CRC.size)
    if zlib.crc32(view[: size - _CRC.size]) != stored_crc:
        raise CorruptBlobError("header CRC mismatch")
    if flags & ~_KNOWN_FLAGS or reserved or dtype not in DTYPES:
        raise ForeignBlobError("blob uses flags or a dtype this version does not know")
    try:
        model_id = bytes(view[_FIXED.size : _FIXED.size + model_len]).decode()
    except UnicodeDecodeError as exc:
        raise CorruptBlobError("model id is not UTF-8") from exc
    chunks = [ChunkEntry(*_CHUNK.unpack_from(view, _FIXED.size + model_len + i * _CHUNK.size)) for i in range(n_chunks)]
    header = BlobHeader(fingerprint, model_id, kv_size, DTYPES[dtype], plan, coder, layers, tokens, hidden,
                        exact_head, exact_tail, start, payload_size, payload_crc, flags, chunks)
    _check_sizes(header)
    end = size + payload_size
    if len(view) < end:
        raise TruncatedBlobError(f"blob of {len(view)} bytes is shorter than header + payload ({end})")
    if len(view) > end and (not flags & FLAG_PADDED or view[end:].tobytes().strip(b"\0")):
        raise CorruptBlobError(f"{len(view) - end} unexpected bytes after the payload")
    payload = view[size:end]
    if zlib.crc32(payload) != payload_crc:
        raise CorruptBlobError("payload CRC mismatch")
    return header, payload


def _check_sizes(h: BlobHeader) -> None:
    if h.tokens > MAX_TOKENS or h.exact_head + h.exact_tail > h.tokens:
        raise CorruptBlobError(f"implausible token counts ({h.tokens} tokens, {h.exact_head}+{h.exact_tail} exact)")
    if not 0 <= h.start <= MAX_POSITION - h.tokens:
        raise CorruptBlobError(f"implausible start position {h.start}")
    check_index(h.chunks, h.payload_size)
