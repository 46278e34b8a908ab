"""The main job: a real model's KV cache through KVTC to a blob file and back, with a report.

Prefill a context of held-out text (Python docs: the calibration never saw them), encode its
cache to a blob file, read the file back, decode, continue from the restored cache and
compare with the uncompressed one; then the same cache in chunks through LMCache's StorageManager.

    python -m calibration.roundtrip [--ratio R] [--calibration FILE] [--no-lmcache] [--json]

LMCache's log lines (the serde's among them: it logs through LMCache's logger) are shown from level ERROR (the
driver's own deliberate L1 clear warns); ``LMCACHE_LOG_LEVEL=INFO`` shows them all.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch

from lmcache_kvtc import Calibration, KVTCCodec
from lmcache_kvtc.calibrate.capture import prefill
from lmcache_kvtc.calibrate.metrics import compare_logits, continuation_logits, greedy, relative_error
from lmcache_kvtc.defaults import RATIO
from lmcache_kvtc.inspect import describe

from . import models, texts
from .recipes import DEFAULT_MODEL, default_calibration

# LMCache imports Google Cloud clients that warn on import that Python 3.11 nears its end of life: not this job's news
warnings.filterwarnings("ignore", message=r"You are using a Python version .* which Google will stop supporting")


def run(
    model: str = DEFAULT_MODEL,
    calibration: str | Path | None = None,
    ratio: float = RATIO,
    context: int = 2048,
    continuation: int = 256,
    generate: int = 40,
    blob_path: str | Path = "out/roundtrip.kvtc",
    lmcache: bool = True,
) -> dict:
    cal_path = Path(calibration) if calibration else default_calibration(model)
    cal = Calibration.load(cal_path)
    if not any(abs(r - ratio) < 1e-6 for r in cal.ratios):
        raise ValueError(f"ratio {ratio:g} is not a rung of {cal_path}; its plans: {[f'{r:g}' for r in cal.ratios]}")
    lm, tokenizer = models.load(model)
    ids = texts.token_contexts(tokenizer, texts.python_docs(), 1, context + continuation, seed=1)[0]
    prefix, cont = ids[:context], ids[context:]
    kv, _ = prefill(lm, prefix, logits_to_keep=1)

    codec = KVTCCodec(cal)
    plan = cal.plan_index(ratio)
    started = time.perf_counter()
    blob = codec.encode(kv, plan=plan, start=0)
    encode_s = time.perf_counter() - started
    blob_path = Path(blob_path)
    blob_path.parent.mkdir(parents=True, exist_ok=True)
    blob_path.write_bytes(blob)
    stored = blob_path.read_bytes()
    started = time.perf_counter()
    restored = codec.decode(stored)
    decode_s = time.perf_counter() - started

    info = describe(stored)
    head, tail = info["exact_tokens"]["head"], info["exact_tokens"]["tail"]
    middle = slice(head, kv.shape[2] - tail)
    reference_logits = continuation_logits(lm, kv, cont)
    restored_logits = continuation_logits(lm, restored, cont)
    quality = compare_logits(reference_logits, restored_logits, cont)
    tiers = _through_lmcache(lm, kv, cont, reference_logits, cal_path, ratio) if lmcache else None
    return {
        "model": model,
        "calibration": str(cal_path),
        "calibration_source": cal.info.get("source"),
        "text": "Python 3 docs (stdlib pydoc_data topics), held out from calibration",
        "tokens": {"context": context, "continuation": continuation},
        "plan_ratio": cal.plans[plan].ratio,
        "blob_file": str(blob_path),
        "blob": info,
        "seconds": {"encode": encode_s, "decode": decode_s},
        "exact_tokens_identical": bool(
            torch.equal(restored[:, :, :head], kv[:, :, :head])
            and torch.equal(restored[:, :, middle.stop :], kv[:, :, middle.stop :])
        ),
        "relative_error": {
            "keys": relative_error(kv[0, :, middle], restored[0, :, middle]),
            "values": relative_error(kv[1, :, middle], restored[1, :, middle]),
        },
        "quality": quality,
        "lmcache": tiers,
        "samples": {
            "uncompressed": tokenizer.decode(greedy(lm, kv, cont[:1], generate)),
            "kvtc": tokenizer.decode(greedy(lm, restored, cont[:1], generate)),
        },
    }


def _through_lmcache(lm, kv, cont, reference_logits, cal_path: Path, ratio: float) -> dict:
    """The same cache in 256-token chunks through LMCache 0.5.6's MP StorageManager, kvtc serde and fs tier."""
    from .tiers import store_and_load

    with tempfile.TemporaryDirectory(prefix="kvtc-fs-tier-") as tier:
        restored, stats = store_and_load(kv, str(cal_path), {"type": "fs", "base_path": tier}, ratio=ratio)
    if restored is None:
        return {**stats, "quality": None}
    quality = compare_logits(reference_logits, continuation_logits(lm, restored, cont), cont)
    return {**stats, "quality": quality}


def format_report(r: dict) -> str:
    b, ratio = r["blob"]["bytes"], r["blob"]["ratio"]
    raw_mb = b["raw"] / 1e6
    exact = r["blob"]["exact_tokens"]
    lines = [
        f"KVTC round trip — {r['model']}, {r['tokens']['context']}-token context, plan {r['plan_ratio']:g}x",
        f"  calibration : {r['calibration']} ({r['calibration_source']})",
        f"  text        : {r['text']}",
        f"  blob file   : {r['blob_file']}  ({b['blob']:,} bytes; {r['blob']['chunks']} DEFLATE chunks)",
        f"  bf16 KV     : {b['raw']:,} bytes  [2, L, T, H*D] = {r['blob']['layout']}",
        f"  exact tokens: {exact['head']} sinks + {exact['tail']} recent window "
        f"(identical after decode: {r['exact_tokens_identical']})",
        f"  ratio vs bf16, all bytes     : {ratio['overall']:.2f}x  (pre-entropy {ratio['overall_pre_entropy']:.2f}x)",
        f"  ratio of compressed region   : {ratio['region']:.2f}x  (pre-entropy {ratio['region_pre_entropy']:.2f}x)",
        f"  encode {r['seconds']['encode'] * 1e3:.0f} ms ({raw_mb / r['seconds']['encode']:.0f} MB/s), "
        f"decode {r['seconds']['decode'] * 1e3:.0f} ms ({raw_mb / r['seconds']['decode']:.0f} MB/s) on CPU",
        f"  relative error on compressed tokens: keys {r['relative_error']['keys']:.4f}, "
        f"values {r['relative_error']['values']:.4f}",
        f"  next {r['tokens']['continuation']} tokens (teacher-forced): NLL {r['quality']['nll']:.4f}, "
        f"ΔNLL {r['quality']['delta_nll']:+.4f}, KL {r['quality']['kl']:.4f} nats/token, "
        f"top-1 agreement {r['quality']['top1']:.3f}",
        *_lmcache_lines(r.get("lmcache")),
        f"  greedy from uncompressed cache: {r['samples']['uncompressed']!r}",
        f"  greedy from KVTC cache        : {r['samples']['kvtc']!r}",
    ]
    return "\n".join(lines)


def _lmcache_lines(t: dict | None) -> list[str]:
    if t is None:
        return []
    raw = t["raw_bytes_per_chunk"]
    stored = max(t["stored_bytes"])
    blob = sum(t["blob_bytes"]) / len(t["blob_bytes"])
    plans = sorted(t["plan_ratios"])
    lines = [
        "  through LMCache 0.5.6 (MP StorageManager -> kvtc serde -> fs tier, positions unknown to the serde):",
        f"    {t['chunks']} chunks of 256 tokens, {t['loaded_chunks']} back from L2; chunk positions estimated right: "
        f"{t['positions_right']}/{t['chunks']}",
        f"    per chunk: raw {raw:,} B, stored {stored:,} B, LMCache 0.5.6's fixed size = the budget "
        f"({raw / stored:.1f}x); blobs fill {blob / stored:.1%} of it on average",
        f"    rate control chose plans {plans[0]:g}x to {plans[-1]:g}x (median {plans[len(plans) // 2]:g}x)",
    ]
    if t["quality"]:
        q = t["quality"]
        lines.append(f"    continuation: ΔNLL {q['delta_nll']:+.4f}, KL {q['kl']:.4f} nats/token, "
                     f"top-1 {q['top1']:.3f} (no recent window kept exact: the serde never sees a sequence's end)")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m calibration.roundtrip", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"one of {list(models.MODELS)} or a model directory")
    parser.add_argument("--calibration", help="calibration file (default: built on first use and cached)")
    parser.add_argument("--ratio", type=float, default=RATIO,
                        help="the plan of the blob file, and the LMCache serde's byte budget (1/ratio of bf16)")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--blob", default="out/roundtrip.kvtc")
    parser.add_argument("--no-lmcache", action="store_true", help="skip the pass through LMCache's fs tier")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.calibration and not Path(args.calibration).is_file():
        parser.error(f"--calibration {args.calibration}: no such file")
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")  # read when LMCache makes its loggers, on first import
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = run(model=args.model, calibration=args.calibration, ratio=args.ratio, context=args.context,
                     blob_path=args.blob, lmcache=not args.no_lmcache)
    except ValueError as exc:
        parser.error(str(exc))
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
