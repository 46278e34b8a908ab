"""Fitting a calibration from KV samples: streaming PCA, held-out rate–distortion curves, the plan ladder."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..calibration import STREAMS, Calibration, Plan, StreamBasis, StreamPlan
from ..rope import RopeTable
from .planning import CurvePoint, curve

#: the rungs reports and benchmarks show by default
NAMED_RATIOS = (4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0)
#: the rungs a calibration carries by default: the named ones and eight per octave from 4x to 64x, so that rate
#: control (the serde's byte budget, met with the finest plan that fits) leaves at most ~9 % of a budget unused
DEFAULT_RATIOS = tuple(sorted(set(NAMED_RATIOS) | {round(4 * 2 ** (k / 8), 2) for k in range(33)}))


#: up to this many features per stream the fit keeps the exact covariance (two fp64 streams: 2.3 GB at the limit)
EXACT_MAX_FEATURES = 12 * 1024
#: components a sketched fit keeps for larger models (an 8B's p is 32,768; its fp16 basis is then 3 % of its weights)
SKETCH_RANK = 4096


def new_accumulator(features: int, max_rank: int | None = None, device: str | torch.device = "cpu"):
    """The exact :class:`FeatureCovariance` when it is cheap (or ``max_rank`` covers every feature), else a
    :class:`SketchedCovariance` of ``max_rank`` (default :data:`SKETCH_RANK`) components."""
    if max_rank is None:
        max_rank = features if features <= EXACT_MAX_FEATURES else SKETCH_RANK
    if max_rank >= features:
        return FeatureCovariance(features, device)
    return SketchedCovariance(features, max_rank, device)


class _ShiftedSums:
    """Count, first-batch shift and fp64 sum of shifted features: where both accumulators start."""

    count: int
    shift: torch.Tensor | None
    total: torch.Tensor

    def _center(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` minus the first batch's mean (fp32, on the accumulator's device), with count and sum updated."""
        x = x.float().to(self.total.device)
        if self.shift is None:
            self.shift = x.mean(dim=0)
        d = x - self.shift
        self.total += d.sum(dim=0, dtype=torch.float64)
        self.count += x.shape[0]
        return d


class FeatureCovariance(_ShiftedSums):
    """Streaming mean and covariance of feature vectors.

    Batches are shifted by the first batch's mean before the fp32 outer product, so large
    constant channels (Qwen's outlier keys) do not cancel catastrophically; sums are fp64.
    Memory is p² fp64: past :data:`EXACT_MAX_FEATURES` use :class:`SketchedCovariance`.
    """

    def __init__(self, features: int, device: str | torch.device = "cpu"):
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.total = torch.zeros(features, dtype=torch.float64, device=device)
        self.outer = torch.zeros(features, features, dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor) -> None:
        d = self._center(x)
        self.outer += (d.T @ d).double()

    def moments(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and covariance, fp64."""
        if self.count < 2 or self.shift is None:
            raise ValueError("need at least two feature vectors")
        mean_shifted = self.total / self.count
        covariance = self.outer / self.count - torch.outer(mean_shifted, mean_shifted)
        return self.shift.double() + mean_shifted, covariance

    def subset(self, index: torch.Tensor) -> FeatureCovariance:
        """The moments of the features at ``index`` alone (a sub-block: what fitting only those would have summed)."""
        part = FeatureCovariance(0)
        part.count, part.total, part.outer = self.count, self.total[index], self.outer[index][:, index]
        part.shift = None if self.shift is None else self.shift[index]
        return part

    def layer_scale(self, layers: int) -> torch.Tensor:
        """Per feature, the RMS deviation of its layer: dividing by it gives every layer unit energy."""
        _, covariance = self.moments()
        rms = covariance.diagonal().reshape(layers, -1).mean(dim=1).sqrt().clamp(min=1e-6)
        return rms.repeat_interleave(covariance.shape[0] // layers).float()

    def pca(self, groups: int = 1, scale: torch.Tensor | None = None) -> StreamBasis:
        """Mean, all principal directions (columns, by decreasing variance) and their variances.

        ``scale`` (see :class:`StreamBasis`) divides features before the PCA. ``groups > 1``
        decorrelates each of that many equal consecutive feature groups (layers) on its own —
        a block-diagonal basis — for the per-layer ablation; KVTC uses one group.
        """
        mean, covariance = self.moments()
        if scale is not None:
            covariance = covariance / torch.outer(scale.double(), scale.double())
        features = covariance.shape[0]
        if features % groups:
            raise ValueError(f"{features} features do not split into {groups} groups")
        size = features // groups
        basis = torch.zeros_like(covariance)
        variances = torch.empty(features, dtype=torch.float64)
        for g in range(0, features, size):
            variances[g : g + size], basis[g : g + size, g : g + size] = torch.linalg.eigh(
                covariance[g : g + size, g : g + size]
            )
        order = torch.argsort(variances, descending=True)
        return StreamBasis(
            mean=mean.float().cpu(),
            basis=basis[:, order].float().cpu().contiguous(),
            eigenvalues=variances[order].clamp(min=0).cpu(),
            scale=None if scale is None else scale.cpu(),
        )


class SketchedCovariance(_ShiftedSums):
    """Streaming mean and the leading ``rank`` principal directions in O(p·rank) memory.

    Frequent Directions (Liberty 2013; Ghashami et al. 2016): a ``[2ℓ, p]`` buffer of shifted feature rows is
    shrunk to ``ℓ`` rows whenever it fills, so that ``sketchᵀ·sketch`` stays within ``‖X − X_k‖²_F / (ℓ − k)``
    (spectral norm) of ``Xᵀ·X``. ``ℓ = 1.5·rank``: with ``ℓ = rank`` the last kept directions dropped 12 % more
    energy than an exact fit's (an i^-2 spectrum), with 1.5·rank as little as the exact fit's own sampling noise.
    The per-feature variances are exact; the spectrum past ``rank`` is reported flat with the exact remaining
    energy (plans never use it).
    """

    def __init__(self, features: int, rank: int, device: str | torch.device = "cpu"):
        self.rank = rank
        self.rows = rank + rank // 2
        self.count, self.filled = 0, 0
        self.shift: torch.Tensor | None = None
        self.total = torch.zeros(features, dtype=torch.float64, device=device)
        self.squares = torch.zeros(features, dtype=torch.float64, device=device)
        self.sketch = torch.zeros(2 * self.rows, features, device=device)

    def add(self, x: torch.Tensor) -> None:
        d = self._center(x)
        self.squares += d.square().sum(dim=0, dtype=torch.float64)
        row = 0
        while row < d.shape[0]:
            take = min(self.sketch.shape[0] - self.filled, d.shape[0] - row)
            self.sketch[self.filled : self.filled + take] = d[row : row + take]
            self.filled, row = self.filled + take, row + take
            if self.filled == self.sketch.shape[0]:
                self._shrink()

    def _shrink(self) -> None:
        """Keep the ``ℓ`` leading right singular directions, each shortened by the next singular value."""
        rows = self.sketch[: self.filled]
        s2, u = torch.linalg.eigh((rows @ rows.T).double())
        s2, u = s2.flip(0).clamp(min=0), u.flip(1)
        kept = min(self.rows, self.filled)
        delta = s2[kept] if kept < self.filled else 0.0
        factor = ((s2[:kept] - delta).clamp(min=0) / s2[:kept].clamp(min=1e-30)).sqrt()
        shrunk = (u[:, :kept].T.float() @ rows) * factor[:, None].float()
        self.sketch.zero_()
        self.sketch[:kept] = shrunk
        self.filled = kept

    def variances(self) -> torch.Tensor:
        """Exact per-feature variance, fp64."""
        if self.count < 2 or self.shift is None:
            raise ValueError("need at least two feature vectors")
        mean_shifted = self.total / self.count
        return (self.squares / self.count - mean_shifted.square()).clamp(min=0)

    def subset(self, index: torch.Tensor) -> SketchedCovariance:
        """The sketch of the features at ``index`` alone (a column subset of a sketch sketches those columns)."""
        part = SketchedCovariance(0, self.rank, self.total.device)
        part.count, part.filled, part.shift = self.count, self.filled, None if self.shift is None else self.shift[index]
        part.total, part.squares, part.sketch = self.total[index], self.squares[index], self.sketch[:, index]
        return part

    def layer_scale(self, layers: int) -> torch.Tensor:
        """As :meth:`FeatureCovariance.layer_scale`, from the exact variances."""
        variances = self.variances()
        rms = variances.reshape(layers, -1).mean(dim=1).sqrt().clamp(min=1e-6)
        return rms.repeat_interleave(variances.shape[0] // layers).float()

    def pca(self, groups: int = 1, scale: torch.Tensor | None = None) -> StreamBasis:
        """The ``rank`` leading directions of the (scaled) covariance within the sketch's span and the mean's."""
        if groups != 1:
            raise ValueError("a sketched covariance has no per-layer PCA (use the exact FeatureCovariance)")
        variances = self.variances()
        mean_shifted = self.total / self.count
        rows, m = self.sketch[: self.filled], mean_shifted.float()
        if scale is not None:
            scale = scale.to(rows.device)
            rows, m, variances = rows / scale, m / scale, variances / scale.double().square()
        q, _ = torch.linalg.qr(torch.cat((rows, m[None])).T)  # [p, filled + 1] orthonormal span
        projected_rows, projected_mean = (rows @ q).double(), (m @ q).double()
        small = projected_rows.T @ projected_rows / self.count - torch.outer(projected_mean, projected_mean)
        values, vectors = torch.linalg.eigh(small)
        order = torch.argsort(values, descending=True)[: self.rank]
        top = values[order].clamp(min=0)
        features = variances.shape[0]
        tail = (variances.sum() - top.sum()).clamp(min=0) / max(features - len(top), 1)
        return StreamBasis(
            mean=(self.shift.double() + mean_shifted).float().cpu(),
            basis=(q @ vectors[:, order].float()).cpu().contiguous(),
            eigenvalues=torch.cat((top, tail.expand(features - len(top)))).cpu(),
            scale=None if scale is None else scale.cpu(),
        )


def add_batch(accumulators: dict, batch: torch.Tensor, max_rank: int | None = None) -> None:
    """Add a ``[2, N, p]`` feature batch (de-rotated keys, values) to per-stream accumulators (made on the
    batch's device by :func:`new_accumulator` at the first batch)."""
    for i, s in enumerate(STREAMS):
        if s not in accumulators:
            accumulators[s] = new_accumulator(batch.shape[2], max_rank, batch.device)
        accumulators[s].add(batch[i])


def fit_bases(fit_batches: Iterable[torch.Tensor]) -> dict[str, StreamBasis]:
    """PCA per stream over ``[2, N, p]`` feature batches."""
    accumulators: dict[str, FeatureCovariance] = {}
    for batch in fit_batches:
        add_batch(accumulators, batch)
    return {s: c.pca() for s, c in accumulators.items()}


class Planner:
    """Rate–distortion curves of both streams on held-out tokens, computed once per calibration.

    A plan at ``ratio`` is expected to spend bf16 bytes / ``ratio`` per token on K and V together (measured
    on the held-out tokens; the codec's rate control then meets each blob's byte budget exactly). With
    ``key_weight=None`` each stream gets half; otherwise the split minimises
    ``key_weight · rel_err(K) + rel_err(V)`` (relative squared errors). Plans for any ladder and key
    weight are then cheap, which lets calibration tune the split by measuring the model's output.
    """

    def __init__(self, streams: dict[str, StreamBasis], heldout: torch.Tensor, min_ratio: float):
        self.streams = streams
        self.features = heldout.shape[2]
        top = self._budget(min_ratio)
        self.curves: dict[str, list[CurvePoint]] = {}
        self.energy: dict[str, float] = {}
        for i, s in enumerate(STREAMS):
            basis = streams[s]
            sigmas = basis.eigenvalues[: basis.basis.shape[1]].sqrt()
            projections = basis.project(heldout[i])
            residual = None
            if basis.basis.shape[1] < self.features:  # a rank-capped basis: what lies outside it is error too
                centered = heldout[i].double() - basis.mean.double()
                centered = centered if basis.scale is None else centered / basis.scale.double()
                residual = (centered.square().sum(dim=1) - projections.double().square().sum(dim=1)).clamp(min=0)
            self.curves[s] = curve(projections, sigmas, top, residual)
            x = heldout[i].double() if basis.scale is None else heldout[i].double() / basis.scale
            self.energy[s] = float(x.square().sum(dim=1).mean())

    def _budget(self, ratio: float) -> float:
        """Bytes per token of K and V together at ``ratio`` against bf16."""
        return 2 * 2 * self.features / ratio

    def plans(self, ratios: Iterable[float], key_weight: float | None = None) -> list[Plan]:
        """One plan per ratio, finest first."""
        plans = []
        for ratio in sorted(float(r) for r in ratios):
            points = self._split(self._budget(ratio), key_weight)
            plans.append(Plan(ratio=ratio, streams={
                s: StreamPlan(step=p.step, rank=p.rank, wide=p.wide, expected_error=p.error / self.energy[s],
                              expected_bits=8 * p.bytes_per_token)
                for s, p in points.items()
            }))
        return plans

    def _split(self, budget: float, key_weight: float | None) -> dict[str, CurvePoint]:
        if key_weight is None:
            return {s: _finest_within(self.curves[s], budget / 2) for s in STREAMS}
        best, best_score = None, float("inf")
        for key in self.curves["keys"]:
            value = _finest_within(self.curves["values"], budget - key.bytes_per_token)
            score = key_weight * key.error / self.energy["keys"] + value.error / self.energy["values"]
            if key.bytes_per_token + value.bytes_per_token <= budget and score < best_score:
                best, best_score = {"keys": key, "values": value}, score
        return best or {s: self.curves[s][0] for s in STREAMS}


def _finest_within(front: list[CurvePoint], budget: float) -> CurvePoint:
    """The least-error point of a Pareto front within ``budget`` bytes per token (else the coarsest)."""
    fitting = [p for p in front if p.bytes_per_token <= budget]
    return fitting[-1] if fitting else front[0]


def assemble(*, model_id: str, kv_heads: int, head_dim: int, rope: RopeTable, streams: dict[str, StreamBasis],
             plans: list[Plan], info: dict | None = None) -> Calibration:
    """A validated calibration whose bases are trimmed to the rank its plans use and rounded to fp16 (stored so:
    half the file; measured on Qwen2.5-Coder-0.5B at 8–32×, the codec's relative error is unchanged to 5 digits)."""
    trimmed = {
        s: StreamBasis(b.mean, b.basis[:, : max(p.rank(s) for p in plans)].half().float().contiguous(),
                       b.eigenvalues, b.scale)
        for s, b in streams.items()
    }
    calibration = Calibration(model_id, rope.layers, kv_heads, head_dim, rope, trimmed, plans, dict(info or {}))
    calibration.validate()
    return calibration


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
    """Build a calibration in one go (PCA on ``fit_batches``, curves on ``heldout``; see :class:`Planner`).

    Sinks and recent-window tokens should be left out of both.
    """
    streams = fit_bases(fit_batches)
    ratios = list(ratios)
    planner = Planner(streams, heldout, min(ratios))
    info = dict(info or {}, key_weight=key_weight, heldout_energy=planner.energy)
    return assemble(model_id=model_id, kv_heads=kv_heads, head_dim=head_dim, rope=rope, streams=streams,
                    plans=planner.plans(ratios, key_weight), info=info)
