"""KVTC ablations: the default calibration's recipe with one ingredient taken out.

- ``no RoPE removal``: PCA over the keys as cached (rotated); an identity RoPE table makes
  the unchanged codec skip un-rotation;
- ``per-layer PCA``: each layer decorrelated on its own (a block-diagonal basis over the same
  features), components ranked across layers for the same quantizer.

Both come from one pass over the same text, contexts, held-out tokens, normalization and
K/V split as the reference calibration, and are ordinary calibration files run through the real codec.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from calibration import models
from calibration.recipes import PROSE, prose_documents
from lmcache_kvtc import Calibration
from lmcache_kvtc.calibrate.capture import kv_dims
from lmcache_kvtc.calibrate.driver import capture, split_contexts
from lmcache_kvtc.calibrate.fitting import Planner, assemble
from lmcache_kvtc.rope import RopeTable, rope_table_from_hf_config

log = logging.getLogger(__name__)

VARIANTS = ("no RoPE removal", "per-layer PCA")
ABLATION_RATIOS = (8.0, 16.0, 32.0)


def identity_rope(rope: RopeTable) -> RopeTable:
    """A table that rotates by zero: features are the keys exactly as cached."""
    return RopeTable(torch.zeros_like(rope.inv_freq), torch.ones_like(rope.attention_scaling), rope.head_dim,
                     rope.interleaved)


def ablation_calibrations(reference_path: Path, ratios: Sequence[float] = ABLATION_RATIOS) -> dict[str, Calibration]:
    """The ablations of a prose-only calibration (``calibration.recipes --prose``), built once and cached next
    to it (keyed by its fingerprint)."""
    reference = Calibration.load(reference_path)
    tag = reference.fingerprint.hex()[:12]
    paths = {v: reference_path.parent / "ablations" / f"{tag}.{v.lower().replace(' ', '-')}.safetensors"
             for v in VARIANTS}
    if not all(p.exists() for p in paths.values()):
        for variant, cal in _build(reference, ratios).items():
            paths[variant].parent.mkdir(parents=True, exist_ok=True)
            cal.save(paths[variant])
    return {v: Calibration.load(p) for v, p in paths.items()}


def _build(reference: Calibration, ratios: Sequence[float]) -> dict[str, Calibration]:
    info = reference.info
    if not str(info.get("source", "")).startswith(PROSE):
        raise ValueError(f"ablations refit on {PROSE}; {reference.model_id} was calibrated on {info.get('source')!r}")
    model, key_weight, context = info["model"], info.get("key_weight"), info["context_tokens"]
    # the reference's capture dtype (the fastest on the machine that built it): its KV, to the last bit
    lm, tokenizer = models.load(model, dtype=getattr(torch, info.get("capture_dtype", "bfloat16")))
    layers = kv_dims(lm.config)[0]
    rope = rope_table_from_hf_config(lm.config.get_text_config(decoder=True))
    fit_ids, heldout_ids = split_contexts(tokenizer, prose_documents(), info["contexts"] * context, context,
                                          heldout_contexts=info.get("heldout_contexts", 3))
    ropes = {"derotated": rope, "rotated": identity_rope(rope)}
    data = capture(lm, fit_ids, heldout_ids, ropes, desc=f"ablation calibrations for {model}")

    normalize = info.get("normalize", "none")

    def calibration(variant: str, rope_name: str, groups: int = 1) -> Calibration:
        covariances = data.covariances[rope_name]
        streams = {s: c.pca(groups, c.layer_scale(layers) if normalize == "layer" else None)
                   for s, c in covariances.items()}
        planner = Planner(streams, data.heldout[rope_name], min(ratios))
        return assemble(model_id=reference.model_id, kv_heads=reference.kv_heads, head_dim=reference.head_dim,
                        rope=ropes[rope_name], streams=streams, plans=planner.plans(ratios, key_weight),
                        info={"model": model, "ablation": variant, "source": info["source"], "key_weight": key_weight,
                              "normalize": normalize, "heldout_energy": planner.energy})

    log.info("fitting ablations of %s with normalize=%s key_weight=%s", model, normalize, key_weight)
    return {
        "no RoPE removal": calibration("no RoPE removal", "rotated"),
        "per-layer PCA": calibration("per-layer PCA", "derotated", groups=layers),
    }
