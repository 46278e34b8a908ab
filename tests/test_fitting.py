"""PCA fitting and plan variants, incl. the pieces the quality benchmark's ablations are built from."""

from __future__ import annotations

import torch

from benchmarks.ablations import identity_rope
from lmcache_kvtc.calibrate.fitting import FeatureCovariance, Planner
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
