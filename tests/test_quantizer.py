"""The uniform quantizer and the rate–distortion curves the plans are chosen from (no model needed)."""

from __future__ import annotations

import zlib

import pytest
import torch

from lmcache_kvtc.calibrate.planning import CurvePoint, curve, measure, pareto_front
from lmcache_kvtc.quantizer import NARROW_LIMIT, WIDE_LIMIT, dequantize, quantize, section_size, wide_count


def _coefficients(rng, tokens: int = 300, rank: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    sigmas = torch.logspace(1.5, -1.5, rank)
    return torch.randn(tokens, rank, generator=rng) * sigmas, sigmas


@pytest.mark.parametrize("step", [0.01, 0.3, 2.0])
def test_symbols_round_to_the_nearest_step_within_range(rng, step):
    c, sigmas = _coefficients(rng)
    wide = wide_count(sigmas, step, c.shape[1])
    stream = quantize(c, step, wide)
    assert stream.dtype == torch.uint8 and stream.numel() == section_size(c.shape[1], wide, c.shape[0])
    restored = dequantize(stream, step, c.shape[1], wide, c.shape[0])
    limit = torch.full((c.shape[1],), NARROW_LIMIT * step)
    limit[:wide] = WIDE_LIMIT * step
    inside = c.abs() <= limit
    assert ((restored - c).abs()[inside] <= step / 2 + 1e-5).all()
    assert torch.allclose(restored[~inside].abs(), limit.expand_as(c)[~inside])  # clamped, sign kept
    assert torch.equal(restored.sign()[inside & (c.abs() > step)], c.sign()[inside & (c.abs() > step)])


def test_wide_components_are_the_leading_ones_whose_spread_overflows_int8(rng):
    sigmas = torch.tensor([400.0, 100.0, 10.0, 1.0])
    assert wide_count(sigmas, 1.0, 4) == 2  # 8σ > 127 steps for the first two only
    assert wide_count(sigmas, 1.0, 1) == 1  # never more than the rank
    assert wide_count(sigmas, 100.0, 4) == 0
    big = torch.tensor([[-30000.0, 5000.0, -3.0, 0.4]])
    restored = dequantize(quantize(big, 1.0, 2), 1.0, 4, 2, 1)
    assert torch.equal(restored, torch.tensor([[-30000.0, 5000.0, -3.0, 0.0]]))


def test_measured_curve_point_is_what_the_codec_stores(rng):
    c, sigmas = _coefficients(rng, tokens=512)
    point = measure(c, sigmas, step=0.5, keep=0.35)
    assert point.rank == int((sigmas > 0.175).sum())
    size = 0
    for first in (0, 256):  # two chunks of 256 tokens, as LMCache hands them over
        part = c[first : first + 256, : point.rank]
        data = quantize(part, 0.5, point.wide).numpy().tobytes()
        coder = zlib.compressobj(1, zlib.DEFLATED, -15, 9, zlib.Z_HUFFMAN_ONLY)
        size += len(coder.compress(data) + coder.flush())
    assert point.bytes_per_token == pytest.approx(size / 512)
    restored = torch.zeros_like(c)
    for first in (0, 256):
        part = c[first : first + 256, : point.rank]
        restored[first : first + 256, : point.rank] = dequantize(quantize(part, 0.5, point.wide), 0.5, point.rank,
                                                                 point.wide, 256)
    assert point.error == pytest.approx(float((restored - c).double().square().sum()) / 512, rel=1e-6)


def test_curve_is_a_pareto_front_that_trades_bytes_for_error(rng):
    c, sigmas = _coefficients(rng)
    front = curve(c, sigmas, max_bytes_per_token=30.0)
    assert len(front) > 10
    pairs = zip(front, front[1:], strict=False)
    assert all(a.bytes_per_token < b.bytes_per_token and a.error > b.error for a, b in pairs)
    assert front[-1].bytes_per_token > 30.0 > front[0].bytes_per_token  # measured until past the budget
    # entropy coding pays: at ~2 bits/value, the coded stream is far below one byte per kept component
    point = min(front, key=lambda p: abs(p.bytes_per_token - 10))
    assert point.bytes_per_token < 0.6 * point.rank


def test_pareto_front_drops_dominated_points():
    points = [CurvePoint(1.0, 1, 0, b, e) for b, e in ((3, 1.0), (1, 5.0), (2, 6.0), (2, 2.0), (4, 1.0))]
    assert [(p.bytes_per_token, p.error) for p in pareto_front(points)] == [(1, 5.0), (2, 2.0), (3, 1.0)]

