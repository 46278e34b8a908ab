"""Fitting a calibration from KV samples: streaming PCA, held-out error table, DP ladder."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .bit_allocation import BitAllocator, measure_errors, plan_error
from .calibration import STREAMS, Calibration, Plan, StreamBasis
from .rope import RopeTable

DEFAULT_RATIOS = (4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)


class FeatureCovariance:
    """Streaming mean and covariance of feature vectors.

    Batches are shifted by the first batch's mean before the fp32 outer product, so large
    constant channels (Qwen's outlier keys) do not cancel catastrophically; sums are fp64.
    """

    def __init__(self, features: int):
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.total = torch.zeros(features, dtype=torch.float64)
        self.outer = torch.zeros(features, features, dtype=torch.float64)

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        if self.shift is None:
            self.shift = x.mean(dim=0)
        d = x - self.shift
        self.total += d.sum(dim=0, dtype=torch.float64)
        self.outer += (d.T @ d).double()
        self.count += x.shape[0]

    def pca(self) -> StreamBasis:
        """Mean, all principal directions (columns, by decreasing variance) and their variances."""
        if self.count < 2 or self.shift is None:
            raise ValueError("need at least two feature vectors")
        mean_shifted = self.total / self.count
        covariance = self.outer / self.count - torch.outer(mean_shifted, mean_shifted)
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        order = torch.argsort(eigenvalues, descending=True)
        return StreamBasis(
            mean=(self.shift.double() + mean_shifted).float(),
            basis=eigenvectors[:, order].float().contiguous(),
            eigenvalues=eigenvalues[order].clamp(min=0),
        )


def fit_calibration(
    *,
    model_id: str,
    kv_heads: int,
    head_dim: int,
    rope: RopeTable,
    fit_batches: Iterable[torch.Tensor],
    heldout: torch.Tensor,
    ratios: Iterable[float] = DEFAULT_RATIOS,
    key_weight: float | None = None,
    info: dict | None = None,
) -> Calibration:
    """Build a calibration.

    ``fit_batches`` yield ``[2, N, p]`` token features (de-rotated keys, values) for the
    PCA; ``heldout [2, M, p]`` are other tokens on which the DP measures quantization
    error. Sinks and recent-window tokens should be left out of both.

    Each plan spends ``2·floor(16·p / ratio)`` bits per token. With ``key_weight=None``
    each stream gets half; otherwise the split minimises
    ``key_weight · rel_err(K) + rel_err(V)`` (relative squared errors on held-out data).
    """
    p = heldout.shape[2]
    accumulators = {s: FeatureCovariance(p) for s in STREAMS}
    for batch in fit_batches:
        for i, s in enumerate(STREAMS):
            accumulators[s].add(batch[i])
    streams = {s: accumulators[s].pca() for s in STREAMS}
    ratios = sorted(float(r) for r in ratios)
    budgets = [int(16 * p // r) for r in ratios]
    top = budgets[0] if key_weight is None else 2 * budgets[0]
    allocators, energy = {}, {}
    for i, s in enumerate(STREAMS):
        projections = (heldout[i].float() - streams[s].mean) @ streams[s].basis
        allocators[s] = BitAllocator(measure_errors(projections), top)
        energy[s] = float(heldout[i].double().square().sum(dim=1).mean())
    plans = []
    for ratio, budget in zip(ratios, budgets, strict=True):
        split = _split(allocators, energy, budget, key_weight)
        coverings = {s: allocators[s].covering(split[s]) for s in STREAMS}
        plans.append(
            Plan(
                ratio=ratio,
                blocks={s: tuple(b for b in coverings[s] if b.bits) for s in STREAMS},
                expected_error={s: plan_error(allocators[s].table, coverings[s]) / energy[s] for s in STREAMS},
            )
        )
    for s in STREAMS:
        rank = max(plan.rank(s) for plan in plans)
        streams[s].basis = streams[s].basis[:, :rank].contiguous()
    info = dict(info or {}, key_weight=key_weight, heldout_energy=energy)
    calibration = Calibration(model_id, rope.layers, kv_heads, head_dim, rope, streams, plans, info)
    calibration.validate()
    return calibration


def _split(allocators: dict, energy: dict, budget: int, key_weight: float | None) -> dict[str, int]:
    """Bits per token for keys and values out of ``2 · budget``."""
    if key_weight is None:
        return {"keys": budget, "values": budget}
    total = 2 * budget
    keys = allocators["keys"].curve[: total + 1] / energy["keys"]
    values = allocators["values"].curve[: total + 1].flip(0) / energy["values"]
    k = int(torch.argmin(key_weight * keys + values))
    return {"keys": k, "values": total - k}
