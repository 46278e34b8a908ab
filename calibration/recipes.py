"""Calibrate the offline registry's models by name, on the default mix (English prose + Python source) unless told.

The cached default calibration the main job, tests and benchmarks share is built here too. The driver itself is
:func:`lmcache_kvtc.calibrate.driver.calibrate` (installed with the package); ``kvtc calibrate`` is its command
for any model directory and text files.

    python -m calibration.recipes --default qwen2.5-coder-0.5b     # build (or find) the cached default
    python -m calibration.recipes --model qwen2.5-coder-1.5b --prose --tokens 32768 --out q15-prose.safetensors
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
from collections.abc import Sequence
from pathlib import Path

from lmcache_kvtc.calibrate.capture import fastest_dtype, kv_dims
from lmcache_kvtc.calibrate.driver import calibrate
from lmcache_kvtc.calibration import FORMAT_VERSION, Calibration
from lmcache_kvtc.cli import add_calibrate_options, calibrate_options, wrote
from lmcache_kvtc.defaults import CALIBRATION_CONTEXT, CALIBRATION_TOKENS

from . import models, texts

log = logging.getLogger(__name__)

PROSE = "State of the Union addresses"
DEFAULT_MIX = f"{PROSE} + Python stdlib source"
DEFAULT_MODEL = "qwen2.5-coder-0.5b"
#: names the recipe of the cached default calibration: a new recipe gets a new file, never an old one misread
DEFAULT_RECIPE = "sotu-code"


#: the default calibration captures at least this many tokens per feature dimension (layers · KV heads · head dim):
#: the 1.5B's 7,168 features fit on 25K tokens left its spectrum's tail, and the plans drawn from it, wrong
TOKENS_PER_FEATURE = 10

#: prose is cut into pieces of about this many characters (~2K tokens), so a fit of a few ten thousand tokens
#: samples many addresses, not a few whole ones
PIECE_CHARS = 8000


def prose_documents(addresses: Sequence[str] | None = None) -> list[str]:
    """The State of the Union ``addresses`` (default: all, fetched on first use) cut at sentence ends into pieces of
    about :data:`PIECE_CHARS` characters."""
    pieces = []
    for address in texts.prepare("sotu") if addresses is None else addresses:
        while len(address) > PIECE_CHARS:
            cut = address.find(". ", PIECE_CHARS) + 1 or len(address)
            pieces.append(address[:cut].strip())
            address = address[cut:]
        pieces.append(address.strip())
    return [p for p in pieces if p]


def default_documents() -> list[str]:
    """What the default calibration is fit on: 400 pieces of prose and 300 stdlib source files (seeded order).

    Prose alone fits prose: on Python docs and on code its basis misses what those caches hold, and at 16× KL was
    3–5× higher than with this mix (README, "Calibration text").
    """
    prose, code = prose_documents(), texts.python_source()
    random.Random(0).shuffle(prose)
    random.Random(0).shuffle(code)
    return prose[:400] + code[:300]


def calibrate_named(model: str, documents: Sequence[str] | None = None, **options) -> Calibration:
    """:func:`~lmcache_kvtc.calibrate.driver.calibrate` for a registry name (or a model directory), on
    ``documents`` or else the default mix of prose and Python source (then ``source`` defaults to its name)."""
    if documents is None:
        documents = default_documents()
        options.setdefault("source", DEFAULT_MIX)
    dtype = fastest_dtype(options.get("device", "cpu"))
    return calibrate((model, *models.load(model, dtype=dtype)), documents, **options)


def default_tokens(model: str) -> int:
    """Calibration tokens for ``model``'s default: :data:`TOKENS_PER_FEATURE` per feature in whole contexts, at
    least ``CALIBRATION_TOKENS`` (0.5B: 49,152 for 3,072 features; 1.5B: 71,680 for 7,168)."""
    from transformers import AutoConfig

    directory = Path(model) if Path(model).is_dir() else models.model_dir(model)
    layers, kv_heads, head_dim = kv_dims(AutoConfig.from_pretrained(directory))
    contexts = math.ceil(TOKENS_PER_FEATURE * layers * kv_heads * head_dim / CALIBRATION_CONTEXT)
    return max(CALIBRATION_TOKENS, contexts * CALIBRATION_CONTEXT)


def default_calibration_path(model: str) -> Path:
    """Named by calibration format version and recipe, so a cache built by an older release is rebuilt, not misread."""
    name = Path(model).name if Path(model).is_dir() else model
    return models.cache_dir() / "calibrations" / f"{name}.v{FORMAT_VERSION}.{DEFAULT_RECIPE}.safetensors"


def default_calibration(model: str = DEFAULT_MODEL) -> Path:
    """The embedded default: ``model`` calibrated on the default mix, built on first use and cached."""
    path = default_calibration_path(model)
    if not path.exists():
        log.info("no calibration for %s yet: building %s (one-time, on a 2-core CPU: 4-25 minutes for the 0.5B, "
                 "~40 for the 1.5B)", model, path)
        calibrate_named(model, out=path, tokens=default_tokens(model))
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibration.recipes", description=__doc__.splitlines()[0])
    parser.add_argument("--default", metavar="MODEL", help="build (or find) MODEL's cached default calibration "
                        "(on the default mix; no other option applies)")
    parser.add_argument("--prose", action="store_true",
                        help="calibrate on the bundled prose alone (without the Python source of the default mix)")
    add_calibrate_options(parser, required=False, model_help=f"a name of the offline registry {list(models.MODELS)} "
                          "or a model directory")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.default:
        if args.model or args.out or args.text or args.prose or args.tp:
            parser.error("--default takes no --model, --out, --text, --prose or --tp")
        print(default_calibration(args.default))
        return 0
    if not (args.model and args.out):
        parser.error("give --model NAME --out FILE, or --default MODEL")
    options = calibrate_options(args)
    documents = None  # the default mix
    if args.prose:
        documents, options["source"] = prose_documents(), PROSE
    if args.text:
        documents = [Path(p).read_text(encoding="utf-8", errors="replace") for p in args.text]
        options["source"] = ", ".join(args.text)
    cal = calibrate_named(args.model, documents, **options)
    print(wrote(args.out, cal, args.tp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
