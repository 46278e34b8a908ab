"""KVTCCodec: LMCache-layout KV tensors ``[2, L, T, H·D]`` to self-describing blobs and back.

Encode, per stream (K, V) of the tokens that are not stored exactly::

    keys: remove RoPE at their positions
    x (one vector of L·H·D per token) -> c = ((x - mean) / scale) @ basis -> per-block quantize -> symbols
    symbols grouped by width (int2 and int4 packed into bytes) -> raw DEFLATE chunks

Decode is the exact reverse and re-applies RoPE at the stored positions. Attention sinks
(sequence positions < ``sinks``) and the last ``window`` tokens are stored exactly.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from . import blob as wire
from .calibration import STREAMS, Calibration
from .entropy import CHUNK_SIZE, CODER_RAW_DEFLATE, DeflateCPU
from .entropy_gpu import DeflateNvcomp, select_coder
from .errors import CalibrationMismatchError, CorruptBlobError, ForeignBlobError, LayoutError
from .quantizer import FP16_MAX, dequantize, pack, packed_size, quantize, unpack
from .rope import RopeTable

CODE_WIDTHS = (2, 4, 8)


@dataclass
class _StreamLayout:
    """Index tensors derived from one stream's plan: which components go where."""

    rank: int
    n_blocks: int
    # per block size: component indices [nb, size], bits [nb], block ordinal [nb]
    groups: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    rows: dict[int, torch.Tensor]  # width -> component indices, ascending

    @classmethod
    def from_blocks(cls, blocks, device: torch.device) -> _StreamLayout:
        by_size: dict[int, list[tuple[int, int, int]]] = {}
        rows: dict[int, list[int]] = {w: [] for w in CODE_WIDTHS}
        for ordinal, block in enumerate(blocks):
            by_size.setdefault(block.size, []).append((block.start, block.bits, ordinal))
            rows[block.bits].extend(range(block.start, block.start + block.size))
        groups = []
        for size, members in sorted(by_size.items()):
            starts, bits, ordinals = (torch.tensor(col, device=device) for col in zip(*members, strict=True))
            groups.append((starts[:, None] + torch.arange(size, device=device), bits, ordinals))
        return cls(
            rank=max((b.start + b.size for b in blocks), default=0),
            n_blocks=len(blocks),
            groups=groups,
            rows={w: torch.tensor(r, dtype=torch.long, device=device) for w, r in rows.items()},
        )

    def section_size(self, tokens: int) -> int:
        """Bytes of side info and codes for ``tokens`` tokens."""
        side = 4 * self.n_blocks * tokens
        return side + sum(packed_size(len(self.rows[w]), tokens, w) for w in CODE_WIDTHS)


class KVTCCodec:
    """Encode/decode LMCache KV tensors with one calibration at one target ratio.

    ``decode`` accepts blobs of any plan of the same calibration; ``ratio`` only picks the
    plan ``encode`` uses.
    """

    def __init__(self, calibration: Calibration, device: str | torch.device = "cpu", ratio: float = 16,
                 coder: DeflateCPU | DeflateNvcomp | None = None):
        self.calibration = calibration
        self.device = torch.device(device)
        self.plan_id = calibration.plan_index(ratio)
        self.coder = coder or select_coder(self.device)
        self._bases = {s: calibration.streams[s].to(self.device) for s in STREAMS}
        self._layouts: dict[tuple[int, str], _StreamLayout] = {}

    @property
    def ratio(self) -> float:
        return self.calibration.plans[self.plan_id].ratio

    def _layout(self, plan_id: int, stream: str) -> _StreamLayout:
        key = (plan_id, stream)
        if key not in self._layouts:
            blocks = self.calibration.plans[plan_id].blocks[stream]
            self._layouts[key] = _StreamLayout.from_blocks(blocks, self.device)
        return self._layouts[key]

    # -- encode ---------------------------------------------------------------------------
    def encode(self, kv: torch.Tensor, start: int = 0, sinks: int = 4, window: int = 128, flags: int = 0) -> bytes:
        """Compress ``kv [2, L, T, H·D]`` (bf16/fp16) whose first token sits at position ``start``."""
        self._check_input(kv, start, sinks, window)
        tokens = kv.shape[2]
        head = min(max(sinks - start, 0), tokens)
        tail = min(window, tokens - head)
        middle = slice(head, tokens - tail)
        exact = torch.cat((kv[:, :, :head], kv[:, :, tokens - tail :]), dim=2)
        host = isinstance(self.coder, DeflateCPU)  # nvCOMP takes device tensors: symbols never leave the GPU
        sections = [exact.contiguous().view(torch.uint8).view(-1)]
        n = tokens - head - tail
        if n:
            positions = torch.arange(start + head, start + tokens - tail, device=self.device)
            features = self._features(kv[:, :, middle].to(self.device), positions)
            sections.append(torch.cat([self._encode_stream(s, features[i]) for i, s in enumerate(STREAMS)]))
        payload, index = self.coder.compress([_to_bytes(t) for t in sections] if host else sections)
        header = wire.BlobHeader(
            fingerprint=self.calibration.fingerprint, model_id=self.calibration.model_id, kv_size=2,
            dtype=kv.dtype, plan=self.plan_id, coder=CODER_RAW_DEFLATE, layers=kv.shape[1], tokens=tokens,
            hidden=kv.shape[3], exact_head=head, exact_tail=tail, start=start,
            payload_size=len(payload), payload_crc=zlib.crc32(payload), flags=flags, chunks=index,
        )
        return header.to_bytes() + payload

    def _check_input(self, kv: torch.Tensor, start: int, sinks: int, window: int) -> None:
        cal = self.calibration
        if not isinstance(kv, torch.Tensor):
            raise LayoutError(f"expected a torch.Tensor, got {type(kv).__name__}")
        if kv.dtype not in wire.DTYPE_CODES:
            raise LayoutError(f"KV dtype {kv.dtype} is not supported (bfloat16 or float16)")
        if kv.dim() != 4 or kv.shape[0] != 2 or kv.shape[1] != cal.layers or kv.shape[3] != cal.hidden:
            raise LayoutError(
                f"KV shape {tuple(kv.shape)} does not match [2, {cal.layers}, T, {cal.hidden}] of {cal.model_id}"
            )
        if not 0 < kv.shape[2] <= wire.MAX_TOKENS:
            raise LayoutError(f"token count {kv.shape[2]} out of range")
        if start < 0 or sinks < 0 or window < 0:
            raise LayoutError("start, sinks and window must be non-negative")

    def _features(self, kv: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        features = token_features(kv, positions, self.calibration.rope)
        if not torch.isfinite(features).all():
            raise LayoutError("KV contains NaN or infinity")
        return features

    def _encode_stream(self, stream: str, x: torch.Tensor) -> torch.Tensor:
        layout = self._layout(self.plan_id, stream)
        n = x.shape[0]
        coefficients = self._bases[stream].project(x, layout.rank)
        if coefficients.numel() and coefficients.abs().amax() >= FP16_MAX:
            raise LayoutError(f"{stream} coefficients exceed fp16 range: KV does not fit this calibration")
        shift = torch.empty(layout.n_blocks, n, dtype=torch.float16, device=self.device)
        scale = torch.empty_like(shift)
        codes = torch.zeros(layout.rank, n, dtype=torch.uint8, device=self.device)
        for components, bits, ordinals in layout.groups:
            q, lo, step = quantize(coefficients[:, components], bits)
            shift[ordinals], scale[ordinals] = lo.T, step.T
            codes[components.reshape(-1)] = q.reshape(n, -1).T
        parts = [torch.stack((shift, scale)).view(torch.uint8).reshape(-1)]
        parts += [pack(codes[layout.rows[w]], w).reshape(-1) for w in CODE_WIDTHS]
        return torch.cat(parts)

    def max_blob_size(self, tokens: int, exact_head: int = 0, exact_tail: int = 0, dtype=torch.bfloat16) -> int:
        """Upper bound of ``len(encode(...))`` for this plan and layout (DEFLATE worst case included).

        Depends only on the layout and the plan, as LMCache 0.5.6's fixed-size adapters need.
        """
        cal = self.calibration
        n = tokens - exact_head - exact_tail
        exact = 2 * cal.layers * (exact_head + exact_tail) * cal.hidden * dtype.itemsize
        stream = sum(self._layout(self.plan_id, s).section_size(n) for s in STREAMS) if n > 0 else 0
        chunks = -(-exact // CHUNK_SIZE) + -(-stream // CHUNK_SIZE)
        deflate_bound = exact + stream + chunks * (CHUNK_SIZE >> 12) + chunks * (64 + 16)
        return wire.header_size(len(cal.model_id.encode()), chunks) + deflate_bound

    # -- decode ---------------------------------------------------------------------------
    def decode(self, blob: bytes | bytearray | memoryview) -> torch.Tensor:
        """Reconstruct the ``[2, L, T, H·D]`` tensor; raises a :class:`CodecError` on any bad blob."""
        header, payload = wire.parse(blob)
        self._check_header(header)
        exact_bytes, stream_bytes = self._expected_sections(header)
        _check_chunks(header, exact_bytes, stream_bytes)
        if isinstance(self.coder, DeflateNvcomp):  # inflated straight into device memory
            buffer = self.coder.decompress_tensor(payload, header.chunks, exact_bytes + stream_bytes)
        else:
            data = self.coder.decompress(payload, header.chunks, exact_bytes + stream_bytes)
            buffer = torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
        out = torch.empty(2, header.layers, header.tokens, header.hidden, dtype=header.dtype, device=self.device)
        head, tail, n = header.exact_head, header.exact_tail, header.compressed_tokens
        exact = buffer[:exact_bytes].to(self.device).view(header.dtype)
        exact = exact.view(2, header.layers, head + tail, header.hidden)
        out[:, :, :head] = exact[:, :, :head]
        out[:, :, header.tokens - tail :] = exact[:, :, head:]
        if n:
            offset = exact_bytes
            features = []
            for stream in STREAMS:
                size = self._layout(header.plan, stream).section_size(n)
                section = buffer[offset : offset + size].to(self.device)
                features.append(self._decode_stream(header.plan, stream, section, n))
                offset += size
            keys, values = (f.reshape(n, header.layers, header.hidden).transpose(0, 1) for f in features)
            positions = torch.arange(header.start + head, header.start + head + n, device=self.device)
            out[0, :, head : head + n] = self.calibration.rope.rotate(keys, positions, header.dtype).to(header.dtype)
            out[1, :, head : head + n] = values.to(header.dtype)
        return out

    def _check_header(self, h: wire.BlobHeader) -> None:
        cal = self.calibration
        if h.fingerprint != cal.fingerprint:
            raise CalibrationMismatchError(
                f"blob was made with another calibration (model {h.model_id!r}, fingerprint {h.fingerprint.hex()}); "
                f"this codec uses {cal.model_id!r} {cal.fingerprint.hex()}"
            )
        if h.coder != CODER_RAW_DEFLATE or h.kv_size != 2:
            raise ForeignBlobError(f"unsupported coder {h.coder} / kv_size {h.kv_size}")
        if h.layers != cal.layers or h.hidden != cal.hidden or h.plan >= len(cal.plans):
            raise CorruptBlobError("blob layout or plan does not match its calibration")

    def _expected_sections(self, h: wire.BlobHeader) -> tuple[int, int]:
        exact = 2 * h.layers * (h.exact_head + h.exact_tail) * h.hidden * h.dtype.itemsize
        n = h.compressed_tokens
        stream = sum(self._layout(h.plan, s).section_size(n) for s in STREAMS) if n else 0
        return exact, stream

    def _decode_stream(self, plan_id: int, stream: str, data: torch.Tensor, n: int) -> torch.Tensor:
        layout = self._layout(plan_id, stream)
        side = 4 * layout.n_blocks * n
        shift, scale = data[:side].view(torch.float16).view(2, layout.n_blocks, n)
        codes = torch.zeros(layout.rank, n, dtype=torch.uint8, device=self.device)
        offset = side
        for w in CODE_WIDTHS:
            rows = layout.rows[w]
            size = packed_size(len(rows), n, w)
            if size:
                codes[rows] = unpack(data[offset : offset + size].view(len(rows), -1), w, n)
            offset += size
        coefficients = torch.zeros(n, layout.rank, device=self.device)
        for components, _bits, ordinals in layout.groups:
            values = dequantize(codes[components].permute(2, 0, 1), shift[ordinals].T, scale[ordinals].T)
            coefficients[:, components] = values
        if not torch.isfinite(coefficients).all():
            raise CorruptBlobError(f"{stream} side information decodes to non-finite values")
        return self._bases[stream].reconstruct(coefficients)


def token_features(kv: torch.Tensor, positions: torch.Tensor, rope: RopeTable) -> torch.Tensor:
    """``[2, T, p]`` fp32: de-rotated keys and values of ``kv [2, L, T, H·D]``, one L·H·D vector per token."""
    keys = rope.unrotate(kv[0], positions, kv.dtype)
    return torch.stack((keys, kv[1].float())).permute(0, 2, 1, 3).reshape(2, kv.shape[2], -1)


def _check_chunks(h: wire.BlobHeader, exact_bytes: int, stream_bytes: int) -> None:
    """The chunk index must cover exactly the sections the layout implies."""
    exact_chunks = -(-exact_bytes // CHUNK_SIZE)
    if sum(c.raw for c in h.chunks[:exact_chunks]) != exact_bytes or h.stream_size != exact_bytes + stream_bytes:
        raise CorruptBlobError(
            f"chunk index declares {h.stream_size} bytes; the layout implies {exact_bytes} + {stream_bytes}"
        )


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().cpu().numpy().tobytes()


