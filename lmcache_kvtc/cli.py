"""The ``kvtc`` command: calibrate a model directory on text files, explain a blob.

Everything here works from an installed wheel. The checkout's tools run as modules: the main job
``python -m calibration.roundtrip``, calibrations of the offline registry's models by name
``python -m calibration.recipes``, and the benchmarks (``python -m benchmarks.quality``, ...).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .calibrate.fitting import DEFAULT_RATIOS
from .defaults import CALIBRATION_CONTEXT, CALIBRATION_TOKENS


def add_calibrate_options(parser: argparse.ArgumentParser, required: bool = True,
                          model_help: str = "a Hugging Face model directory") -> None:
    """The options of ``kvtc calibrate`` (shared with the checkout's ``python -m calibration.recipes``)."""
    parser.add_argument("--model", required=required, help=model_help)
    parser.add_argument("--text", nargs="+" if required else "*", required=required, help="UTF-8 text files")
    parser.add_argument("--tokens", type=int, default=CALIBRATION_TOKENS, help="calibration tokens in total")
    parser.add_argument("--context", type=int, default=CALIBRATION_CONTEXT, help="tokens per prefilled context")
    parser.add_argument("--ratios", type=float, nargs="+", default=list(DEFAULT_RATIOS))
    parser.add_argument("--key-weight", type=key_weight, default="auto",
                        help="K/V bit split: auto (tuned by KL on held-out text), equal, or a weight on key error")
    parser.add_argument("--normalize", choices=("auto", "none", "layer"), default="auto",
                        help="scale each layer to unit energy before the PCA: auto (tuned like --key-weight), "
                             "none, layer")
    parser.add_argument("--tp", type=int, nargs="+", default=[], metavar="SIZE",
                        help="vLLM --tensor-parallel-size(s) to serve: --out is then a directory of one calibration "
                             "per size and rank plus index.json (give the directory as the serde's calibration)")
    parser.add_argument("--device", default="cpu",
                        help="where the model prefills and the fit runs: cpu (default) or cuda[:N]")
    parser.add_argument("--max-rank", type=int, default=None, metavar="R",
                        help="principal components to keep per stream; default: all up to 12,288 features per "
                             "stream (exact fit), else 4,096 from a sketch that needs O(features x R) memory")
    parser.add_argument("--out", required=required,
                        help="calibration file to write (.safetensors); a directory with --tp")


def calibrate_options(args: argparse.Namespace) -> dict:
    """The driver's keyword arguments from :func:`add_calibrate_options`' options."""
    return dict(tokens=args.tokens, context=args.context, ratios=args.ratios, out=args.out,
                key_weight=args.key_weight, normalize=args.normalize, tp_sizes=args.tp, device=args.device,
                max_rank=args.max_rank)


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


def _calibrate(args: argparse.Namespace) -> int:
    if not Path(args.model).is_dir():
        raise SystemExit(f"kvtc calibrate: {args.model} is not a model directory (config.json, weights, tokenizer); "
                         "the checkout's offline models go by name through `python -m calibration.recipes --model`")
    from .calibrate.driver import calibrate

    documents = [Path(p).read_text(encoding="utf-8", errors="replace") for p in args.text]
    cal = calibrate(args.model, documents, source=", ".join(args.text), **calibrate_options(args))
    print(wrote(args.out, cal, args.tp))
    return 0


def wrote(out: str, calibration, tp_sizes: list[int]) -> str:
    """What a calibration command tells its user it wrote."""
    if tp_sizes:
        return f"wrote {out}/index.json and one calibration per rank of tensor-parallel sizes {tp_sizes}"
    return f"wrote {out} (fingerprint {calibration.fingerprint.hex()}); report {Path(out).with_suffix('.report')}"


def _inspect(args: argparse.Namespace) -> int:
    from . import Calibration, CodecError, KVTCCodec
    from .inspect import describe

    data = Path(args.blob).read_bytes()
    try:
        info = describe(data)
        if args.calibration:
            KVTCCodec(Calibration.load(args.calibration)).decode(data)
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

    p = sub.add_parser("calibrate", help="model directory + text files -> calibration file (+ report with plots)")
    add_calibrate_options(p)
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("inspect", help="explain a blob (and check it decodes with a calibration)")
    p.add_argument("blob")
    p.add_argument("--calibration")
    p.set_defaults(func=_inspect)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
