"""The KV layouts an LMCache 0.5.6 MP object can carry, mapped to and from the codec's ``[2, L, T, H·D]``.

* split ``[2, L, T, H·D]`` — K at index 0, V at index 1 (older vLLM, NHD backends, classic path);
* fused ``[1, L, T, NH·2·HS]`` — per KV head the pair ``[K | V]`` (vLLM ≥ 0.26 blocks-first backends);
* paged ``[L, T, NH·2·HS]`` — vLLM-CPU's engine-driven objects, whose rows are raw cache blocks, not
  tokens; only with the serde option ``layout: vllm-cpu``, through a mapping derived from vLLM's own
  kernels (:mod:`.vllm_cpu`).

fp8 caches arrive as ``uint8`` objects of the same shapes; they are accepted only when the serde was told
their format (``kv_cache_dtype``, see :mod:`.fp8`) and coded in bf16. Everything else — MLA's
``[1, L, T, kv_lora_rank + rope_dim]``, any shape the calibration does not describe — is refused with
:class:`UnsupportedLayoutError`, so the store fails cleanly (a cache miss) instead of producing a blob that
decodes to wrong KV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..blob import DTYPE_CODES
from ..errors import UnsupportedLayoutError
from . import vllm_cpu
from .fp8 import CODED_DTYPE

SPLIT = "split"
FUSED = "fused"
PAGED = "vllm-cpu"

__all__ = ["FUSED", "PAGED", "SPLIT", "GroupLayout", "UnsupportedLayoutError", "classify", "from_split", "to_split"]


@dataclass(frozen=True)
class GroupLayout:
    """How one kernel group of an object maps onto ``[2, layers, tokens, hidden]``."""

    kind: str
    layers: int
    tokens: int
    hidden: int  # kv_heads × head_dim of one stream
    dtype: torch.dtype
    block_size: int = 0  # vLLM's block size (paged only)

    @property
    def coded_dtype(self) -> torch.dtype:
        """The dtype the codec codes this group in: bf16 for an fp8 cache's ``uint8`` bytes."""
        return CODED_DTYPE if self.dtype == torch.uint8 else self.dtype


def classify(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, head_dim: int | None = None,
             paged_block_size: int = 0, fp8: bool = False) -> GroupLayout:
    """Recognize a group's layout from its shape and dtype (the serde has no model metadata).

    A ``kv_size == 1`` shape is fused only if its last dim splits into pairs of ``head_dim`` halves;
    ``head_dim`` comes from the calibration. Without it a ``kv_size == 1`` shape is refused. A 3-D shape
    is vLLM-CPU's paged layout only when the serde was told so (``paged_block_size``, its block size). A
    ``uint8`` object is an fp8 cache only when the serde was told its format (``fp8``).
    """
    shape = tuple(int(s) for s in shape)
    if dtype == torch.uint8 and not fp8:
        raise UnsupportedLayoutError(
            "uint8 KV is an fp8 cache: set the kvtc serde option kv_cache_dtype to vLLM's --kv-cache-dtype "
            "(fp8, fp8_e4m3 or fp8_e5m2)"
        )
    if dtype not in DTYPE_CODES and dtype != torch.uint8:
        raise UnsupportedLayoutError(f"KV dtype {dtype} is not supported by kvtc (bfloat16, float16 or fp8 as uint8)")
    if len(shape) == 3:
        return _classify_paged(shape, dtype, head_dim, paged_block_size)
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


def _classify_paged(shape: tuple[int, ...], dtype: torch.dtype, head_dim: int | None, block_size: int) -> GroupLayout:
    layers, tokens, width = shape
    if block_size and dtype == torch.uint8:
        raise UnsupportedLayoutError(
            f"3-D uint8 object {shape}: vLLM-CPU's fp8 KV cache (--kv-cache-dtype fp8*) is not supported by kvtc "
            "yet (its paged mapping is derived for 16-bit caches only); run vLLM-CPU with a bf16 cache"
        )
    if not block_size:
        raise UnsupportedLayoutError(
            f"3-D object {shape} is an MLA latent cache or vLLM-CPU's paged blocks; for vLLM-CPU set the serde "
            "options layout: vllm-cpu and block_size (vLLM's --block-size, 128 by default)"
        )
    if min(shape) < 1 or not head_dim or width % (2 * head_dim) or tokens % block_size:
        raise UnsupportedLayoutError(
            f"3-D object {shape} is not vLLM-CPU paged KV of head_dim {head_dim} in blocks of {block_size} tokens"
        )
    return GroupLayout(PAGED, layers, tokens, width // 2, dtype, block_size)


def _paged_mapping(layout: GroupLayout, head_dim: int) -> vllm_cpu.PagedMapping:
    return vllm_cpu.mapping(layout.block_size, layout.tokens, layout.hidden // head_dim, head_dim, layout.dtype)


def to_split(tensor: torch.Tensor, layout: GroupLayout, head_dim: int) -> torch.Tensor:
    """The group's data as the codec's ``[2, L, T, H·D]`` (a view for split, a copy otherwise)."""
    if layout.kind == SPLIT:
        return tensor
    if layout.kind == PAGED:
        return _paged_mapping(layout, head_dim).to_split(tensor)
    heads = layout.hidden // head_dim
    fused = tensor.reshape(layout.layers, layout.tokens, heads, 2, head_dim)
    return fused.permute(3, 0, 1, 2, 4).reshape(2, layout.layers, layout.tokens, layout.hidden)


def from_split(kv: torch.Tensor, layout: GroupLayout, head_dim: int) -> torch.Tensor:
    """Inverse of :func:`to_split`: ``[2, L, T, H·D]`` back to the group's own layout."""
    if layout.kind == SPLIT:
        return kv
    if layout.kind == PAGED:
        return _paged_mapping(layout, head_dim).from_split(kv)
    heads = layout.hidden // head_dim
    split = kv.reshape(2, layout.layers, layout.tokens, heads, head_dim)
    return split.permute(1, 2, 3, 0, 4).reshape(1, layout.layers, layout.tokens, 2 * layout.hidden)
