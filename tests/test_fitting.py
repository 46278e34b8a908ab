"""PCA fitting and plan variants, incl. the pieces the quality benchmark's ablations are built from."""

from __future__ import annotations

import pytest
import torch

from benchmarks.ablations import identity_rope
from lmcache_kvtc.calibrate.fitting import (
    EXACT_MAX_FEATURES,
    SKETCH_RANK,
    FeatureCovariance,
    Planner,
    SketchedCovariance,
    new_accumulator,
)
from lmcache_kvtc.codec import token_features


def _correlated(rng, tokens: int, groups: int, size: int) -> torch.Tensor:
    """Features whose groups are correlated with each other (as layers of a KV cache are)."""
    shared = torch.randn(tokens, size, generator=rng)
    parts = [shared * (g + 1) + 0.3 * torch.randn(tokens, size, generator=rng) for g in range(groups)]
    return torch.cat(parts, dim=1) + 5.0


def test_per_group_pca_is_block_diagonal_orthonormal_and_loses_to_joint_pca(rng):
    x = _correlated(rng, 4000, groups=4, size=8)
    acc = FeatureCovariance(32)
    acc.add(x[:2000])
    acc.add(x[2000:])
    joint, per_group = acc.pca(), acc.pca(groups=4)
    for basis in (joint.basis, per_group.basis):
        assert torch.allclose(basis.T @ basis, torch.eye(32), atol=1e-5)
    for column in per_group.basis.T:  # every direction lives inside one group
        assert (column.abs() > 1e-6).reshape(4, 8).any(dim=1).sum() == 1

    def kept_energy(basis, rank: int) -> float:
        c = (x - joint.mean) @ basis.basis[:, :rank]
        return float(c.square().sum() / (x - joint.mean).square().sum())

    assert kept_energy(joint, 8) > 0.95 > kept_energy(per_group, 8)  # cross-layer redundancy is what PCA removes


def test_identity_rope_leaves_keys_as_cached(eval_kv, small_calibration):
    kv = eval_kv[0][:, :, :64]
    features = token_features(kv, torch.arange(64), identity_rope(small_calibration.rope))
    assert torch.equal(features[0], kv[0].float().transpose(0, 1).reshape(64, -1))
    derotated = token_features(kv, torch.arange(64), small_calibration.rope)
    assert not torch.allclose(derotated[0], features[0])


def test_plans_fit_their_budget_on_held_out_tokens_and_the_split_follows_the_key_weight(rng):
    x = _correlated(rng, 3000, groups=8, size=32) * torch.logspace(0, -2, 256)
    features = torch.stack((x, x.flip(1) * 0.5))  # [2, N, p]
    streams = {}
    for i, s in enumerate(("keys", "values")):
        acc = FeatureCovariance(256)
        acc.add(features[i, :2000])
        streams[s] = acc.pca()
    planner = Planner(streams, features[:, 2000:], min_ratio=4)
    even, keyed = planner.plans((4, 8, 16)), planner.plans((4, 8, 16), key_weight=64.0)
    for plans in (even, keyed):
        for finer, coarser in zip(plans, plans[1:], strict=False):
            total = sum(coarser.bits_per_token(s) for s in ("keys", "values"))
            assert total <= 2 * 16 * 256 / coarser.ratio  # coded bits on the held-out tokens, K and V together
            assert sum(finer.expected_error.values()) < sum(coarser.expected_error.values())
    for plan in even:
        assert all(plan.bits_per_token(s) <= 16 * 256 / plan.ratio for s in ("keys", "values"))
    for a, b in zip(even, keyed, strict=True):  # weighting the keys' error moves bits to the keys
        assert b.expected_error["keys"] < a.expected_error["keys"]
        assert b.bits_per_token("keys") > a.bits_per_token("keys")


def test_layer_scaling_evens_out_relative_error_across_layers_and_inverts_exactly(rng):
    # four layers, each two latent directions + a little noise; one layer 30× louder (Gemma 3's first layers)
    layers = [torch.randn(4000, 2, generator=rng) @ torch.randn(2, 8, generator=rng) for _ in range(4)]
    x = torch.cat(layers, dim=1) + 0.2 * torch.randn(4000, 32, generator=rng)
    x[:, :8] *= 30.0
    acc = FeatureCovariance(32)
    acc.add(x)
    plain, scaled = acc.pca(), acc.pca(scale=acc.layer_scale(4))
    assert torch.allclose(scaled.reconstruct(scaled.project(x)), x, rtol=1e-4, atol=1e-3)

    def worst_layer_error(basis) -> float:
        error = (basis.reconstruct(basis.project(x, 8)) - x).square().reshape(4000, 4, 8).sum(dim=(0, 2))
        return float((error / (x - x.mean(dim=0)).square().reshape(4000, 4, 8).sum(dim=(0, 2))).max())

    assert worst_layer_error(scaled) < 0.05 < 0.5 < worst_layer_error(plain)


def _spectrum_features(rng, tokens: int, features: int, decay: float = 2.0) -> torch.Tensor:
    """Features whose covariance eigenvalues fall as ``i^-decay`` (the 0.5B's fitted decay is 1.9-2.2), rotated."""
    rotation, _ = torch.linalg.qr(torch.randn(features, features, generator=rng))
    sigmas = torch.arange(1, features + 1).float() ** (-decay / 2)
    return (torch.randn(tokens, features, generator=rng) * sigmas) @ rotation.T + 3.0


def test_sketched_fit_finds_the_leading_directions_in_bounded_memory(rng):
    x = _spectrum_features(rng, 6000, 256)
    exact, sketch = FeatureCovariance(256), new_accumulator(256, max_rank=32)
    for part in x.split(700):
        exact.add(part)
        sketch.add(part)
    assert isinstance(sketch, SketchedCovariance) and sketch.sketch.shape == (96, 256)  # 2 × 1.5 × rank rows
    full, capped = exact.pca(), sketch.pca()
    assert capped.basis.shape == (256, 32) and capped.eigenvalues.shape == (256,)
    assert torch.allclose(capped.basis.T @ capped.basis, torch.eye(32), atol=1e-4)
    assert torch.allclose(capped.mean, full.mean, atol=1e-5)
    assert torch.isclose(capped.eigenvalues.sum(), full.eigenvalues.sum(), rtol=1e-6)  # exact total variance
    held_out = _spectrum_features(torch.Generator().manual_seed(9), 2000, 256) - full.mean  # same law, new draw

    def residual(basis, rank: int) -> float:
        c = held_out @ basis.basis[:, :rank]
        return float(held_out.square().sum() - c.square().sum())

    for rank in (8, 16, 32):  # the energy a plan of that rank drops: within 3 % of the exact fit's, up to the cap
        assert residual(capped, rank) <= 1.03 * residual(full, rank), rank


def test_sketched_fit_scales_features_like_the_exact_fit(rng):
    x = _spectrum_features(rng, 4000, 64)
    x[:, :16] *= 30.0  # one loud "layer" of four
    exact, sketch = FeatureCovariance(64), SketchedCovariance(64, 48)
    exact.add(x)
    sketch.add(x)
    assert torch.allclose(sketch.layer_scale(4), exact.layer_scale(4), rtol=1e-5)
    a, b = exact.pca(scale=exact.layer_scale(4)), sketch.pca(scale=sketch.layer_scale(4))
    assert torch.allclose(a.eigenvalues[:8], b.eigenvalues[:8], atol=0.03)  # the sketch's shrinkage: ~0.02 here
    with pytest.raises(ValueError, match="per-layer"):
        sketch.pca(groups=4)


def test_rank_capped_plans_count_the_energy_outside_the_basis(rng):
    x = _spectrum_features(rng, 5000, 128, decay=1.0)  # a slow decay: much energy past a cap of 16
    features = torch.stack((x, x.flip(1)))
    full, capped = {}, {}
    for i, s in enumerate(("keys", "values")):
        exact, sketch = FeatureCovariance(128), SketchedCovariance(128, 16)
        exact.add(features[i, :4000])
        sketch.add(features[i, :4000])
        full[s], capped[s] = exact.pca(), sketch.pca()
    held_out = features[:, 4000:]
    for stream, index in (("keys", 0), ("values", 1)):
        centered = held_out[index] - capped[stream].mean
        inside = centered @ capped[stream].basis
        outside = float((centered.square().sum() - inside.square().sum()) / centered.shape[0])
        energy = float(held_out[index].double().square().sum(dim=1).mean())
        plan = Planner(capped, held_out, min_ratio=4).plans((4,))[0]
        assert plan.streams[stream].expected_error >= 0.99 * outside / energy
        assert plan.streams[stream].expected_error > Planner(full, held_out, 4).plans((4,))[0].expected_error[stream]


def test_new_accumulator_is_exact_up_to_the_limit_and_sketched_past_it():
    assert isinstance(new_accumulator(EXACT_MAX_FEATURES), FeatureCovariance)
    past = new_accumulator(EXACT_MAX_FEATURES + 64)
    assert isinstance(past, SketchedCovariance) and past.rank == SKETCH_RANK
    assert isinstance(new_accumulator(100, max_rank=100), FeatureCovariance)
