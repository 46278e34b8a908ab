"""RoPE removal is the model's own RoPE, inverted exactly (up to the model's bf16 forward rounding)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from calibration import texts
from lmcache_kvtc.calibrate.architecture import rope_error, verified_rope_table
from lmcache_kvtc.calibrate.capture import prefill_with_prerope_keys
from lmcache_kvtc.rope import RopeTable, rope_table_from_hf_config

BF16_EPS = 2.0**-8


def _real_keys(model, tokenizer, tokens: int):
    ids = texts.token_contexts(tokenizer, texts.python_docs(), 1, tokens, seed=2)[0]
    kv, prerope = prefill_with_prerope_keys(model, ids)
    return kv[0], prerope, torch.arange(tokens)


def _check_exact(rope: RopeTable, cached: torch.Tensor, pre: torch.Tensor, positions: torch.Tensor) -> None:
    # The model rounded k·cos, rotate_half(k)·sin and their sum to bf16: the error is bounded by that rounding.
    assert rope_error(rope, cached, pre) <= 1.0
    # Re-rotating reproduces the cache: bit-identical almost everywhere, never more than one bf16 ulp off.
    rerotated = rope.rotate(rope.unrotate(cached, positions, cached.dtype), positions, cached.dtype).to(cached.dtype)
    assert (rerotated == cached).float().mean() > 0.999
    assert ((rerotated.float() - cached.float()).abs() <= BF16_EPS * cached.float().abs() + 1e-6).all()


def test_qwen_rope_unrotation_is_exact_on_a_real_cache(qwen05):
    model, tokenizer = qwen05
    rope = rope_table_from_hf_config(model.config)
    assert torch.allclose(rope.inv_freq[:, 1], torch.tensor(1e6 ** (-2 / 64)))  # theta 1e6 from the config
    cached, pre, positions = _real_keys(model, tokenizer, 300)
    _check_exact(rope, cached, pre, positions)
    wrong_theta = dataclasses.replace(rope, inv_freq=rope.inv_freq ** (4 / 6))  # ~theta 1e4
    assert (wrong_theta.unrotate(cached, positions, cached.dtype) - pre.float()).abs().max() > 1.0
    assert rope_error(wrong_theta, cached, pre) > 50
    verified = verified_rope_table(model, texts.token_contexts(tokenizer, texts.python_docs(), 1, 200, seed=4)[0])
    assert torch.equal(verified.inv_freq, rope.inv_freq) and not verified.interleaved


def test_gemma_rope_uses_per_layer_theta_and_covers_sliding_layers(gemma):
    model, tokenizer = gemma
    config = model.config.get_text_config(decoder=True)
    rope = rope_table_from_hf_config(config)
    sliding = [i for i, t in enumerate(config.layer_types) if t == "sliding_attention"]
    full = [i for i, t in enumerate(config.layer_types) if t == "full_attention"]
    assert sliding and full
    assert not torch.equal(rope.inv_freq[sliding[0]], rope.inv_freq[full[0]])  # two thetas
    cached, pre, positions = _real_keys(model, tokenizer, 600)  # longer than the 512 sliding window
    _check_exact(rope, cached, pre, positions)
    swapped = rope.inv_freq.clone()
    swapped[full] = rope.inv_freq[sliding[0]]
    wrong = dataclasses.replace(rope, inv_freq=swapped)
    assert (wrong.unrotate(cached, positions, cached.dtype)[full] - pre[full].float()).abs().max() > 1.0


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rotary_fraction", [1.0, 0.5])
def test_rotate_and_unrotate_are_inverse_in_fp32(interleaved, rotary_fraction, rng):
    layers, head_dim = 3, 64
    rotary = int(head_dim * rotary_fraction)
    inv_freq = (1.0 / 10000 ** (torch.arange(0, rotary, 2).float() / rotary)).repeat(layers, 1)
    rope = RopeTable(inv_freq, torch.tensor([1.0, 0.7, 1.3]), head_dim, interleaved)
    keys = torch.randn(layers, 50, 2 * head_dim, generator=rng)
    positions = torch.arange(1000, 1050)
    roundtrip = rope.unrotate(rope.rotate(keys, positions, torch.float32), positions, torch.float32)
    assert torch.allclose(roundtrip, keys, atol=1e-4)
    if rotary_fraction < 1:  # the non-rotary tail of every head is untouched
        rotated = rope.rotate(keys, positions, torch.float32).view(layers, 50, 2, head_dim)
        assert torch.equal(rotated[..., rotary:], keys.view(layers, 50, 2, head_dim)[..., rotary:])
