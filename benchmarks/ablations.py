"""KVTC ablations: the default calibration's recipe with one ingredient taken out.

- ``no RoPE removal``: PCA over the keys as cached (rotated); an identity RoPE table makes
  the unchanged codec skip un-rotation;
- ``per-layer PCA``: each layer decorrelated on its own (a block-diagonal basis over the same
  features), components ranked across layers for the same DP;
- ``greedy allocation``: the same bases, bits given by greedy refinement of 64-wide blocks.

All three come from one pass over the same text, contexts, held-out tokens and K/V split as
the default calibration, and are ordinary calibration files run through the real codec.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from calibration import texts
from calibration.calibrate import capture, default_calibration_path, load_model, split_contexts
from calibration.kv_capture import kv_dims
from lmcache_kvtc import Calibration
from lmcache_kvtc.fitting import Planner, assemble
from lmcache_kvtc.rope import RopeTable, rope_table_from_hf_config

log = logging.getLogger(__name__)

VARIANTS = ("no RoPE removal", "per-layer PCA", "greedy allocation")
ABLATION_RATIOS = (8.0, 16.0, 32.0)


def identity_rope(rope: RopeTable) -> RopeTable:
    """A table that rotates by zero: features are the keys exactly as cached."""
    return RopeTable(torch.zeros_like(rope.inv_freq), torch.ones_like(rope.attention_scaling), rope.head_dim,
                     rope.interleaved)


def _path(model: str, variant: str) -> Path:
    slug = variant.lower().replace(" ", "-")
    return default_calibration_path(model).parent / "ablations" / f"{model}.{slug}.safetensors"


def ablation_calibrations(model: str, ratios: Sequence[float] = ABLATION_RATIOS) -> dict[str, Calibration]:
    """The three ablated calibrations of ``model`` (built once, cached next to the default one)."""
    paths = {v: _path(model, v) for v in VARIANTS}
    if not all(p.exists() for p in paths.values()):
        for variant, cal in _build(model, ratios).items():
            paths[variant].parent.mkdir(parents=True, exist_ok=True)
            cal.save(paths[variant])
    return {v: Calibration.load(p) for v, p in paths.items()}


def _build(model: str, ratios: Sequence[float]) -> dict[str, Calibration]:
    reference = Calibration.load(default_calibration_path(model))
    info = reference.info
    key_weight = info.get("key_weight")
    lm, tokenizer = load_model(model)
    layers, kv_heads, head_dim = kv_dims(lm.config)
    rope = rope_table_from_hf_config(lm.config.get_text_config(decoder=True))
    context = info["context_tokens"]
    fit_ids, heldout_ids = split_contexts(tokenizer, texts.wikipedia_articles(), info["contexts"] * context, context,
                                          heldout_contexts=3)
    ropes = {"derotated": rope, "rotated": identity_rope(rope)}
    data = capture(lm, fit_ids, heldout_ids, ropes, desc=f"ablation calibrations for {model}")
    shape = {"model_id": reference.model_id, "kv_heads": kv_heads, "head_dim": head_dim}

    def calibration(variant: str, rope_name: str, groups: int = 1, greedy: bool = False) -> Calibration:
        streams = {s: c.pca(groups) for s, c in data.covariances[rope_name].items()}
        planner = Planner(streams, data.heldout[rope_name], min(ratios))
        plans = planner.plans(ratios, key_weight, greedy=greedy)
        return assemble(**shape, rope=ropes[rope_name], streams=streams, plans=plans,
                        info={"model": model, "ablation": variant, "source": info.get("source"),
                              "key_weight": key_weight, "heldout_energy": planner.energy})

    log.info("fitting ablations of %s with key_weight=%s", model, key_weight)
    return {
        "no RoPE removal": calibration("no RoPE removal", "rotated"),
        "per-layer PCA": calibration("per-layer PCA", "derotated", groups=layers),
        "greedy allocation": calibration("greedy allocation", "derotated", greedy=True),
    }
