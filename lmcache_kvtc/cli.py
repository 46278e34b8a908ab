"""The ``kvtc`` command: calibrate, roundtrip, inspect.

``calibrate --model DIR --text FILE...`` and ``inspect`` need only the installed package; the offline registry's
model names, the bundled texts and ``roundtrip`` (the main job) live in a checkout's ``calibration/`` folder,
and say so when it is not there. The benchmarks are checkout tools too: ``python -m benchmarks.quality``,
``python -m benchmarks.lmcache_report``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from pathlib import Path
from types import ModuleType

from .fitting import DEFAULT_RATIOS


def checkout(command: str, module: str) -> ModuleType:
    """``calibration.<module>`` of the checkout (offline models, texts, the main job), or a clear exit without it."""
    root = Path(__file__).resolve().parents[1]
    if (root / "calibration" / "roundtrip.py").is_file() and str(root) not in sys.path:
        sys.path.insert(0, str(root))  # an editable install from a checkout
    try:
        return importlib.import_module(f"calibration.{module}")
    except ImportError as exc:
        raise SystemExit(f"kvtc {command}: needs a checkout of lmcache-kvtc (its calibration/ folder holds the offline "
                         f"models, texts and the main job; {exc}). From an installed package: "
                         "kvtc calibrate --model HF_MODEL_DIR --text FILE... --out FILE") from None


def _calibrate(args: argparse.Namespace) -> int:
    options = dict(tokens=args.tokens, context=args.context, ratios=args.ratios, out=args.out,
                   key_weight=args.key_weight, normalize=args.normalize)
    if args.text:
        documents = [Path(p).read_text(encoding="utf-8", errors="replace") for p in args.text]
        source = ", ".join(args.text)
    else:
        recipes = checkout("calibrate", "calibrate")
        documents, source = recipes.texts.prepare("wikipedia_en"), recipes.WIKIPEDIA
    if Path(args.model).is_dir():
        from .calibrate.driver import calibrate
    else:  # a name of the checkout's offline registry
        calibrate = checkout("calibrate", "calibrate").calibrate
    cal = calibrate(args.model, documents, source=source, **options)
    print(f"wrote {args.out} (fingerprint {cal.fingerprint.hex()}); report {Path(args.out).with_suffix('.report')}")
    return 0


def key_weight(text: str) -> str | float | None:
    """``--key-weight``: ``auto``, ``equal`` (``None``: half the bits each) or a positive number."""
    if text in ("auto", "equal"):
        return None if text == "equal" else text
    try:
        weight = float(text)
    except ValueError:
        weight = 0.0
    if not weight > 0:
        raise argparse.ArgumentTypeError(f"expected auto, equal or a positive number, got {text!r}")
    return weight


def _roundtrip(args: argparse.Namespace) -> int:
    roundtrip = checkout("roundtrip", "roundtrip")
    result = roundtrip.run(model=args.model, calibration=args.calibration, ratio=args.ratio, context=args.context,
                 blob_path=args.blob, lmcache=not args.no_lmcache)
    print(json.dumps(result, indent=2) if args.json else roundtrip.format_report(result))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from . import Calibration, CodecError, KVTCCodec
    from .inspect import describe

    data = Path(args.blob).read_bytes()
    try:
        info = describe(data)
        if args.calibration:
            calibration = Calibration.load(args.calibration)
            KVTCCodec(calibration, ratio=calibration.ratios[0]).decode(data)
            info["decodes_with"] = args.calibration
    except CodecError as exc:
        print(f"{args.blob}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="kvtc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="model + text -> calibration file (+ report with plots)")
    p.add_argument("--model", required=True,
                   help="a Hugging Face model directory, or (in a checkout) a name of calibration.models")
    p.add_argument("--text", nargs="*", help="UTF-8 text files (default, in a checkout: Wikipedia from BIG-bench)")
    p.add_argument("--tokens", type=int, default=48 * 1024, help="calibration tokens in total")
    p.add_argument("--context", type=int, default=2048, help="tokens per prefilled context")
    p.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    p.add_argument("--key-weight", type=key_weight, default="auto",
                   help="K/V bit split: auto (tuned by KL on held-out text), equal, or a weight on key error")
    p.add_argument("--normalize", choices=("auto", "none", "layer"), default="auto",
                   help="scale each layer to unit energy before the PCA: auto (tuned like --key-weight), none, layer")
    p.add_argument("--out", required=True, help="calibration file to write (.safetensors)")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("roundtrip", help="the main job (needs the checkout): real KV cache -> blob -> KV cache, "
                                        "and through LMCache's fs tier, with a quality report")
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--calibration", help="calibration file (default: built on first use and cached)")
    p.add_argument("--ratio", type=float, default=16)
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--blob", default="out/roundtrip.kvtc")
    p.add_argument("--no-lmcache", action="store_true", help="skip the pass through LMCache's fs tier")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_roundtrip)

    p = sub.add_parser("inspect", help="explain a blob (and check it decodes with a calibration)")
    p.add_argument("blob")
    p.add_argument("--calibration")
    p.set_defaults(func=_inspect)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
