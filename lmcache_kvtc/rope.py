"""Exact RoPE removal and re-application, driven by the model's own rotary module.

The frequencies are read once, at calibration time, from the model's Hugging Face
rotary embedding (so theta, llama3/yarn/linear scaling, partial rotary and per-layer-type
theta such as Gemma 3's local/global layers all come from transformers itself) and are
stored in the calibration. At run time the codec needs only torch.

The model computes ``cos``/``sin`` in fp32 and casts them to the cache dtype before
rotating, so the rotation it applied is ``[[c, -s], [s, c]]`` with *rounded* c and s.
We invert that exact matrix (dividing by ``c² + s²``), which makes un-rotation exact up
to the bf16 rounding of the model's own forward pass.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from .errors import CalibrationError

#: rope types whose frequencies change with sequence length: a stored table cannot be exact.
_DYNAMIC_ROPE_TYPES = {"dynamic", "longrope"}


@dataclass(frozen=True)
class RopeTable:
    """Per-layer inverse frequencies and attention scaling of a model's RoPE."""

    inv_freq: torch.Tensor  # [layers, rotary_dim // 2] float32
    attention_scaling: torch.Tensor  # [layers] float32
    head_dim: int
    interleaved: bool = False  # GPT-J style (x0,x1),(x2,x3) pairs instead of rotate-half

    @property
    def layers(self) -> int:
        return self.inv_freq.shape[0]

    @property
    def rotary_dim(self) -> int:
        return 2 * self.inv_freq.shape[1]

    def _cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[layers, T, rotary_dim/2]`` exactly as the model computes them, in fp32.

        Always computed on the CPU (the table is small) so GPU and CPU codecs agree bit for bit.
        """
        scaling = self.attention_scaling[:, None, None]
        freqs = positions.cpu().float()[None, :, None] * self.inv_freq[:, None, :]
        cos = (freqs.cos() * scaling).to(dtype).float()
        sin = (freqs.sin() * scaling).to(dtype).float()
        return cos.to(positions.device), sin.to(positions.device)

    def _pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rot = x[..., : self.rotary_dim]
        if self.interleaved:
            return rot[..., 0::2], rot[..., 1::2]
        half = self.rotary_dim // 2
        return rot[..., :half], rot[..., half:]

    def _merge(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            rot = torch.stack((a, b), dim=-1).flatten(-2)
        else:
            rot = torch.cat((a, b), dim=-1)
        return torch.cat((rot, x[..., self.rotary_dim :]), dim=-1)

    def _apply(self, keys: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype, inverse: bool) -> torch.Tensor:
        layers, tokens, hidden = keys.shape
        if layers != self.layers or hidden % self.head_dim:
            expected = f"{self.layers} layers × head_dim {self.head_dim}"
            raise ValueError(f"keys {tuple(keys.shape)} do not match RoPE of {expected}")
        x = keys.float().reshape(layers, tokens, hidden // self.head_dim, self.head_dim)
        cos, sin = self._cos_sin(positions, dtype)
        cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
        a, b = self._pairs(x)
        if inverse:
            det = cos * cos + sin * sin
            a, b = (a * cos + b * sin) / det, (b * cos - a * sin) / det
        else:
            a, b = a * cos - b * sin, b * cos + a * sin
        return self._merge(x, a, b).reshape(layers, tokens, hidden)

    def rotate(self, keys: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Apply RoPE to de-rotated keys ``[layers, T, H*D]`` (fp32 result); ``dtype`` is the cache dtype."""
        return self._apply(keys, positions, dtype, inverse=False)

    def unrotate(self, keys: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Remove RoPE from cached keys ``[layers, T, H*D]`` at absolute ``positions`` (fp32 result)."""
        return self._apply(keys, positions, dtype, inverse=True)


def rope_table_from_hf_config(config, interleaved: bool = False) -> RopeTable:
    """Build the table from a transformers config using the model's own rotary embedding class."""
    rotary = _rotary_class(config)(config=config)
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer_types = getattr(config, "layer_types", None) or [None] * layers
    rope_types = getattr(rotary, "rope_type", None)
    inv_freqs, scalings = [], []
    for layer_type in layer_types:
        if hasattr(rotary, "inv_freq"):
            inv_freq, scaling, rope_type = rotary.inv_freq, rotary.attention_scaling, rope_types
        else:
            inv_freq = getattr(rotary, f"{layer_type}_inv_freq")
            scaling = getattr(rotary, f"{layer_type}_attention_scaling")
            rope_type = rope_types.get(layer_type) if isinstance(rope_types, dict) else rope_types
        if rope_type in _DYNAMIC_ROPE_TYPES:
            raise CalibrationError(f"rope_type {rope_type!r} rescales with sequence length; KVTC needs a fixed RoPE")
        inv_freqs.append(inv_freq.detach().float().cpu())
        scalings.append(float(scaling))
    return RopeTable(
        inv_freq=torch.stack(inv_freqs),
        attention_scaling=torch.tensor(scalings, dtype=torch.float32),
        head_dim=head_dim,
        interleaved=interleaved,
    )


def _rotary_class(config):
    """The ``<Arch>RotaryEmbedding`` class that lives next to the model's causal-LM class."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    lm_name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type)
    if lm_name is None:
        raise CalibrationError(f"no causal-LM class known for model_type {config.model_type!r}")
    module = sys.modules[getattr(transformers, lm_name).__module__]
    name = lm_name.removesuffix("ForCausalLM") + "RotaryEmbedding"
    if not hasattr(module, name):
        raise CalibrationError(f"{config.model_type}: no RoPE ({module.__name__} has no {name}: ALiBi or learned "
                               "positions?); kvtc removes RoPE and codes RoPE models only")
    return getattr(module, name)
