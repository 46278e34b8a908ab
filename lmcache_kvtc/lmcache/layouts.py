"""The KV layouts an LMCache 0.5.6 MP object can carry, mapped to and from the codec's ``[2, L, T, H·D]``.

* split ``[2, L, T, H·D]`` — K at index 0, V at index 1 (older vLLM, NHD backends, classic path);
* fused ``[1, L, T, NH·2·HS]`` — per KV head the pair ``[K | V]`` (vLLM ≥ 0.26 blocks-first backends).

Everything else — MLA's ``[1, L, T, kv_lora_rank + rope_dim]``, fp8 caches (``uint8``), any
shape the calibration does not describe — is refused with :class:`UnsupportedLayoutError`, so the
store fails cleanly (a cache miss) instead of producing a blob that decodes to wrong KV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blob import DTYPE_CODES
from ..errors import LayoutError

SPLIT = "split"
FUSED = "fused"


class UnsupportedLayoutError(LayoutError):
    """An LMCache object this serde cannot code (MLA, fp8/uint8 KV, unknown shape)."""


@dataclass(frozen=True)
class GroupLayout:
    """How one kernel group of an object maps onto ``[2, layers, tokens, hidden]``."""

    kind: str
    layers: int
    tokens: int
    hidden: int  # kv_heads × head_dim of one stream
    dtype: torch.dtype


def classify(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, head_dim: int | None = None) -> GroupLayout:
    """Recognize a group's layout from its shape and dtype alone (the serde has no model metadata).

    A ``kv_size == 1`` shape is fused only if its last dim splits into pairs of ``head_dim`` halves;
    ``head_dim`` comes from the calibration. Without it a ``kv_size == 1`` shape is refused.
    """
    shape = tuple(int(s) for s in shape)
    if dtype not in DTYPE_CODES:
        raise UnsupportedLayoutError(
            f"KV dtype {dtype} is not supported by kvtc (bfloat16/float16 only; fp8 caches arrive as uint8)"
        )
    if len(shape) != 4:
        raise UnsupportedLayoutError(f"KV object of shape {shape} is not [kv_size, layers, tokens, hidden]")
    kv_size, layers, tokens, width = shape
    if min(layers, tokens, width) < 1:
        raise UnsupportedLayoutError(f"empty KV object {shape}")
    if kv_size == 2:
        return GroupLayout(SPLIT, layers, tokens, width, dtype)
    if kv_size == 1 and head_dim and width % (2 * head_dim) == 0:
        return GroupLayout(FUSED, layers, tokens, width // 2, dtype)
    if kv_size == 1:
        raise UnsupportedLayoutError(
            f"kv_size-1 object {shape} is not a fused [K|V] layout of head_dim {head_dim} (MLA latent cache?); "
            "kvtc codes K and V streams only"
        )
    raise UnsupportedLayoutError(f"kv_size {kv_size} in {shape} is neither 2 (split K/V) nor 1 (fused)")


def to_split(tensor: torch.Tensor, layout: GroupLayout, head_dim: int) -> torch.Tensor:
    """The group's data as the codec's ``[2, L, T, H·D]`` (a view for split, a copy for fused)."""
    if layout.kind == SPLIT:
        return tensor
    heads = layout.hidden // head_dim
    fused = tensor.reshape(layout.layers, layout.tokens, heads, 2, head_dim)
    return fused.permute(3, 0, 1, 2, 4).reshape(2, layout.layers, layout.tokens, layout.hidden)


def from_split(kv: torch.Tensor, layout: GroupLayout, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`to_split`: ``[2, L, T, H·D]`` back to the group's own layout."""
    if layout.kind == SPLIT:
        return kv
    heads = layout.hidden // head_dim
    split = kv.reshape(2, layout.layers, layout.tokens, heads, head_dim)
    return split.permute(1, 2, 3, 0, 4).reshape(1, layout.layers, layout.tokens, 2 * layout.hidden)
