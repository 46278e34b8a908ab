"""Estimate a chunk's absolute base position from its post-RoPE keys.

LMCache's MP serde sees a chunk's KV but never its position. Keys in the cache are rotated by
RoPE at their absolute positions; the calibration mean of the *de-rotated* keys is far from
zero in many frequency pairs, so the right base position is the one whose de-rotation brings
the chunk's mean key closest to the calibration mean.

The search is analytic, so thousands of candidates cost next to nothing: de-rotate once by
the in-chunk offsets, take the chunk mean ``z`` (one complex number per layer, head and
frequency pair), and for a base ``p`` the distance to the calibration mean ``mu`` is
``const - 2·Re Σ z·conj(mu)·exp(-i·θ·p)``. Only the sum over (layer, frequency) of
``w = Σ_heads z·conj(mu)`` depends on the data; the candidate sweep is one small matmul.
A wrong estimate costs quality only: the codec stores the position it used and decode
re-applies exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..rope import RopeTable

#: leading tokens of a chunk left out of its mean: at position 0 they are attention sinks
#: whose keys are outliers the calibration never saw.
SKIP_TOKENS = 4


@dataclass(frozen=True)
class Estimate:
    start: int
    candidates: int
    margin: float  # best score minus the runner-up, relative to the best score's magnitude


class PositionEstimator:
    """Scores base positions ``0, stride, 2·stride, … < max_position`` for one calibration."""

    def __init__(self, rope: RopeTable, key_mean: torch.Tensor, kv_heads: int, max_position: int = 131072):
        if max_position < 1:
            raise ValueError("max_position must be positive")
        self.rope = rope
        self.kv_heads = kv_heads
        self.max_position = max_position
        layers, head_dim = rope.layers, rope.head_dim
        mu = key_mean.float().reshape(layers, kv_heads, head_dim)
        self._mu = self._phasors(mu)  # [L, H, F] complex
        self._theta = rope.inv_freq.double()  # [L, F]
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _phasors(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., head_dim]`` -> complex ``[..., rotary_dim/2]`` in the model's pair convention."""
        rot = x[..., : self.rope.rotary_dim]
        if self.rope.interleaved:
            a, b = rot[..., 0::2], rot[..., 1::2]
        else:
            half = self.rope.rotary_dim // 2
            a, b = rot[..., :half], rot[..., half:]
        return torch.complex(a.double(), b.double())

    def _table(self, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin of ``θ·p`` for every candidate ``p`` as ``[K, L·F]`` (cached per stride)."""
        if stride not in self._tables:
            positions = torch.arange(0, self.max_position, stride, dtype=torch.float64)
            angles = positions[:, None] * self._theta.reshape(1, -1)
            self._tables[stride] = (angles.cos(), angles.sin())
        return self._tables[stride]

    def scores(self, keys: torch.Tensor, stride: int) -> torch.Tensor:
        """Score per candidate (higher is closer to the calibration mean) for keys ``[L, T, H·D]``."""
        layers, tokens, hidden = keys.shape
        skip = SKIP_TOKENS if tokens > 2 * SKIP_TOKENS else 0
        offsets = torch.arange(skip, tokens, device=keys.device)
        local = self.rope.unrotate(keys[:, skip:], offsets, keys.dtype)  # de-rotated by in-chunk offset only
        z = self._phasors(local.mean(dim=1).reshape(layers, self.kv_heads, -1).cpu())
        w = (z * self._mu.conj()).sum(dim=1).reshape(-1)  # [L·F]
        cos, sin = self._table(stride)
        # Re(w · e^{-iθp}) = Re(w)·cos(θp) + Im(w)·sin(θp)
        return cos @ w.real + sin @ w.imag

    def estimate(self, keys: torch.Tensor, stride: int) -> Estimate:
        """The most likely base position (a multiple of ``stride``) of a chunk of keys ``[L, T, H·D]``."""
        if stride < 1:
            raise ValueError("stride must be positive")
        s = self.scores(keys, stride)
        top = torch.topk(s, min(2, s.numel()))
        best = int(top.indices[0])
        margin = float((top.values[0] - top.values[-1]) / top.values[0].abs().clamp_min(1e-12))
        return Estimate(start=best * stride, candidates=s.numel(), margin=margin)
