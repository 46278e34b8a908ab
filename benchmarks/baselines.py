"""Baseline KV codecs measured in the same run as KVTC, one small class each.

Each takes the compressible region of a cache ``[2, L, T, H·D]`` and returns its
reconstruction and the bytes it would store (fp16 scales and zero points counted).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

GROUP = 32


class Baseline:
    name: str

    def roundtrip(self, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        raise NotImplementedError


class LMCacheFP8(Baseline):
    """LMCache 0.5.6's own ``fp8`` serde (e4m3 cast, 1 byte per value), run through its real classes."""

    name = "lmcache fp8"

    def roundtrip(self, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        from lmcache.v1.distributed.api import ObjectKey
        from lmcache.v1.distributed.serde.fp8 import Fp8QuantizationDeserializer, Fp8QuantizationSerializer

        key = ObjectKey(bytes(32), "benchmark", 0)
        src = _memory_obj(kv.contiguous())
        dst = _memory_obj(torch.zeros(kv.numel(), dtype=torch.uint8))
        stored = Fp8QuantizationSerializer().serialize(src, dst, key)
        out = _memory_obj(torch.empty_like(kv))
        Fp8QuantizationDeserializer().deserialize(dst, out, key)
        return out.tensor, stored


class PerTokenInt(Baseline):
    """Asymmetric int-b per token, groups of 32 channels, fp16 shift and scale per group."""

    def __init__(self, bits: int):
        self.bits = bits
        self.name = f"per-token int{bits} (g{GROUP})"

    def roundtrip(self, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        return _group_quantize(kv, self.bits), _bytes(kv.numel(), self.bits)


class KIVI(Baseline):
    """KIVI-style: keys per channel (groups of 32 tokens), values per token (groups of 32 channels)."""

    def __init__(self, bits: int):
        self.bits = bits
        self.name = f"KIVI int{bits} (g{GROUP})"

    def roundtrip(self, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        tokens = kv.shape[2]
        usable = tokens - tokens % GROUP
        out = kv.clone()  # as in KIVI, a ragged tail of < 32 tokens stays in full precision
        per_channel = kv[0, :, :usable].transpose(1, 2).contiguous()  # [L, HD, T]: groups run along tokens
        out[0, :, :usable] = _group_quantize(per_channel, self.bits).transpose(1, 2)
        out[1, :, :usable] = _group_quantize(kv[1, :, :usable].contiguous(), self.bits)
        quantized = kv[:, :, :usable].numel()
        return out, _bytes(quantized, self.bits) + (kv.numel() - quantized) * kv.element_size()


def _group_quantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Asymmetric min/max quantization of groups of 32 along the last dim (a multiple of 32), fp16 shift and
    scale per group."""
    groups = x.float().reshape(*x.shape[:-1], x.shape[-1] // GROUP, GROUP)
    levels = 2.0**bits - 1
    shift = groups.amin(dim=-1, keepdim=True).half().float()
    scale = ((groups.amax(dim=-1, keepdim=True) - shift) / levels).half().float()
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round((groups - shift) / safe).clamp(0, levels)
    return (shift + codes * scale).reshape(x.shape).to(x.dtype)


def _bytes(values: int, bits: int) -> int:
    return values * bits // 8 + (values // GROUP) * 4


def _memory_obj(tensor: torch.Tensor):
    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

    return TensorMemoryObj(
        raw_data=tensor.contiguous().view(-1).view(torch.uint8),
        metadata=MemoryObjMetadata(shape=tensor.shape, dtype=tensor.dtype, address=-1,
                                   phy_size=tensor.numel() * tensor.element_size(), ref_count=1,
                                   fmt=MemoryFormat.KV_2LTD, shapes=[tensor.shape], dtypes=[tensor.dtype]),
        parent_allocator=None,
    )


def default_baselines() -> list[Baseline]:
    return [LMCacheFP8(), PerTokenInt(4), PerTokenInt(2), KIVI(4), KIVI(2)]


# (key bits, value bits, norm correction) of LMCache 0.5.6's ``TQ_PRESETS`` (serde/turboquant/turboquant.py).
TURBOQUANT_PRESETS: dict[str, tuple[int, int, bool]] = {
    "turboquant_k8v4": (8, 4, False),
    "turboquant_4bit_nc": (4, 4, True),
    "turboquant_k3v4_nc": (3, 4, True),
    "turboquant_3bit_nc": (3, 3, True),
}


class TurboQuant(Baseline):
    """CPU reproduction, in plain torch, of LMCache 0.5.6's ``turboquant`` serde, whose own kernels need CUDA/Triton.

    Followed: ``lmcache/v1/distributed/serde/turboquant/turboquant.py`` (``TQ_PRESETS``, ``TurboQuantSerdeConfig``
    and its packed sizes, ``_layer_ranges``, ``_serialized_nbytes_for_shape``, ``_generate_wht_signs``,
    ``_build_hadamard_cpu``, ``_solve_lloyd_max``, ``_make_tq_tensors_for_layer``, the key un-rotation in
    ``TurboQuantDeserializer.deserialize``), ``store_kernel.py`` (``triton_turboquant_store``,
    ``_tq_fused_store_mse``, ``_tq_fused_store_fp8``, ``_store_quantized_value``) and ``decode_kernel.py``
    (``_tq_full_dequant_kv``). Each head of ``head_dim`` channels (the last dim split as ``[H, D]``) of each token
    is coded on its own:

    * keys, 8 bits: a saturating cast to fp8 e4m3, no rotation;
    * keys, 3/4 bits: the norm kept in fp16, the unit vector rotated by ``diag(signs) @ Hadamard / sqrt(D)`` (signs
      seeded ``42 + 1337 * layer``), each coordinate bucketized to the Lloyd-Max codebook of N(0, 1/D); with norm
      correction (the ``_nc`` presets) the decoded centroid vector is renormalized to unit length;
    * values: asymmetric min/max over the head's ``D`` channels, round-half-up codes, fp16 scale and zero point.

    Decoded layers pass through fp16 before the output dtype. ``skip_first_layers``/``skip_last_layers`` layers
    (2 and 2 by default, as in the serde) are stored raw. The byte count is the serde's: per token and head a slot
    of key + value bytes rounded up to an even size, tokens padded to a multiple of ``block_size``, raw layers at
    their dtype's size; nothing else (no header) is written.

    Where it may deviate: float32 reduction orders (key norms, rotation matmuls), Triton's fp32 division and
    possible fused multiply-adds can move a code at a bucket edge by one step; fp8 keys follow Hopper/Ada's e4m3
    (``float8e4nv``), not the ``float8e4b15`` that the serde picks on GPUs older than compute capability 8.9.
    """

    def __init__(self, preset: str, head_dim: int, block_size: int = 16, skip_first_layers: int = 2,
                 skip_last_layers: int = 2):
        if preset not in TURBOQUANT_PRESETS:
            raise ValueError(f"unknown TurboQuant preset {preset!r}; known: {', '.join(TURBOQUANT_PRESETS)}")
        if head_dim < 8 or head_dim & (head_dim - 1):
            raise ValueError(f"TurboQuant needs a power-of-two head_dim >= 8, got {head_dim}")
        self.preset, self.head_dim, self.block_size = preset, head_dim, block_size
        self.skip_first_layers, self.skip_last_layers = skip_first_layers, skip_last_layers
        self.key_bits, self.value_bits, self.norm_correction = TURBOQUANT_PRESETS[preset]
        self.name = f"lmcache {preset}"

    @property
    def slot_bytes(self) -> int:
        """Bytes per token and head: ``TurboQuantSerdeConfig.slot_size_aligned``."""
        d = self.head_dim
        key = d if self.key_bits == 8 else math.ceil(d * self.key_bits / 8) + 2  # fp8 codes, or codes + fp16 norm
        slot = key + math.ceil(d * self.value_bits / 8) + 4  # value codes + fp16 scale + fp16 zero point
        return slot + slot % 2

    def layer_range(self, layers: int) -> tuple[int, int]:
        start = min(self.skip_first_layers, layers)
        return start, max(start, layers - self.skip_last_layers)

    def stored_bytes(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> int:
        _, layers, tokens, hidden = shape
        start, end = self.layer_range(layers)
        padded = math.ceil(tokens / self.block_size) * self.block_size
        raw = 2 * (layers - end + start) * tokens * hidden * torch.empty((), dtype=dtype).element_size()
        return raw + (end - start) * padded * (hidden // self.head_dim) * self.slot_bytes

    def roundtrip(self, kv: torch.Tensor) -> tuple[torch.Tensor, int]:
        _, layers, tokens, hidden = kv.shape
        if hidden % self.head_dim:
            raise ValueError(f"hidden dim {hidden} is not a multiple of head_dim {self.head_dim}")
        heads = (tokens, hidden // self.head_dim, self.head_dim)
        out = kv.clone()
        for layer in range(*self.layer_range(layers)):
            keys, values = kv[0, layer].reshape(heads), kv[1, layer].reshape(heads)
            if self.key_bits == 8:
                k = keys.float().clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float().half()
            else:
                k = _tq_mse_keys(keys, layer, self.key_bits, self.norm_correction)
            out[0, layer] = k.reshape(tokens, hidden).to(kv.dtype)
            out[1, layer] = _tq_values(values, self.value_bits).reshape(tokens, hidden).to(kv.dtype)
        return out, self.stored_bytes(kv.shape, kv.dtype)


def turboquant_baselines(head_dim: int) -> list[Baseline]:
    return [TurboQuant(p, head_dim) for p in ("turboquant_k8v4", "turboquant_4bit_nc", "turboquant_3bit_nc")]


def _tq_rotation(head_dim: int, layer: int) -> torch.Tensor:
    """``PiT`` of ``_make_tq_tensors_for_layer``: random signs on the rows of the orthonormal Sylvester Hadamard."""
    gen = torch.Generator(device="cpu").manual_seed(42 + layer * 1337)
    signs = torch.randint(0, 2, (head_dim,), generator=gen).float() * 2 - 1
    hadamard = torch.ones(1, 1)
    while hadamard.shape[0] < head_dim:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    return signs.unsqueeze(1) * (hadamard / math.sqrt(head_dim))


@functools.lru_cache(maxsize=32)
def _tq_lloyd_max(head_dim: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``_solve_lloyd_max``: centroids and midpoints for N(0, 1/head_dim), the same trapezoid sums in float64."""
    levels, var = 2**bits, 1.0 / head_dim
    lo, hi = -3.5 * math.sqrt(var), 3.5 * math.sqrt(var)

    def pdf(x: float) -> float:
        return (1.0 / math.sqrt(2 * math.pi * var)) * math.exp(-x * x / (2 * var))

    def trapz(f: Callable[[float], float], a: float, b: float, n: int = 200) -> float:
        step, total = (b - a) / n, 0.5 * (f(a) + f(b))
        for i in range(1, n):  # summed in this order, as in the source
            total += f(a + i * step)
        return total * step

    centroids = [lo + (hi - lo) * (i + 0.5) / levels for i in range(levels)]
    for _ in range(200):
        edges = [lo * 3] + [(centroids[i] + centroids[i + 1]) / 2.0 for i in range(levels - 1)] + [hi * 3]
        new = []
        for i in range(levels):
            den = trapz(pdf, edges[i], edges[i + 1])
            new.append(trapz(lambda x: x * pdf(x), edges[i], edges[i + 1]) / den if den > 1e-15 else centroids[i])
        if max(abs(n - c) for n, c in zip(new, centroids, strict=True)) < 1e-10:
            break
        centroids = new
    midpoints = [(centroids[i] + centroids[i + 1]) / 2.0 for i in range(levels - 1)]
    return torch.tensor(centroids, dtype=torch.float32), torch.tensor(midpoints, dtype=torch.float32)


def _tq_mse_keys(keys: torch.Tensor, layer: int, bits: int, norm_correction: bool) -> torch.Tensor:
    """Keys ``[T, H, D]`` through ``triton_turboquant_store``'s MSE path and back; fp16 out."""
    rotation = _tq_rotation(keys.shape[-1], layer)
    centroids, midpoints = _tq_lloyd_max(keys.shape[-1], bits)
    k = keys.float()
    norms = k.norm(dim=-1, keepdim=True)
    codes = torch.bucketize((k / (norms + 1e-8)) @ rotation, midpoints, right=True)  # binary search: y >= mid
    unit = centroids[codes]
    if norm_correction:
        unit = unit * (1.0 / torch.sqrt((unit * unit).sum(dim=-1, keepdim=True) + 1e-16))
    rotated = (norms.half().float() * unit).half()
    return (rotated.float() @ rotation.T).half()


def _tq_values(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Values ``[T, H, D]`` through ``_store_quantized_value`` and the decode kernel; fp16 out."""
    levels = 2**bits - 1
    v = values.float()
    low = v.amin(dim=-1, keepdim=True)
    scale = (v.amax(dim=-1, keepdim=True) - low) / levels
    scale = torch.where(scale > 1e-8, scale, torch.full_like(scale, 1e-8))
    codes = ((v - low) / scale + 0.5).to(torch.int32).clamp(0, levels)
    return (codes.float() * scale.half().float() + low.half().float()).half()
