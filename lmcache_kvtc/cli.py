"""The ``kvtc`` command: calibrate, roundtrip, inspect, bench."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .fitting import DEFAULT_RATIOS


def _calibrate(args: argparse.Namespace) -> int:
    from calibration import texts
    from calibration.calibrate import calibrate

    if args.text:
        documents = [Path(p).read_text(encoding="utf-8", errors="replace") for p in args.text]
        source = ", ".join(args.text)
    else:
        documents, source = texts.prepare("wikipedia_en"), "wikipedia (BIG-bench paragraph_segmentation)"
    cal = calibrate(args.model, documents, tokens=args.tokens, context=args.context, ratios=args.ratios,
                    out=args.out, source=source, key_weight=args.key_weight, normalize=args.normalize)
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
    from calibration.roundtrip import format_report, run

    result = run(model=args.model, calibration=args.calibration, ratio=args.ratio, context=args.context,
                 blob_path=args.blob, lmcache=not args.no_lmcache)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
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
    if argv[:1] == ["bench"]:  # the benchmarks keep their own arguments
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if "--lmcache" in argv:
            from benchmarks.lmcache_report import main as lmcache_bench

            lmcache_bench([a for a in argv[1:] if a != "--lmcache"])
            return 0
        from benchmarks.quality import main as bench

        return bench(argv[1:])
    parser = argparse.ArgumentParser(prog="kvtc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="model + text -> calibration file (+ report with plots)")
    p.add_argument("--model", required=True, help="offline model name (calibration.models) or HF model directory")
    p.add_argument("--text", nargs="*", help="UTF-8 text files (default: Wikipedia from BIG-bench)")
    p.add_argument("--tokens", type=int, default=48 * 1024, help="calibration tokens in total")
    p.add_argument("--context", type=int, default=2048, help="tokens per prefilled context")
    p.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    p.add_argument("--key-weight", type=key_weight, default="auto",
                   help="K/V bit split: auto (tuned by KL on held-out text), equal, or a weight on key error")
    p.add_argument("--normalize", choices=("auto", "none", "layer"), default="auto",
                   help="scale each layer to unit energy before the PCA: auto (tuned like --key-weight), none, layer")
    p.add_argument("--out", required=True, help="calibration file to write (.safetensors)")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("roundtrip", help="real KV cache -> blob file -> KV cache, with a quality report")
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

    sub.add_parser("bench", help="quality benchmark: KVTC vs baselines and ablations (kvtc bench --help); "
                                 "--lmcache: through LMCache's tiers, what users get (kvtc bench --lmcache --help)")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
