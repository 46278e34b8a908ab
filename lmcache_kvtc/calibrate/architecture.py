"""Which transformers decoders KVTC can calibrate, and a RoPE table proven exact on the model's own forward pass.

KVTC codes per-layer K and V heads whose keys carry RoPE at known positions. Models that do not fit are refused
before any text is prefilled, each with one line saying why:

* MLA (DeepSeek-V2/V3, Kimi K2): vLLM caches one latent stream ``[kv_lora_rank + rope_dim]`` per token, not
  K and V heads (transformers even expands it per head), so neither the capture nor the serde's layouts fit;
* hybrid models whose layers are not all attention (linear attention, Mamba/SSM): those layers keep no KV;
* models without a RoPE transformers can describe (ALiBi, learned positions) and RoPE that rescales with the
  sequence length (``dynamic``, ``longrope``: see :mod:`lmcache_kvtc.rope`).

Whether a model rotates halves (Llama, Qwen, Gemma, ...) or interleaved pairs (Cohere, GPT-J style) is not in its
config: :func:`verified_rope_table` tries both on a real context and keeps the one that inverts the cache to the
model's own rounding, refusing the model when neither does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..errors import CalibrationError
from ..rope import RopeTable, rope_table_from_hf_config
from .capture import prefill_with_prerope_keys

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig, PreTrainedModel

#: layer types that keep a KV cache of every token they attend to (vLLM caches all of them)
ATTENTION_LAYER_TYPES = {"attention", "full_attention", "sliding_attention", "chunked_attention"}
#: a RoPE table is exact when no key is further from the model's than this many times the rounding bound
EXACT = 1.0


def check_architecture(config: PretrainedConfig) -> None:
    """Raise :class:`CalibrationError` with the reason when KVTC cannot code this model's KV cache."""
    cfg = config.get_text_config(decoder=True)
    if getattr(cfg, "kv_lora_rank", None):
        raise CalibrationError(
            f"{cfg.model_type} uses MLA (kv_lora_rank={cfg.kv_lora_rank}): its cache is one latent stream per token, "
            "not K and V heads; kvtc does not code MLA caches"
        )
    layer_types = getattr(cfg, "layer_types", None) or getattr(cfg, "layers_block_type", None) or []
    other = sorted(set(layer_types) - ATTENTION_LAYER_TYPES)
    if other:
        raise CalibrationError(
            f"{cfg.model_type} is hybrid: layers of type {', '.join(other)} keep no KV cache; kvtc codes models "
            "whose layers are all attention"
        )
    rope_table_from_hf_config(cfg)  # raises for models without RoPE and for RoPE that rescales with length


def rope_error(rope: RopeTable, cached: torch.Tensor, prerope: torch.Tensor) -> float:
    """How far ``rope`` is from inverting the model's RoPE: the worst key's error over its rounding bound.

    ``cached``/``prerope`` are ``[L, T, H*D]`` keys after/before the model's RoPE at positions ``0..T-1``.
    The model rounds ``k·cos``, ``rotate(k)·sin`` and their sum to its dtype; an exact inverse turns those
    three roundings of a pair into at most about four roundings of the head's largest key (the bound used
    here). 1.0 or less is exact; the wrong convention or wrong frequencies are hundreds of times off.
    """
    layers, tokens, _ = cached.shape
    unrotated = rope.unrotate(cached, torch.arange(tokens), cached.dtype).reshape(layers, tokens, -1, rope.head_dim)
    expected = prerope.float().reshape(unrotated.shape)
    rounding = torch.finfo(cached.dtype).eps / 2
    bound = 4 * rounding * expected.abs().amax(-1, keepdim=True) + 1e-6
    return float(((unrotated - expected).abs() / bound).amax())


def verified_rope_table(model: PreTrainedModel, input_ids: torch.Tensor) -> RopeTable:
    """The model's RoPE table, proven exact on ``input_ids`` (prefilled once); refused when no convention is."""
    config = model.config.get_text_config(decoder=True)
    kv, prerope = prefill_with_prerope_keys(model, input_ids)
    kv, prerope = kv.cpu(), prerope.cpu()
    errors = {}
    for interleaved in (False, True):
        rope = rope_table_from_hf_config(config, interleaved=interleaved)
        errors[interleaved] = rope_error(rope, kv[0], prerope)
        if errors[interleaved] <= EXACT:
            return rope
    raise CalibrationError(
        f"{config.model_type}: neither rotate-half nor interleaved RoPE inverts the model's keys exactly "
        f"(worst key {min(errors.values()):.1f}× the rounding bound); kvtc cannot remove this model's RoPE"
    )
