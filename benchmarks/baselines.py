"""Baseline KV codecs measured in the same run as KVTC, one small class each.

Each takes the compressible region of a cache ``[2, L, T, H·D]`` and returns its
reconstruction and the bytes it would store (fp16 scales and zero points counted).
"""

from __future__ import annotations

import torch

from lmcache_kvtc.quantizer import dequantize, quantize

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
    """Quantize groups of 32 along the last dim (which must be a multiple of 32)."""
    blocks = x.float().reshape(*x.shape[:-1], x.shape[-1] // GROUP, GROUP)
    codes, shift, scale = quantize(blocks, torch.full((blocks.shape[-2],), bits))
    return dequantize(codes, shift, scale).reshape(x.shape).to(x.dtype)


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
