"""Tiny randomly initialised decoders of the model families users bring, built offline from transformers configs.

Random weights, real code paths: each family's own attention (fused projections, q/k norms, partial or
interleaved rotary, RoPE scaling, sliding layers) produces the KV cache kvtc has to code.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 256}
LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
            "factor": 16.0, "original_max_position_embeddings": 256}

#: family -> (transformers model_type, config overrides, what the family brings)
SUPPORTED = {
    "Llama 3.x": ("llama", {"rope_parameters": LLAMA3_ROPE}, "llama3 RoPE scaling"),
    "Mistral": ("mistral", {}, "plain RoPE, GQA"),
    "Qwen3": ("qwen3", {"head_dim": 32}, "per-head q/k RMSNorm before RoPE"),
    "Phi-3 / Phi-4-mini": ("phi3", {"partial_rotary_factor": 0.5}, "fused qkv_proj, partial rotary"),
    "Gemma 2": ("gemma2", {"head_dim": 32, "sliding_window": 64, "query_pre_attn_scalar": 32},
                "alternating sliding/full layers, logit soft-capping"),
    "GPT-NeoX / Pythia": ("gpt_neox", {"rotary_pct": 0.25, "num_key_value_heads": None},  # no GQA
                          "fused query_key_value, 25% partial rotary"),
    "OLMo 2": ("olmo2", {}, "k_norm over the whole projection before RoPE"),
    "Cohere Command-R": ("cohere", {}, "interleaved (GPT-J style) rotary pairs"),
    "GLM-4": ("glm", {"partial_rotary_factor": 0.5, "head_dim": 16}, "interleaved partial rotary"),
}

#: family -> (model_type, config overrides, words the refusal must contain)
REFUSED = {
    "Phi-3 128k (longrope)": ("phi3", {"rope_parameters": LONGROPE}, "rescales with sequence length"),
    "DeepSeek-V3 (MLA)": ("deepseek_v3", {"kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8,
                                          "qk_nope_head_dim": 8, "v_head_dim": 16, "n_routed_experts": 4,
                                          "num_experts_per_tok": 2, "first_k_dense_replace": 2}, "MLA"),
    "Qwen3-Next (linear attention)": ("qwen3_next", {"head_dim": 16, "linear_num_value_heads": 2,
                                                     "linear_num_key_heads": 2, "linear_key_head_dim": 16,
                                                     "linear_value_head_dim": 16, "num_experts": 4,
                                                     "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                                     "full_attention_interval": 2}, "hybrid"),
    "Jamba (Mamba layers)": ("jamba", {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 2,
                                       "expert_layer_offset": 1, "num_experts": 2, "mamba_d_state": 4,
                                       "mamba_d_conv": 2, "mamba_expand": 2}, "hybrid"),
    "BLOOM (ALiBi)": ("bloom", {"n_layer": 2, "n_head": 4}, "RoPE"),
}

BASE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 4096, "tie_word_embeddings": True,
        "pad_token_id": 0, "bos_token_id": 0, "eos_token_id": 0}


def build(model_type: str, overrides: dict, vocab_size: int, seed: int = 0):
    """A bf16 eval-mode model of ``model_type`` with :data:`BASE` sizes and ``overrides``."""
    config = AutoConfig.for_model(model_type, **{**BASE, "vocab_size": vocab_size, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()


def save(model, tokenizer, directory: Path) -> Path:
    """A model directory ``kvtc calibrate`` accepts: config, safetensors weights, tokenizer."""
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
