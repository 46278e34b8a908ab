"""vLLM's fp8 KV caches as the codec's 16-bit KV, and back exactly the way vLLM writes them.

With ``--kv-cache-dtype fp8 | fp8_e4m3 | fp8_e5m2`` vLLM stores ``fp8(x / scale)`` per element (round to
nearest even, saturating at the format's largest finite value) in a ``uint8`` tensor, and LMCache hands the
serde those bytes as ``uint8`` -- nothing in the object says which fp8 format they hold, so the serde option
``kv_cache_dtype`` does (the same value as vLLM's flag). The codec codes the dequantized values
``fp8 · scale`` in bf16, which holds every e4m3/e5m2 value exactly (at scale 1): the domain the calibration was
fitted in. A load re-quantizes the decoded KV with vLLM's rounding and saturation.

``k_scale`` / ``v_scale`` are vLLM's per-tensor scales: 1.0 unless the checkpoint ships KV scales or vLLM runs
with ``calculate_kv_scales``. They only put the values back in the calibration's range: encode multiplies and
decode divides by the same scale, so a wrong scale costs quality, never correctness.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import LayoutError

#: vLLM's ``--kv-cache-dtype`` values that mean an fp8 cache, and the format of their bytes
FP8_FORMATS = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
#: the dtype the codec codes fp8 caches in
CODED_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Fp8Cache:
    """One deployment's fp8 KV format: ``uint8`` bytes of ``fmt`` holding ``x / scale`` per stream."""

    fmt: torch.dtype
    k_scale: float = 1.0
    v_scale: float = 1.0

    @classmethod
    def from_option(cls, kv_cache_dtype: str, k_scale: float = 1.0, v_scale: float = 1.0) -> Fp8Cache | None:
        """The fp8 format named by vLLM's ``--kv-cache-dtype`` value, or None for 16-bit caches ("auto")."""
        return cls(FP8_FORMATS[kv_cache_dtype], k_scale, v_scale) if kv_cache_dtype in FP8_FORMATS else None

    def _scales(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([self.k_scale, self.v_scale], dtype=torch.float32, device=device).view(2, 1, 1, 1)

    def dequantize(self, cache: torch.Tensor) -> torch.Tensor:
        """``cache [2, L, T, H·D] uint8`` (K, V) as bf16 KV; a NaN byte (never written by vLLM) is refused."""
        values = cache.contiguous().view(self.fmt).float()
        if not torch.isfinite(values).all():
            raise LayoutError(f"fp8 KV ({self.fmt}) contains NaN or infinity")
        return (values * self._scales(values.device)).to(CODED_DTYPE)

    def quantize(self, kv: torch.Tensor) -> torch.Tensor:
        """Decoded KV ``[2, L, T, H·D]`` as vLLM's ``uint8`` cache bytes: ``x / scale``, saturated, rounded."""
        limit = torch.finfo(self.fmt).max
        scaled = kv.float() / self._scales(kv.device)
        return scaled.clamp(-limit, limit).to(self.fmt).view(torch.uint8)
