"""KVTC through LMCache 0.5.6 on a real model: bytes per chunk, position hit rate, ΔNLL/KL vs standalone.

For each held-out context (prefix + continuation) the prefix cache goes through a real MP
StorageManager (L1 → serde → ``fs`` L2 → serde → L1) with the ``kvtc`` serde, which never sees
positions; the continuation is then scored on the restored cache against the exact cache. The same
prefix is also coded by the standalone codec at the *known* positions, chunked the same way
(sinks 4, window 0) — the gap between the two is what the position estimate costs — and whole
(sinks 4, window 128) as the standalone API would. LMCache's own ``fp8`` serde runs through the same
path as a baseline. Long contexts measure the hit rate among many candidate positions.

    python -m benchmarks.lmcache_report --calibration CAL.safetensors [--contexts 3 --prefix 2048 --long 8192]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from calibration import models, texts
from calibration.calibrate import default_calibration
from calibration.kv_capture import prefill
from calibration.metrics import compare_logits, continuation_logits, relative_error
from lmcache_kvtc import Calibration, KVTCCodec
from lmcache_kvtc.lmcache import tiers
from lmcache_kvtc.lmcache.position import PositionEstimator

MODEL = "qwen2.5-coder-0.5b"
CHUNK = 256


def standalone_chunked(codec: KVTCCodec, kv: torch.Tensor, ratio: float) -> torch.Tensor:
    """The codec at known positions, one 256-token chunk at a time, coded as the serde codes them (sinks 4, no
    window, each chunk within bf16 bytes / ``ratio``)."""
    budget = int(kv[:, :, :CHUNK].numel() * kv.element_size() // ratio)
    parts = [codec.decode(codec.encode(kv[:, :, s : s + CHUNK].contiguous(), start=s, sinks=4, window=0,
                                       budget=budget))
             for s in range(0, kv.shape[2], CHUNK)]
    return torch.cat(parts, dim=2)


def through_lmcache(kv, calibration_path, ratio, serde=None) -> tuple[torch.Tensor, dict]:
    with tempfile.TemporaryDirectory() as tmp:
        adapter = {"type": "fs", "base_path": tmp}
        if serde is not None:
            adapter["serde"] = serde
        restored, stats = tiers.store_and_load(kv, str(calibration_path), adapter, ratio=ratio)
    if restored is None:
        raise RuntimeError(f"LMCache round trip lost chunks: {stats}")
    return restored, stats


def score(model, kv, restored, continuation, reference) -> dict:
    metrics = compare_logits(reference, continuation_logits(model, restored, continuation), continuation)
    metrics["kv_rel_error"] = relative_error(kv, restored)
    return metrics


def quality_runs(model, tokenizer, calibration_path, ratios, n_contexts, prefix, continuation_tokens) -> list[dict]:
    calibration = Calibration.load(calibration_path)
    contexts = []
    for source, docs in (("python-docs", texts.python_docs()), ("kjv", texts.kjv())):
        for ids in texts.token_contexts(tokenizer, docs, n_contexts, prefix + continuation_tokens, seed=21):
            contexts.append((source, ids))
    rows = []
    for i, (source, ids) in enumerate(contexts):
        kv, _ = prefill(model, ids[:prefix], logits_to_keep=1)
        continuation = ids[prefix:]
        reference = continuation_logits(model, kv, continuation)
        restored, stats = through_lmcache(kv, calibration_path, 16, serde={"type": "fp8"})
        rows.append({"context": i, "source": source, "variant": "lmcache-fp8-serde", "ratio_target": 2,
                     "stored_bytes_per_chunk": statistics.mean(stats["stored_bytes"]),
                     "raw_bytes_per_chunk": stats["raw_bytes_per_chunk"],
                     **score(model, kv, restored, continuation, reference)})
        for ratio in ratios:
            restored, stats = through_lmcache(kv, calibration_path, ratio)
            codec = KVTCCodec(calibration, ratio=None)
            common = {"context": i, "source": source, "ratio_target": ratio,
                      "raw_bytes_per_chunk": stats["raw_bytes_per_chunk"]}
            rows.append({**common, "variant": "lmcache-kvtc (positions estimated)",
                         "stored_bytes_per_chunk": statistics.mean(stats["stored_bytes"]),
                         "blob_bytes_per_chunk": statistics.mean(stats["blob_bytes"]),
                         "plan_ratios": stats["plan_ratios"],
                         "positions_right": stats["positions_right"], "chunks": stats["chunks"],
                         "store_s": stats["store_seconds"], "load_s": stats["load_seconds"],
                         **score(model, kv, restored, continuation, reference)})
            print(json.dumps(rows[-1]), flush=True)
            rows.append({**common, "variant": "standalone, known positions, chunked",
                         **score(model, kv, standalone_chunked(codec, kv, ratio), continuation, reference)})
            if ratio in calibration.ratios:  # the standalone API codes a whole prefix with one plan
                plan = KVTCCodec(calibration, ratio=ratio)
                whole = plan.decode(blob := plan.encode(kv, start=0, sinks=4, window=128))
                rows.append({**common, "variant": "standalone, whole prefix (sinks 4, window 128)",
                             "blob_bytes_per_chunk": len(blob) / (prefix // CHUNK),
                             **score(model, kv, whole, continuation, reference)})
    return rows


def hit_rates(model, tokenizer, calibration_path, long_tokens, max_positions) -> list[dict]:
    calibration = Calibration.load(calibration_path)
    rows = []
    for source, docs in (("kjv", texts.kjv()), ("python-docs", texts.python_docs())):
        ids = texts.token_contexts(tokenizer, docs, 1, long_tokens, seed=33)[0]
        kv, _ = prefill(model, ids, logits_to_keep=1)
        for max_position in max_positions:
            estimator = PositionEstimator(calibration.rope, calibration.streams["keys"].mean, calibration.kv_heads,
                                          max_position)
            started = time.perf_counter()
            found = [estimator.estimate(kv[0, :, s : s + CHUNK], CHUNK) for s in range(0, long_tokens, CHUNK)]
            elapsed = (time.perf_counter() - started) / len(found)
            right = sum(f.start == s for f, s in zip(found, range(0, long_tokens, CHUNK), strict=True))
            rows.append({"source": source, "tokens": long_tokens, "candidates": found[0].candidates,
                         "right": right, "chunks": len(found), "ms_per_chunk": round(1000 * elapsed, 1),
                         "min_margin": min(f.margin for f in found)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["variant"], row["ratio_target"]), []).append(row)
    out = []
    for (variant, ratio), members in groups.items():
        entry = {"variant": variant, "ratio_target": ratio, "contexts": len(members)}
        for field in ("delta_nll", "kl", "top1", "kv_rel_error", "stored_bytes_per_chunk", "blob_bytes_per_chunk"):
            values = [m[field] for m in members if m.get(field) is not None]
            if values:
                entry[field] = statistics.mean(values)
        if "positions_right" in members[0]:
            right, chunks = (sum(m[k] for m in members) for k in ("positions_right", "chunks"))
            entry["positions_right"] = f"{right}/{chunks}"
        raw = members[0]["raw_bytes_per_chunk"]
        for field in ("stored_bytes_per_chunk", "blob_bytes_per_chunk"):
            if field in entry:
                entry[field.replace("bytes_per_chunk", "ratio")] = raw / entry[field]
        out.append(entry)
    return out


def markdown(summary: list[dict], hits: list[dict]) -> str:
    lines = ["| variant | target | stored B/chunk (ratio) | blob B/chunk (ratio) | positions | ΔNLL | KL | top-1 "
             "| KV rel.err |", "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        stored = f"{s['stored_bytes_per_chunk']:.0f} ({s['stored_ratio']:.1f}×)" if "stored_ratio" in s else "–"
        blob = f"{s['blob_bytes_per_chunk']:.0f} ({s['blob_ratio']:.1f}×)" if "blob_ratio" in s else "–"
        lines.append(f"| {s['variant']} | {s['ratio_target']}× | {stored} | {blob} | {s.get('positions_right', '–')} "
                     f"| {s['delta_nll']:+.4f} | {s['kl']:.4f} | {s['top1']:.3f} | {s['kv_rel_error']:.4f} |")
    lines += ["", "| source | tokens | candidates | right | ms/chunk | min margin |", "|---|---|---|---|---|---|"]
    for h in hits:
        lines.append(f"| {h['source']} | {h['tokens']} | {h['candidates']} | {h['right']}/{h['chunks']} "
                     f"| {h['ms_per_chunk']} | {h['min_margin']:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help=f"offline model name (default {MODEL})")
    parser.add_argument("--calibration", type=Path, help="calibration file (default: the model's embedded default)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[8, 16, 32])
    parser.add_argument("--contexts", type=int, default=2, help="contexts per text source")
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--long", type=int, default=8192, help="tokens of the long hit-rate contexts (0: skip)")
    parser.add_argument("--max-positions", type=int, nargs="+", default=[32768, 131072, 1 << 20])
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    calibration_path = args.calibration or default_calibration(args.model)
    model, tokenizer = models.load(args.model)
    rows = quality_runs(model, tokenizer, calibration_path, args.ratios, args.contexts, args.prefix,
                        args.continuation)
    hits = hit_rates(model, tokenizer, calibration_path, args.long, args.max_positions) if args.long else []
    summary = summarize(rows)
    report = {"model": args.model, "calibration": str(calibration_path), "summary": summary, "hit_rates": hits,
              "rows": rows}
    table = markdown(summary, hits)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
        args.out.with_suffix(".md").write_text(f"# {args.model} through LMCache 0.5.6\n\n`python -m "
                                               f"benchmarks.lmcache_report {' '.join(argv or sys.argv[1:])}`\n\n"
                                               f"{table}\n")
    print(table)


if __name__ == "__main__":
    main()
