"""Rate–distortion curves of the real quantizer and coder, and the plans chosen from them.

For one stream, every candidate (step, rank) is run on held-out calibration projections exactly as the
codec runs it — 256-token chunks, :func:`~lmcache_kvtc.quantizer.quantize`, raw DEFLATE — and yields
the entropy-coded bytes per token and the squared error per token (dropped components included).
The Pareto front of those points is the stream's curve; a plan picks one point per stream within a
byte budget. Steps are geometric, eight per octave; the rank follows the step (components whose
spread is below ``keep · step`` are dropped, ``keep`` is measured too).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..defaults import CHUNK_TOKENS
from ..entropy import DeflateCPU
from ..quantizer import dequantize, quantize, wide_count

#: tokens per chunk the curves are measured with: what LMCache hands the serde
CURVE_CHUNK = CHUNK_TOKENS
#: held-out tokens a curve is measured on (8 chunks: enough for a stable estimate, half the cost of 4096)
CURVE_TOKENS = 2048
STEPS_PER_OCTAVE = 8
MAX_OCTAVES = 16
#: candidate drop thresholds, in steps of spread
KEEP_FACTORS = (0.2, 0.35, 0.5)


@dataclass(frozen=True)
class CurvePoint:
    step: float
    rank: int
    wide: int
    bytes_per_token: float
    error: float  # mean squared error per token


def measure(projections: torch.Tensor, sigmas: torch.Tensor, step: float, keep: float,
            coder: DeflateCPU | None = None, outside: float = 0.0) -> CurvePoint:
    """Bytes and error of one (step, keep) on held-out ``projections [tokens, basis rank]``; ``outside``: the
    tokens' summed squared distance to the basis's span (0 for a full-rank basis)."""
    coder = coder or DeflateCPU()
    tokens, available = projections.shape
    rank = min(int((sigmas > keep * step).sum()), available)
    wide = wide_count(sigmas, step, rank)
    size, error = 0, outside + float(projections[:, rank:].double().square().sum())
    for first in range(0, tokens, CURVE_CHUNK):
        part = projections[first : first + CURVE_CHUNK, :rank]
        stream = quantize(part, step, wide)
        error += float((dequantize(stream, step, rank, wide, part.shape[0]) - part).double().square().sum())
        payload, _ = coder.compress([stream.numpy().tobytes()])
        size += len(payload)
    return CurvePoint(step, rank, wide, size / tokens, error / tokens)


def curve(projections: torch.Tensor, sigmas: torch.Tensor, max_bytes_per_token: float,
          residual: torch.Tensor | None = None) -> list[CurvePoint]:
    """The Pareto front (bytes ascending, error descending) from one component's spread down to the step
    whose coded size passes ``max_bytes_per_token``, measured on every k-th token (at most
    :data:`CURVE_TOKENS`, spread over all held-out contexts). ``residual``: per token, the squared distance
    to a rank-capped basis's span."""
    every = -(-projections.shape[0] // CURVE_TOKENS)
    sigmas, projections = sigmas.float(), projections[::every]
    outside = 0.0 if residual is None else float(residual[::every].sum())
    points, step, best = [], float(sigmas[0]), float("inf")
    for _ in range(MAX_OCTAVES * STEPS_PER_OCTAVE):
        measured = [measure(projections, sigmas, step, keep, outside=outside) for keep in KEEP_FACTORS]
        points += measured
        least = min(p.error for p in measured)
        if min(p.bytes_per_token for p in measured) > max_bytes_per_token or least >= best:
            break  # past the budget, or so fine that int8 clamping makes it worse
        best, step = least, step * 2.0 ** (-1 / STEPS_PER_OCTAVE)
    return pareto_front(points)


def pareto_front(points: list[CurvePoint]) -> list[CurvePoint]:
    """Points no other point beats in both bytes and error, by bytes ascending."""
    front: list[CurvePoint] = []
    for point in sorted(points, key=lambda p: (p.bytes_per_token, p.error)):
        if not front or point.error < front[-1].error:
            front.append(point)
    return front
