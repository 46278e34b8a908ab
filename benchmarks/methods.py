"""Every codec the quality benchmark compares, behind one interface: cache in, reconstruction and byte count out.

All methods keep the same tokens exact (4 attention sinks, the last 128) and are charged
for every byte they would store for the rest, so their ratios are directly comparable.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmcache_kvtc import Calibration, KVTCCodec
from lmcache_kvtc.inspect import describe

from .baselines import Baseline

SINKS, WINDOW = 4, 128


@dataclass
class Method:
    name: str
    kind: str  # "kvtc" (the calibration's ladder), "ablation" or "baseline"
    restore: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, float]]]  # kv -> (reconstruction, ratios)


def region(kv: torch.Tensor) -> slice:
    """The tokens every method compresses."""
    return slice(SINKS, kv.shape[2] - WINDOW)


def kvtc(calibration: Calibration, ratio: float, kind: str = "kvtc", label: str = "KVTC") -> Method:
    codec, plan = KVTCCodec(calibration), calibration.plan_index(ratio)

    def restore(kv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        blob = codec.encode(kv, plan=plan, start=0, sinks=SINKS, window=WINDOW)
        ratios = describe(blob)["ratio"]
        return codec.decode(blob), {"region_ratio": ratios["region"], "overall_ratio": ratios["overall"],
                                    "region_pre_entropy": ratios["region_pre_entropy"], "plan": ratio}

    return Method(f"{label} {ratio:g}x", kind, restore)


def baseline(method: Baseline) -> Method:
    def restore(kv: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        compressed = region(kv)
        restored = kv.clone()
        restored[:, :, compressed], stored = method.roundtrip(kv[:, :, compressed].contiguous())
        raw = kv.numel() * kv.element_size()
        region_raw = kv[:, :, compressed].numel() * kv.element_size()
        return restored, {"region_ratio": region_raw / stored, "overall_ratio": raw / (stored + raw - region_raw)}

    return Method(method.name, "baseline", restore)


def relative_errors(kv: torch.Tensor, restored: torch.Tensor) -> dict[str, float]:
    """Relative squared error of keys and values over the compressed region (RoPE keeps key norms)."""
    compressed = region(kv)
    out = {}
    for i, stream in enumerate(("keys", "values")):
        x = kv[i, :, compressed].float()
        out[f"rel_err_{stream}"] = float((restored[i, :, compressed].float() - x).square().sum() / x.square().sum())
    return out
