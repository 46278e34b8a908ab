"""Bridge between a transformers decoder LM and LMCache's KV layout ``[2, L, T, H*D]``.

LMCache keeps one tensor per chunk with K at index 0 and V at index 1, and per layer the KV heads concatenated
along the last dim: ``kv[0, l, t, h*D:(h+1)*D] == keys[l][0, h, t, :]`` where ``keys[l]`` is the
``[batch, heads, T, D]`` tensor of transformers' cache.  Keys in that cache are post-RoPE (and post-``k_norm`` for
Gemma 3, Qwen3, OLMo 2); :func:`prefill_with_prerope_keys` gives the same keys before RoPE so a codec's RoPE
removal can be checked exactly.

Gemma 3's default cache keeps only the last ``sliding_window - 1`` positions of its sliding-window layers.  We pass a
``DynamicCache()`` built *without* a config instead: every layer is then a full ``DynamicLayer``, so all layers hold
all ``T`` tokens; the sliding-window *mask* is still built from the model config, so outputs are unchanged.
Batch size 1 only.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import torch
from transformers import DynamicCache

from ..errors import CalibrationError

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutputWithPast


def kv_dims(config: PretrainedConfig) -> tuple[int, int, int]:
    """``(layers, kv_heads, head_dim)`` of a decoder config (text sub-config for multimodal ones)."""
    cfg = config.get_text_config(decoder=True)
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return int(cfg.num_hidden_layers), int(kv_heads), int(head_dim)


def fastest_dtype(device: str | torch.device = "cpu") -> torch.dtype:
    """The dtype to prefill calibration text in: bf16 on a GPU; on a CPU whichever of bf16 and fp32 multiplies
    faster here, measured (~0.1 s). bf16 is 2.2x faster than fp32 on an EPYC with AVX512-BF16; where oneDNN has no
    bf16 instructions (AVX2, AVX512 without BF16) it is 2.4-3.8x slower. Captured KV is rounded to bf16 either way
    (what vLLM caches), so the choice changes speed, not what is fitted."""
    if torch.device(device).type != "cpu":
        return torch.bfloat16
    x, w = torch.randn(512, 1024), torch.randn(1024, 1024)
    seconds = {}
    for dtype in (torch.bfloat16, torch.float32):
        a, b = x.to(dtype), w.to(dtype)
        a @ b
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        seconds[dtype] = time.perf_counter() - started
    return min(seconds, key=seconds.get)


def _as_batch(input_ids: torch.Tensor) -> torch.Tensor:
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"expected input_ids of shape [T] or [1, T], got {tuple(ids.shape)}")
    return ids.long()


def kv_from_cache(cache: DynamicCache) -> torch.Tensor:
    """Stack a transformers cache (batch 1) into ``[2, L, T, H*D]``; raises if a layer holds fewer tokens."""
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    if any(k is None for k in keys):
        raise ValueError("cache has uninitialized layers")
    lengths = {k.shape[-2] for k in keys} | {v.shape[-2] for v in values}
    if len(lengths) != 1:
        raise ValueError(f"cache layers hold different token counts {sorted(lengths)} (sliding-window cache?)")
    if keys[0].shape[0] != 1:
        raise ValueError("batch size must be 1")

    def flat(x: torch.Tensor) -> torch.Tensor:  # [1, H, T, D] -> [T, H*D]
        return x[0].transpose(0, 1).reshape(x.shape[-2], -1)

    return torch.stack([torch.stack([flat(k) for k in keys]), torch.stack([flat(v) for v in values])])


@torch.inference_mode()
def prefill(
    model: PreTrainedModel, input_ids: torch.Tensor, logits_to_keep: int = 0
) -> tuple[torch.Tensor, CausalLMOutputWithPast]:
    """Run ``input_ids`` through ``model`` keeping ALL tokens of every layer; return ``(kv, outputs)``.

    ``kv`` is ``[2, L, T, H*D]`` in the model dtype; ``outputs.past_key_values`` is the full ``DynamicCache``.
    ``logits_to_keep`` (0 = all) limits the logits computed, which matters for Gemma's 262k vocabulary.
    """
    ids = _as_batch(input_ids).to(model.device)
    cache = DynamicCache()  # no config -> every layer a full DynamicLayer (also Gemma 3's sliding layers)
    out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=logits_to_keep)
    kv = kv_from_cache(out.past_key_values)
    if kv.shape[2] != ids.shape[1]:
        raise RuntimeError(f"cache holds {kv.shape[2]} tokens, expected {ids.shape[1]}")
    return kv, out


def cache_from_kv(kv: torch.Tensor, config: PretrainedConfig | int) -> DynamicCache:
    """Rebuild a ``DynamicCache`` from ``[2, L, T, H*D]`` so the model can continue with
    ``model(next_ids, past_key_values=cache)``; ``config`` (or the number of KV heads) says how to split ``H*D``.

    Every layer becomes a full ``DynamicLayer``, which is what :func:`prefill` produces for all model kinds.
    """
    if kv.dim() != 4 or kv.shape[0] != 2:
        raise ValueError(f"expected kv of shape [2, L, T, H*D], got {tuple(kv.shape)}")
    _, n_layers, t, hd = kv.shape
    if isinstance(config, int):
        kv_heads = config
    else:
        n_cfg, kv_heads, head_dim = kv_dims(config)
        if (n_cfg, kv_heads * head_dim) != (n_layers, hd):
            raise ValueError(f"kv shape {tuple(kv.shape)} does not match config (L={n_cfg}, H*D={kv_heads * head_dim})")
    if hd % kv_heads:
        raise ValueError(f"H*D={hd} not divisible by {kv_heads} heads")

    def unflat(x: torch.Tensor) -> torch.Tensor:  # [T, H*D] -> [1, H, T, D]
        return x.reshape(t, kv_heads, hd // kv_heads).transpose(0, 1).unsqueeze(0).contiguous()

    return DynamicCache(ddp_cache_data=[(unflat(kv[0, i]), unflat(kv[1, i])) for i in range(n_layers)])


@torch.inference_mode()
def prefill_with_prerope_keys(model: PreTrainedModel, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kv, prerope)``: :func:`prefill`'s cache and its keys BEFORE RoPE as ``[L, T, H*D]`` (layout of ``kv[0]``).

    The keys are recorded where the model hands them to its modeling module's ``apply_rotary_pos_emb`` (after any
    ``k_norm``, whatever the projection: ``k_proj``, fused ``qkv_proj``, GPT-NeoX's ``query_key_value``). Families
    with partial rotary (GPT-NeoX, Phi) pass only the rotary dims; the rest of each head is not rotated, so it is
    taken from the cache. Used to prove that a RoPE table inverts the model's own RoPE exactly.
    """
    module = sys.modules[type(model).__module__]
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is None:
        raise CalibrationError(f"{module.__name__} has no apply_rotary_pos_emb: the model applies no RoPE kvtc knows")
    recorded: list[torch.Tensor] = []

    def recording(q: torch.Tensor, k: torch.Tensor, *args: object, **kwargs: object):
        recorded.append(k[0].transpose(0, 1))  # [1, H, T, d] -> [T, H, d]
        return original(q, k, *args, **kwargs)

    module.apply_rotary_pos_emb = recording
    try:
        kv, _ = prefill(model, input_ids, logits_to_keep=1)
    finally:
        module.apply_rotary_pos_emb = original
    layers, kv_heads, head_dim = kv_dims(model.config)
    if kv.shape[1] != layers or kv.shape[3] != kv_heads * head_dim:
        raise CalibrationError(f"the cache {tuple(kv.shape)} is not [2, {layers} layers, T, {kv_heads} KV heads × "
                               f"head_dim {head_dim}] as the config says")
    if len(recorded) != layers:
        raise CalibrationError(f"the model applied RoPE {len(recorded)} times for {layers} layers")
    tokens = kv.shape[2]
    cached = kv[0].reshape(layers, tokens, -1, head_dim)
    prerope = torch.stack(recorded)
    if prerope.shape[:3] != cached.shape[:3] or prerope.shape[-1] > head_dim:
        raise CalibrationError(f"keys given to RoPE {tuple(prerope.shape)} do not fit the cache {tuple(cached.shape)}")
    prerope = torch.cat([prerope, cached[..., prerope.shape[-1]:]], dim=-1)  # partial rotary: the rest as cached
    return kv, prerope.reshape(layers, tokens, -1)
