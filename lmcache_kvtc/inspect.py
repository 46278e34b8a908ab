"""Explain a blob: its header, its sections and its honest compression ratios."""

from __future__ import annotations

from . import blob as wire
from .entropy import CHUNK_SIZE


def describe(data: bytes | bytearray | memoryview) -> dict:
    """Header fields and sizes of a blob (validated structurally; no calibration needed).

    Ratios are against the bf16/fp16 bytes of the same tensor and count every blob byte.
    *region* ratios leave out the exactly stored tokens on both sides (what LMCache chunks
    away from the sequence ends get); *pre-entropy* sizes use the inflated symbol stream.
    """
    header, payload = wire.parse(data)
    token_bytes = wire.exact_size(header.layers, 1, header.hidden, header.dtype)
    exact_raw = header.exact_bytes
    exact_chunks = header.chunks[: -(-exact_raw // CHUNK_SIZE)]
    exact_stored = (exact_chunks[-1].offset + exact_chunks[-1].compressed) if exact_chunks else 0
    header_bytes = wire.header_size(len(header.model_id.encode()), len(header.chunks))
    blob_bytes = header_bytes + len(payload)
    pre_entropy = header_bytes + header.stream_size
    raw = token_bytes * header.tokens
    region_raw = token_bytes * header.compressed_tokens
    return {
        "model_id": header.model_id,
        "calibration_fingerprint": header.fingerprint.hex(),
        "dtype": str(header.dtype).removeprefix("torch."),
        "layout": [header.kv_size, header.layers, header.tokens, header.hidden],
        "start": header.start,
        "start_estimated": bool(header.flags & wire.FLAG_START_ESTIMATED),
        "exact_tokens": {"head": header.exact_head, "tail": header.exact_tail},
        "plan": header.plan,
        "chunks": len(header.chunks),
        "bytes": {
            "raw": raw,
            "blob": blob_bytes,
            "padded_blob": len(data),
            "header_and_index": header_bytes,
            "exact_tokens_stored": exact_stored,
            "pre_entropy": pre_entropy,
        },
        "ratio": {
            "overall": raw / blob_bytes,
            "overall_pre_entropy": raw / pre_entropy,
            "region": _safe(region_raw, blob_bytes - exact_stored),
            "region_pre_entropy": _safe(region_raw, pre_entropy - exact_raw),
        },
    }


def _safe(num: int, den: int) -> float | None:
    return num / den if num and den > 0 else None
