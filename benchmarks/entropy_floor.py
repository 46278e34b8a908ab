"""How far the lossless stage sits above the information in the symbols, per plan, on real held-out chunks.

Each held-out context's KV cache is cut into LMCache's 256-token chunks; every plan of the calibration
quantizes each chunk's PCA coefficients exactly as the codec does, and the symbol stream is measured as:

- ``deflate``: today's blob section (component-major bytes, raw DEFLATE level 6, 64 KiB chunks): the codec's bytes;
- ``packed``: the same symbols with each narrow component's chunk packed by its range (all zero: nothing;
  within [-2, 1]: 2-bit codes, 4 tokens a byte; within [-8, 7]: 4-bit, 2 a byte; else a byte), a 2-bit class
  per component in front, then raw DEFLATE — a layout nvCOMP still decodes;
- ``lzma``: the codec's bytes through LZMA (a stronger general-purpose coder, for scale);
- ``entropy``: Σ over components of the order-0 entropy of that component's symbols over all measured chunks
  (what a static per-component model — rANS/arithmetic coding — could reach);
- ``chunk entropy``: the same per chunk (an adaptive model's bound, not counting the cost of sending it);
- ``water-filling``: reverse water-filling's bits at the plan's measured error (the Gaussian limit).

All in bits per token per stream pair (keys + values), side by side in one run, with the CPU named.

    python -m benchmarks.entropy_floor --model qwen2.5-coder-0.5b --contexts 4 \
        --out benchmarks/results/entropy-floor-qwen2.5-coder-0.5b
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import statistics
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from calibration import models, texts
from calibration.recipes import default_calibration
from lmcache_kvtc import Calibration
from lmcache_kvtc.calibrate.capture import prefill
from lmcache_kvtc.calibrate.report import water_filling_bits
from lmcache_kvtc.calibration import STREAMS
from lmcache_kvtc.codec import token_features
from lmcache_kvtc.defaults import CHUNK_TOKENS
from lmcache_kvtc.entropy import DeflateCPU
from lmcache_kvtc.quantizer import NARROW_LIMIT, WIDE_LIMIT, quantize

from .machine import cpu_name

#: a narrow component's chunk goes in the first class whose range holds all its symbols
PACK_CLASSES = ((0, 0, 0), (2, -2, 1), (4, -8, 7), (8, -128, 127))  # (bits, min, max)


def symbols(coefficients: torch.Tensor, step: float, rank: int, wide: int) -> np.ndarray:
    """``[rank, n]`` int16 symbols of one chunk, as :func:`~lmcache_kvtc.quantizer.quantize` rounds and clamps."""
    s = torch.round(coefficients[:, :rank].T / step)
    s[:wide].clamp_(-WIDE_LIMIT, WIDE_LIMIT)
    s[wide:].clamp_(-NARROW_LIMIT, NARROW_LIMIT)
    return s.to(torch.int16).numpy()


def packed_stream(sym: np.ndarray, wide: int) -> bytes:
    """The ``packed`` layout of the module docstring (wide components as today: low then high bytes)."""
    narrow = sym[wide:]
    lo, hi = narrow.min(axis=1), narrow.max(axis=1)
    classes = np.full(len(narrow), len(PACK_CLASSES) - 1, dtype=np.uint8)
    for c, (_, low, high) in reversed(list(enumerate(PACK_CLASSES))):
        classes[(lo >= low) & (hi <= high)] = c
    table = np.packbits(np.unpackbits(classes[:, None], axis=1)[:, -2:].reshape(-1)).tobytes()
    parts = [table]
    for c, (bits, _, _) in enumerate(PACK_CLASSES):
        rows = narrow[classes == c]
        if bits == 0 or not len(rows):
            continue
        codes = (rows.astype(np.int16) & ((1 << bits) - 1)).astype(np.uint8)
        per_byte = 8 // bits
        pad = (-codes.shape[1]) % per_byte
        codes = np.pad(codes, ((0, 0), (0, pad))).reshape(len(rows), -1, per_byte)
        shifts = np.arange(per_byte, dtype=np.uint8) * bits
        parts.append(np.bitwise_or.reduce(codes << shifts, axis=2).astype(np.uint8).tobytes())
    wide_rows = sym[:wide]
    parts += [(wide_rows & 0xFF).astype(np.uint8).tobytes(), ((wide_rows >> 8) & 0xFF).astype(np.uint8).tobytes()]
    return b"".join(parts)


def order0_bits(histograms: list[Counter]) -> float:
    """Σ over components of count·H: total bits of an ideal static per-component code."""
    total = 0.0
    for h in histograms:
        n = sum(h.values())
        total -= sum(c * math.log2(c / n) for c in h.values())
    return total


def measure(calibration: Calibration, chunks: list[tuple[int, torch.Tensor]]) -> list[dict]:
    """Per plan: bits per token of each coder over ``chunks``: ``(start position, [2, L, 256, H·D] KV)`` pairs."""
    coder = DeflateCPU()
    coefficients = []  # per chunk: stream -> [n, full rank]
    for start, kv in chunks:
        features = token_features(kv, torch.arange(start, start + kv.shape[2]), calibration.rope)
        coefficients.append({s: calibration.streams[s].project(features[i]) for i, s in enumerate(STREAMS)})
    tokens = sum(kv.shape[2] for _, kv in chunks)
    rows = []
    for plan in calibration.plans:
        bits = Counter()
        error = {}
        for stream in STREAMS:
            q = plan.streams[stream]
            histograms = [Counter() for _ in range(q.rank)]  # over all chunks
            squared, energy = 0.0, 0.0
            for c in coefficients:
                coeff = c[stream]
                stream_bytes = quantize(coeff[:, : q.rank], q.step, q.wide).numpy().tobytes()
                bits["deflate"] += 8 * len(coder.compress([stream_bytes])[0])
                bits["lzma"] += 8 * len(lzma.compress(stream_bytes, format=lzma.FORMAT_RAW,
                                                      filters=[{"id": lzma.FILTER_LZMA2, "preset": 9}]))
                sym = symbols(coeff, q.step, q.rank, q.wide)
                bits["packed"] += 8 * len(coder.compress([packed_stream(sym, q.wide)])[0])
                chunk_histograms = []
                for k in range(q.rank):
                    values, counts = np.unique(sym[k], return_counts=True)
                    chunk_histograms.append(Counter(dict(zip(values.tolist(), counts.tolist(), strict=True))))
                    histograms[k].update(chunk_histograms[-1])
                bits["chunk entropy"] += order0_bits(chunk_histograms)
                restored = torch.from_numpy(sym.astype(np.float32)).T * q.step
                squared += float((coeff[:, : q.rank] - restored).double().square().sum()
                                 + coeff[:, q.rank :].double().square().sum())
                energy += float(coeff.double().square().sum())
            bits["entropy"] += order0_bits(histograms)
            error[stream] = squared / energy
            eigen = calibration.streams[stream].eigenvalues
            bits["water-filling"] += tokens * water_filling_bits(eigen, float(eigen.sum()), error[stream])
        rows.append({"plan": plan.ratio, "error": error,
                     **{k: v / tokens for k, v in bits.items()},
                     "deflate_over_entropy": bits["deflate"] / bits["entropy"],
                     "deflate_over_chunk_entropy": bits["deflate"] / bits["chunk entropy"],
                     "packed_over_entropy": bits["packed"] / bits["entropy"],
                     "packed_saves": 1 - bits["packed"] / bits["deflate"]})
        print(f"{plan.ratio:6.2f}x  deflate {rows[-1]['deflate']:8.1f}  packed {rows[-1]['packed']:8.1f}  "
              f"lzma {rows[-1]['lzma']:8.1f}  entropy {rows[-1]['entropy']:8.1f}  "
              f"chunk entropy {rows[-1]['chunk entropy']:8.1f}  "
              f"water-filling {rows[-1]['water-filling']:8.1f} bits/token", flush=True)
    return rows


def table(rows: list[dict], header: str) -> str:
    lines = [header, "", "| plan | DEFLATE (today) | packed + DEFLATE | LZMA | order-0 entropy | per-chunk entropy | "
             "water-filling | DEFLATE / entropy | DEFLATE / per-chunk | packed / entropy | packed saves |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['plan']:g}× | {r['deflate']:.0f} | {r['packed']:.0f} | {r['lzma']:.0f} | "
                     f"{r['entropy']:.0f} | {r['chunk entropy']:.0f} | {r['water-filling']:.0f} | "
                     f"{r['deflate_over_entropy']:.3f} | {r['deflate_over_chunk_entropy']:.3f} | "
                     f"{r['packed_over_entropy']:.3f} | {r['packed_saves']:.1%} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.entropy_floor", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--calibration", type=Path, help="default: the model's cached default calibration")
    parser.add_argument("--contexts", type=int, default=4, help="held-out Python-docs contexts")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--plans", type=float, nargs="*", help="only these rungs (default: every plan)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    calibration = Calibration.load(args.calibration or default_calibration(args.model))
    if args.plans:
        calibration.plans = [calibration.plans[calibration.plan_index(r)] for r in args.plans]
    lm, tokenizer = models.load(args.model)
    chunks = []
    for ids in texts.token_contexts(tokenizer, texts.python_docs(), args.contexts, args.context, seed=11):
        kv, _ = prefill(lm, ids, logits_to_keep=1)
        chunks += [(i, kv[:, :, i : i + CHUNK_TOKENS].contiguous()) for i in range(0, args.context, CHUNK_TOKENS)]
    rows = measure(calibration, chunks)
    header = (f"Lossless stage vs information, {args.model} ({calibration.info.get('source')} calibration), "
              f"{len(chunks)} chunks of {CHUNK_TOKENS} tokens of held-out Python docs; bits per token, keys + values; "
              f"CPU: {cpu_name()}. Median packed saving "
              f"{statistics.median(r['packed_saves'] for r in rows):.1%}.")
    print(table(rows, header))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        Path(f"{args.out}.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=1))
        Path(f"{args.out}.md").write_text(table(rows, header) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
