"""KVTCCodec: LMCache-layout KV tensors ``[2, L, T, H·D]`` to self-describing blobs and back.

Encode, per stream (K, V) of the tokens that are not stored exactly::

    keys: remove RoPE at their positions
    x (one vector of L·H·D per token) -> c = ((x - mean) / scale) @ basis -> round(c / step) -> symbols
    symbols, component-major (int8, int16 for the leading components that need it) -> raw DEFLATE chunks

Decode is the exact reverse and re-applies RoPE at the stored positions. Attention sinks
(sequence positions < ``sinks``) and the last ``window`` tokens are stored exactly.
"""

from __future__ import annotations

import operator
import zlib
from dataclasses import dataclass

import torch

from . import blob as wire
from .calibration import STREAMS, Calibration
from .defaults import SINKS, WINDOW
from .entropy import CHUNK_ALIGNMENT, CHUNK_SIZE, CODER_RAW_DEFLATE, EntropyCoder
from .entropy_gpu import select_coder
from .errors import CalibrationMismatchError, CorruptBlobError, ForeignBlobError, LayoutError
from .quantizer import WIDE_LIMIT, dequantize, quantize, section_size
from .rope import RopeTable

#: how much more than on held-out text a chunk's symbols may take within :meth:`KVTCCodec.typical_size`
TYPICAL_MARGIN = 1.25


@dataclass
class _Chunk:
    """One tensor ready to be coded with any plan (see :meth:`KVTCCodec._prepare`)."""

    shape: torch.Size
    dtype: torch.dtype
    start: int
    head: int
    tail: int
    exact: torch.Tensor  # uint8 bytes of the exact tokens
    coefficients: dict[str, torch.Tensor]  # stream -> [tokens, full rank] fp32; empty if no token is coded


class KVTCCodec:
    """Encode/decode LMCache KV tensors with one calibration.

    Two ways to encode: :meth:`encode` codes with one plan of the calibration's ladder (``plan`` is its index,
    e.g. ``calibration.plan_index(16)``); :meth:`encode_within` codes with the finest plan whose blob fits a byte
    budget (rate control, what the LMCache serde does). :meth:`decode` reads any blob of the calibration.
    """

    def __init__(self, calibration: Calibration, device: str | torch.device = "cpu",
                 coder: EntropyCoder | None = None):
        self.calibration = calibration
        self.device = torch.device(device)
        self.coder = coder or select_coder(self.device)
        self._bases = {s: calibration.streams[s].to(self.device) for s in STREAMS}
        self._finest_first = sorted(range(len(calibration.plans)), key=lambda p: calibration.plans[p].ratio)

    def _section_size(self, plan: int, tokens: int) -> int:
        """Bytes of both streams' symbols for ``tokens`` coded tokens."""
        rung = self.calibration.plans[plan]
        return sum(section_size(rung.rank(s), rung.streams[s].wide, tokens) for s in STREAMS)

    # -- encode ---------------------------------------------------------------------------
    def encode(self, kv: torch.Tensor, *, plan: int, start: int = 0, sinks: int = SINKS, window: int = WINDOW,
               flags: int = 0) -> bytes:
        """Compress ``kv [2, L, T, H·D]`` (bf16/fp16), whose first token sits at position ``start``, with plan
        ``plan`` (an index of ``calibration.plans``). Positions ``< sinks`` and the last ``window`` tokens are
        stored exactly."""
        plan = self._check_plan(plan)
        self._check_input(kv, start, sinks, window)
        return self._blob(self._prepare(kv, start, sinks, window), plan, flags)

    def encode_within(self, kv: torch.Tensor, *, budget: int, start: int = 0, sinks: int = SINKS,
                      window: int = WINDOW, flags: int = 0) -> bytes:
        """Like :meth:`encode`, rate-controlled: the finest plan of the ladder whose entropy-coded blob fits in
        ``budget`` bytes, found by trial encodes (its id is in the header); :class:`LayoutError` if not even the
        coarsest plan fits."""
        self._check_input(kv, start, sinks, window)
        return self._blob_within(self._prepare(kv, start, sinks, window), budget, flags)

    def _prepare(self, kv: torch.Tensor, start: int, sinks: int, window: int) -> _Chunk:
        """What every plan codes the same way: the exact tokens' bytes and each stream's PCA coefficients.

        Coefficients are projected at the basis' full rank whatever the plan, so a chunk codes to the same bytes
        at a given plan with or without rate control (a plan's rank is a slice of the same matmul).
        """
        tokens = kv.shape[2]
        head = min(max(sinks - start, 0), tokens)
        tail = min(window, tokens - head)
        exact = torch.cat((kv[:, :, :head], kv[:, :, tokens - tail :]), dim=2)
        if not torch.isfinite(exact).all():  # decode refuses non-finite KV: never store what cannot come back
            raise LayoutError("KV contains NaN or infinity")
        coefficients = {}
        if tokens - head - tail:
            positions = torch.arange(start + head, start + tokens - tail, device=self.device)
            features = self._features(kv[:, :, head : tokens - tail].to(self.device), positions)
            for i, stream in enumerate(STREAMS):
                coefficients[stream] = self._bases[stream].project(features[i])
        return _Chunk(kv.shape, kv.dtype, start, head, tail, exact.contiguous().view(torch.uint8).view(-1),
                      coefficients)

    def _blob(self, chunk: _Chunk, plan: int, flags: int) -> bytes:
        sections = [chunk.exact]  # tensors on the codec's device: on a GPU the symbols never leave it
        if chunk.coefficients:
            sections.append(torch.cat([self._encode_stream(plan, s, chunk.coefficients[s]) for s in STREAMS]))
        payload, index = self.coder.compress(sections)
        _, layers, tokens, hidden = chunk.shape
        header = wire.BlobHeader(
            fingerprint=self.calibration.fingerprint, model_id=self.calibration.model_id, kv_size=2,
            dtype=chunk.dtype, plan=plan, coder=CODER_RAW_DEFLATE, layers=layers, tokens=tokens,
            hidden=hidden, exact_head=chunk.head, exact_tail=chunk.tail, start=chunk.start,
            payload_size=len(payload), payload_crc=zlib.crc32(payload), flags=flags, chunks=index,
        )
        return header.to_bytes() + payload

    def _blob_within(self, chunk: _Chunk, budget: int, flags: int) -> bytes:
        """The blob of the finest plan that fits in ``budget`` bytes.

        The first trial is the finest plan whose blob the calibration expects to fit (its entropy-coded
        bits per token on held-out text); from there the search steps to finer plans while they fit, or to
        coarser ones until one does. Typically two or three trial encodes.
        """
        order = self._finest_first
        n = chunk.shape[2] - chunk.head - chunk.tail
        expected = [self._expected_size(chunk, p, n) for p in order]
        i = next((k for k, size in enumerate(expected) if size <= budget), len(order) - 1)
        blob = self._blob(chunk, order[i], flags)
        if len(blob) <= budget:
            while i > 0:
                finer = self._blob(chunk, order[i - 1], flags)
                if len(finer) > budget:
                    break
                blob, i = finer, i - 1
            return blob
        for plan in order[i + 1 :]:
            blob = self._blob(chunk, plan, flags)
            if len(blob) <= budget:
                return blob
        raise LayoutError(f"no plan of the calibration fits a {tuple(chunk.shape)} chunk in {budget} bytes")

    def _expected_size(self, chunk: _Chunk, plan: int, n: int) -> float:
        """Blob size of ``plan`` if the symbols code as they did on held-out text (exact tokens raw)."""
        stream = n * sum(self.calibration.plans[plan].bits_per_token(s) for s in STREAMS) / 8
        chunks = -(-chunk.exact.numel() // CHUNK_SIZE) + -(-self._section_size(plan, n) // CHUNK_SIZE)
        return wire.header_size(len(self.calibration.model_id.encode()), chunks) + chunk.exact.numel() + stream

    def _check_plan(self, plan: int) -> int:
        """``plan`` as an int index of the ladder (numpy and torch integers too), or a clear ``LayoutError``."""
        try:
            index = operator.index(plan) if not isinstance(plan, bool) else -1
        except TypeError:
            index = -1
        if not 0 <= index < len(self.calibration.plans):
            raise LayoutError(f"plan must be an index of the calibration's {len(self.calibration.plans)} plans "
                              f"(calibration.plan_index(ratio) finds one), got {plan!r}")
        return index

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
        if start + kv.shape[2] > wire.MAX_POSITION:
            raise LayoutError(f"positions up to {start + kv.shape[2]} exceed {wire.MAX_POSITION}")

    def _features(self, kv: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        features = token_features(kv, positions, self.calibration.rope)
        if not torch.isfinite(features).all():
            raise LayoutError("KV contains NaN or infinity")
        return features

    def _encode_stream(self, plan: int, stream: str, coefficients: torch.Tensor) -> torch.Tensor:
        q = self.calibration.plans[plan].streams[stream]
        kept = coefficients[:, : q.rank]
        if kept.numel() and kept.abs().amax() > WIDE_LIMIT * q.step:
            raise LayoutError(f"{stream} coefficients exceed the symbol range: KV does not fit this calibration")
        return quantize(kept, q.step, q.wide)

    def max_blob_size(self, tokens: int, plan: int, *, exact_head: int = 0, exact_tail: int = 0,
                      dtype: torch.dtype = torch.bfloat16) -> int:
        """Upper bound of ``len(encode(...))`` for a plan and layout, DEFLATE worst case included (its symbols
        at one byte each: ~4× what they typically code to). Depends only on the layout and the plan."""
        plan = self._check_plan(plan)
        cal = self.calibration
        n = tokens - exact_head - exact_tail
        exact, exact_chunks = _deflate_bound(wire.exact_size(cal.layers, exact_head + exact_tail, cal.hidden, dtype))
        stream, stream_chunks = _deflate_bound(self._section_size(plan, n) if n > 0 else 0)
        return wire.header_size(len(cal.model_id.encode()), exact_chunks + stream_chunks) + exact + stream

    def typical_size(self, tokens: int, plan: int, *, exact_head: int = 0, dtype: torch.dtype = torch.bfloat16,
                     margin: float = TYPICAL_MARGIN) -> int:
        """A budget ``plan`` fits in on KV like the calibration's: exact tokens at DEFLATE's worst case, symbols
        at ``margin`` × what they took on held-out text (entropy-coded symbols have no useful worst case: the
        bound of :meth:`max_blob_size` is ~4× their typical size). A chunk that still does not fit is refused."""
        plan = self._check_plan(plan)
        cal = self.calibration
        head = min(exact_head, tokens)
        exact, exact_chunks = _deflate_bound(wire.exact_size(cal.layers, head, cal.hidden, dtype))
        symbols = margin * (tokens - head) * sum(cal.plans[plan].bits_per_token(s) for s in STREAMS) / 8
        stream_chunks = -(-self._section_size(plan, tokens - head) // CHUNK_SIZE)
        return (wire.header_size(len(cal.model_id.encode()), exact_chunks + stream_chunks) + exact
                + int(symbols) + stream_chunks * CHUNK_ALIGNMENT)

    # -- decode ---------------------------------------------------------------------------
    def decode(self, blob: bytes | bytearray | memoryview, tokens: int | None = None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
        """Reconstruct the ``[2, L, T, H·D]`` tensor; raises a :class:`CodecError` on any bad blob.

        ``tokens`` / ``dtype``: what the caller expects, checked before anything is allocated. Give them for
        blobs from shared storage: otherwise a forged header may make decode allocate up to what it declares
        (at most ``blob.MAX_TOKENS`` tokens of this calibration's layout) or return another dtype.
        """
        header, payload = wire.parse(blob)
        self._check_header(header)
        if (tokens is not None and header.tokens != tokens) or (dtype is not None and header.dtype != dtype):
            raise CorruptBlobError(f"blob holds {header.tokens} tokens of {header.dtype}; the destination "
                                   f"expects {tokens} of {dtype}")
        exact_bytes, stream_bytes = self._expected_sections(header)
        _check_chunks(header, exact_bytes, stream_bytes)
        buffer = self.coder.decompress_tensor(payload, header.chunks, exact_bytes + stream_bytes)
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
                q = self.calibration.plans[header.plan].streams[stream]
                size = section_size(q.rank, q.wide, n)
                section = buffer[offset : offset + size].to(self.device)
                features.append(self._bases[stream].reconstruct(dequantize(section, q.step, q.rank, q.wide, n)))
                offset += size
            keys, values = (f.reshape(n, header.layers, header.hidden).transpose(0, 1) for f in features)
            positions = torch.arange(header.start + head, header.start + head + n, device=self.device)
            out[0, :, head : head + n] = self.calibration.rope.rotate(keys, positions, header.dtype).to(header.dtype)
            out[1, :, head : head + n] = values.to(header.dtype)
        if not torch.isfinite(out).all():  # forged exact tokens or symbols (CRCs prove nothing against forgery)
            raise CorruptBlobError("blob decodes to KV that is not finite")
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
        n = h.compressed_tokens
        return h.exact_bytes, self._section_size(h.plan, n) if n else 0


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


def _deflate_bound(raw: int) -> tuple[int, int]:
    """Worst-case payload bytes (alignment included) and chunk count of ``raw`` bytes in raw DEFLATE chunks."""
    chunks = -(-raw // CHUNK_SIZE)
    return raw + chunks * ((CHUNK_SIZE >> 12) + 64 + 16), chunks
