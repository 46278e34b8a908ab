"""A tiny calibration fitted on synthetic low-rank KV (2 layers × 2 heads × 32), for tests of formats, packing
and errors that need no real model, and for the golden blobs (``tests/golden/make_golden.py``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from lmcache_kvtc.calibrate.fitting import fit_calibration
from lmcache_kvtc.calibration import Calibration
from lmcache_kvtc.codec import token_features
from lmcache_kvtc.rope import RopeTable


def synthetic_calibration(layers: int = 2, heads: int = 2, head_dim: int = 32, seed: int = 0
                          ) -> tuple[Calibration, Callable[..., torch.Tensor]]:
    """The calibration, and ``make(tokens, start=0)``: more KV ``[2, L, T, H·D]`` (bf16, RoPE applied) from the
    same distribution, drawn from the same seeded generator."""
    g = torch.Generator().manual_seed(seed)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    rope = RopeTable(inv_freq=inv.repeat(layers, 1), attention_scaling=torch.ones(layers), head_dim=head_dim)
    p = layers * heads * head_dim
    mixing = torch.randn(2, 16, p, generator=g)

    def make(tokens: int, start: int = 0) -> torch.Tensor:
        z = torch.randn(2, tokens, 16, generator=g)
        feats = torch.einsum("stk,skp->stp", z, mixing) + 0.05 * torch.randn(2, tokens, p, generator=g) + 3
        kv = feats.reshape(2, tokens, layers, heads * head_dim).permute(0, 2, 1, 3).contiguous()
        kv[0] = rope.rotate(kv[0], torch.arange(start, start + tokens), torch.bfloat16)
        return kv.to(torch.bfloat16)

    batches = [token_features(make(256), torch.arange(256), rope) for _ in range(4)]
    calibration = fit_calibration(model_id="synthetic", kv_heads=heads, head_dim=head_dim, rope=rope,
                                  fit_batches=batches, heldout=token_features(make(256), torch.arange(256), rope),
                                  ratios=(8.0, 16.0))
    return calibration, make


def tensor_digest(kv: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes: equal digests are bit-identical tensors."""
    kv = kv.contiguous()
    header = f"{kv.dtype} {tuple(kv.shape)}".encode()
    return hashlib.sha256(header + kv.view(torch.uint8).numpy().tobytes()).hexdigest()
