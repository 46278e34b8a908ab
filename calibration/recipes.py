"""Calibration recipes of the checkout: the offline registry's models by name, the bundled Wikipedia text, and the
cached default calibration the main job, tests and benchmarks share. The driver itself is
:func:`lmcache_kvtc.calibrate.driver.calibrate` (installed with the package); ``kvtc calibrate`` is its command
for any model directory and text files.

    python -m calibration.recipes --model qwen2.5-coder-1.5b --tokens 32768 --out q15.safetensors
    python -m calibration.recipes --default qwen2.5-coder-0.5b     # build (or find) the cached default
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lmcache_kvtc.calibrate.driver import calibrate
from lmcache_kvtc.calibration import FORMAT_VERSION, Calibration
from lmcache_kvtc.cli import add_calibrate_options, calibrate_options

from . import models, texts

log = logging.getLogger(__name__)

WIKIPEDIA = "wikipedia (BIG-bench paragraph_segmentation)"
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def calibrate_named(model: str, documents: Sequence[str] | None = None, **options) -> Calibration:
    """:func:`~lmcache_kvtc.calibrate.driver.calibrate` for a registry name (or a model directory), on
    ``documents`` or else the bundled Wikipedia."""
    if documents is None:
        documents, options["source"] = texts.prepare("wikipedia_en"), WIKIPEDIA
    return calibrate((model, *models.load(model)), documents, **options)


def default_calibration_path(model: str) -> Path:
    """Named by calibration format version, so a cache built by an older release is rebuilt, not misread."""
    return models.cache_dir() / "calibrations" / f"{model}.v{FORMAT_VERSION}.safetensors"


def default_calibration(model: str = DEFAULT_MODEL) -> Path:
    """The embedded default: ``model`` calibrated on Wikipedia (BIG-bench), built on first use and cached."""
    path = default_calibration_path(model)
    if not path.exists():
        log.info("no calibration for %s yet: building %s (one-time, a few minutes on CPU)", model, path)
        calibrate_named(model, out=path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibration.recipes", description=__doc__.splitlines()[0])
    parser.add_argument("--default", metavar="MODEL", help="build (or find) MODEL's cached default calibration "
                        "(on the bundled Wikipedia)")
    add_calibrate_options(parser, required=False, model_help=f"a name of the offline registry {list(models.MODELS)} "
                          "or a model directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.default:
        print(default_calibration(args.default))
        return 0
    if not (args.model and args.out):
        parser.error("give --model NAME --out FILE, or --default MODEL")
    documents, source = None, None  # the bundled Wikipedia
    if args.text:
        documents = [Path(p).read_text(encoding="utf-8", errors="replace") for p in args.text]
        source = ", ".join(args.text)
    cal = calibrate_named(args.model, documents, **calibrate_options(args), **({"source": source} if source else {}))
    print(f"wrote {args.out} (fingerprint {cal.fingerprint.hex()}); report {Path(args.out).with_suffix('.report')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
