"""What users get: KVTC through LMCache 0.5.6, side by side with LMCache's own serdes and other baselines.

Each held-out context's prefix cache is cut into LMCache's 256-token chunks and goes through a real MP
StorageManager (L1 → serde → ``fs`` L2 → serde → L1): the ``kvtc`` serde at each ratio (it never sees
positions, keeps no recent window exact; the first chunk's 4 sinks stay exact) and LMCache's own ``fp8``
serde. Baselines that LMCache cannot run here (KIVI-2/4; LMCache's ``turboquant`` presets, which need CUDA,
reproduced from its source) code the same chunks in-process and are charged every byte they would store.
The next tokens are then read teacher-forced on each restored cache: ΔNLL, KL, top-1 against the exact
cache. A multi-key retrieval test (keys for coloured doors planted in the prefix, one asked for at its end)
runs through the same paths, and long contexts measure the serde's position estimate.

    python -m benchmarks.lmcache_report --model qwen2.5-coder-0.5b --out benchmarks/results/qwen2.5-coder-0.5b-lmcache
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from calibration import models, texts, tiers
from calibration.recipes import default_calibration
from lmcache_kvtc import Calibration, KVTCCodec
from lmcache_kvtc.calibrate.capture import kv_dims, prefill
from lmcache_kvtc.calibrate.metrics import compare_logits, continuation_logits, relative_error
from lmcache_kvtc.lmcache.fp8 import Fp8Cache
from lmcache_kvtc.lmcache.position import PositionEstimator

from . import report_files, retrieval
from .baselines import KIVI, Baseline, turboquant_baselines
from .machine import cpu_name

MODEL = "qwen2.5-coder-0.5b"
CHUNK = tiers.CHUNK_TOKENS
#: evaluation sources, none of them the calibration's: documentation, scripture (prose), held-out code whose
#: continuations copy identifiers and spans of the prefix, and mailing-list archives (the most copy-heavy: headers
#: and footers repeat in every message, replies quote earlier ones)
SOURCES = {"python-docs": texts.python_docs, "kjv": texts.kjv, "transformers-code": texts.library_source,
           "mail": texts.mail}
#: vLLM's fp8 cache as CUDA writes it (scale 1, round to nearest even, saturating), simulated with torch's cast
FP8_OPTION = "fp8"
#: the kinds of rows that are kvtc through LMCache, and how the report names them
KVTC_KINDS = {"kvtc": "kvtc", "kvtc-fp8": "fp8 KV + kvtc"}


@dataclass
class PathMethod:
    """One way a prefix cache can be stored: the cache in, its restored copy and what was stored out."""

    name: str
    kind: str  # "kvtc" (through LMCache), "lmcache" (LMCache's own serde), "baseline" (in-process), "standalone"
    ratio_target: float | None
    restore: Callable[[torch.Tensor], tuple[torch.Tensor, dict]]


def through_lmcache(kv: torch.Tensor, calibration_path: Path, ratio: float, serde: dict | None = None,
                    **options) -> tuple[torch.Tensor, dict]:
    """``kv`` through L1 → serde → ``fs`` → serde → L1: kvtc at ``ratio`` (with serde ``options``) unless ``serde``
    names another."""
    with tempfile.TemporaryDirectory() as tmp:
        adapter = {"type": "fs", "base_path": tmp, **({"serde": serde} if serde else {})}
        restored, stats = tiers.store_and_load(kv, str(calibration_path), adapter, ratio=ratio, **options)
    if restored is None:
        raise RuntimeError(f"LMCache round trip lost chunks: {stats}")
    return restored, stats


def kvtc_method(calibration_path: Path, ratio: float, fp8: Fp8Cache | None = None) -> PathMethod:
    """kvtc through LMCache; with ``fp8`` the cache is vLLM's fp8 one (uint8 objects, serde ``kv_cache_dtype``)."""

    def restore(kv):
        if fp8 is None:
            restored, stats = through_lmcache(kv, calibration_path, ratio)
        else:
            restored, stats = through_lmcache(fp8.quantize(kv), calibration_path, ratio, kv_cache_dtype=FP8_OPTION)
            restored = fp8.dequantize(restored)
        return restored, {"stored_bytes_per_chunk": statistics.mean(stats["stored_bytes"]),
                          "blob_bytes_per_chunk": statistics.mean(stats["blob_bytes"]),
                          "plan_ratios": stats["plan_ratios"], "positions_right": stats["positions_right"],
                          "chunks": stats["chunks"]}

    if fp8 is None:
        return PathMethod(f"kvtc ratio {ratio:g}", "kvtc", ratio, restore)
    return PathMethod(f"fp8 KV + kvtc ratio {ratio:g}", "kvtc-fp8", ratio, restore)


def fp8_cache_method(fp8: Fp8Cache) -> PathMethod:
    """vLLM's fp8 KV cache stored as it is (no serde): 1 byte per element, read back dequantized."""

    def restore(kv):
        return fp8.dequantize(fp8.quantize(kv)), {"stored_bytes_per_chunk": kv[:, :, :CHUNK].numel()}

    return PathMethod("vLLM fp8 KV cache (e4m3), no serde", "fp8-cache", 2.0, restore)


def fp8_method(calibration_path: Path) -> PathMethod:
    def restore(kv):
        restored, stats = through_lmcache(kv, calibration_path, 16, serde={"type": "fp8"})
        return restored, {"stored_bytes_per_chunk": statistics.mean(stats["stored_bytes"])}

    return PathMethod("LMCache fp8 serde", "lmcache", 2.0, restore)


def baseline_method(baseline: Baseline) -> PathMethod:
    """A baseline coding each 256-token chunk on its own, as a serde would."""

    def restore(kv):
        parts, stored = zip(*(baseline.roundtrip(kv[:, :, s : s + CHUNK].contiguous())
                              for s in range(0, kv.shape[2], CHUNK)), strict=True)
        return torch.cat(parts, dim=2), {"stored_bytes_per_chunk": statistics.mean(stored)}

    return PathMethod(baseline.name, "baseline", None, restore)


def standalone_method(calibration: Calibration, ratio: float) -> PathMethod:
    """The standalone API on the whole prefix (4 sinks and a 128-token window exact): not what LMCache does."""
    codec, plan = KVTCCodec(calibration), calibration.plan_index(ratio)

    def restore(kv):
        blob = codec.encode(kv, plan=plan, start=0, sinks=4, window=128)
        return codec.decode(blob), {"blob_bytes_per_chunk": len(blob) / (kv.shape[2] // CHUNK)}

    return PathMethod(f"standalone plan {ratio:g}, whole prefix, window 128", "standalone", ratio, restore)


def path_methods(calibration_path: Path, ratios: list[float], head_dim: int, standalone: bool,
                 baselines: bool = True, fp8_cache: bool = False) -> list[PathMethod]:
    calibration = Calibration.load(calibration_path)
    out = [fp8_method(calibration_path)] + [kvtc_method(calibration_path, r) for r in ratios]
    if fp8_cache:
        fp8 = Fp8Cache.from_option(FP8_OPTION)
        out += [fp8_cache_method(fp8)] + [kvtc_method(calibration_path, r, fp8) for r in ratios]
    if baselines:
        out += [baseline_method(b) for b in (KIVI(4), KIVI(2), *turboquant_baselines(head_dim))]
    if standalone:
        out += [standalone_method(calibration, r) for r in ratios if r in calibration.ratios]
    return out


def quality_runs(model, tokenizer, methods: list[PathMethod], n_contexts: int, prefix: int,
                 continuation_tokens: int, sources: list[str]) -> list[dict]:
    rows = []
    for source in sources if n_contexts else ():
        docs = SOURCES[source]()
        for ids in texts.token_contexts(tokenizer, docs, n_contexts, prefix + continuation_tokens, seed=21):
            kv, _ = prefill(model, ids[:prefix], logits_to_keep=1)
            continuation = ids[prefix:]
            reference = continuation_logits(model, kv, continuation)
            raw = kv[:, :, :CHUNK].numel() * kv.element_size()
            for method in methods:
                restored, stats = method.restore(kv)
                metrics = compare_logits(reference, continuation_logits(model, restored, continuation), continuation)
                rows.append({"source": source, "method": method.name, "kind": method.kind,
                             "ratio_target": method.ratio_target, "raw_bytes_per_chunk": raw, **stats, **metrics,
                             "kv_rel_error": relative_error(kv, restored)})
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "plan_ratios"}), flush=True)
    return rows


def retrieval_runs(model, tokenizer, methods: list[PathMethod], prefix: int, keys: int, depths: list[float],
                   per_depth: int) -> dict:
    """Multi-key retrieval on the LMCache path: the whole prompt but its last token is the stored prefix."""
    trial_list = retrieval.trials(tokenizer, texts.python_docs(), prefix + 1, depths, per_depth, seed=2, keys=keys)
    restorers = {m.name: (lambda kv, m=m: m.restore(kv)[0]) for m in methods if m.kind != "standalone"}
    return {"keys": keys, "depths": depths, "trials_per_depth": per_depth,
            "accuracy": retrieval.run(model, tokenizer, trial_list, restorers)}


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


def summarize(rows: list[dict], by_source: bool = False) -> list[dict]:
    """Per method (and source): mean and range over contexts; ratios from the mean bytes per chunk."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["method"], row["source"] if by_source else None), []).append(row)
    out = []
    for (method, source), members in groups.items():
        first = members[0]
        entry = {"method": method, "kind": first["kind"], "ratio_target": first["ratio_target"],
                 "contexts": len(members), **({"source": source} if by_source else {})}
        for field in ("delta_nll", "kl", "top1", "kv_rel_error", "stored_bytes_per_chunk", "blob_bytes_per_chunk"):
            values = [m[field] for m in members if m.get(field) is not None]
            if values:
                entry[field] = statistics.mean(values)
                entry[field + "_range"] = [min(values), max(values)]
        for field in ("stored_bytes_per_chunk", "blob_bytes_per_chunk"):
            if field in entry:
                entry[field.replace("bytes_per_chunk", "ratio")] = first["raw_bytes_per_chunk"] / entry[field]
        if "positions_right" in first:
            entry["positions_right"] = f"{sum(m['positions_right'] for m in members)}/" \
                                       f"{sum(m['chunks'] for m in members)}"
            plans = [p for m in members for p in m["plan_ratios"]]
            entry["plans"] = [min(plans), statistics.median(plans), max(plans)]
        out.append(entry)
    return out


def largest_within(summary: list[dict], limits: dict[str, float], kind: str = "kvtc") -> dict | None:
    """The ``kind`` row of highest stored ratio whose mean metrics are all within ``limits``."""
    inside = [s for s in summary if s["kind"] == kind and all(s[k] <= v for k, v in limits.items())]
    return max(inside, key=lambda s: s["stored_ratio"], default=None)


def worst_source(per_source: list[dict], limits: dict[str, float], kind: str = "kvtc"
                 ) -> tuple[float | None, dict[str, float | None]]:
    """The largest ``kind`` ratio within ``limits`` on every source (judged by the worst), and each source's own."""
    sources = sorted({s["source"] for s in per_source})
    own = {src: largest_within([s for s in per_source if s["source"] == src], limits, kind) for src in sources}
    ratios = {src: (best["ratio_target"] if best else None) for src, best in own.items()}
    found = [r for r in ratios.values() if r is not None]
    return (min(found) if len(found) == len(sources) else None), ratios


def markdown(report: dict) -> str:
    summary, hits = report["summary"], report["hit_rates"]
    lines = [f"Calibration: `{report['calibration']}` ({report['calibration_source']}); evaluation: "
             f"{report['contexts']} context(s) each of {', '.join(report['sources'])}, {report['prefix']}-token "
             f"prefix in {CHUNK}-token chunks, next {report['continuation']} tokens teacher-forced. Stored = every "
             "byte LMCache keeps per chunk (kvtc: its fixed-size object); baselines in-process are charged their "
             f"codes + scales. Mean [min–max] over contexts. Ran on {report.get('cpu', 'an unrecorded CPU')}.", ""]
    if not summary:  # --contexts 0
        lines = [f"Calibration: `{report['calibration']}` ({report['calibration_source']}); retrieval test only."]
    for label, limits in (("KL ≤ 0.03 and ΔNLL ≤ 0.03", {"kl": 0.03, "delta_nll": 0.03}),
                          ("KL ≤ 0.06", {"kl": 0.06})) if summary else ():
        for kind, name in KVTC_KINDS.items():
            if not any(s["kind"] == kind for s in summary):
                continue
            best = largest_within(summary, limits, kind)
            found = (f"{best['method']}: {best['stored_ratio']:.1f}× (KL {best['kl']:.4f}, "
                     f"ΔNLL {best['delta_nll']:+.4f})" if best else "none")
            lines.append(f"- largest {name} stored ratio with {label}, mean over all contexts: {found}")
            if report.get("per_source"):
                worst, each = worst_source(report["per_source"], limits, kind)
                lines.append(f"- largest {name} `ratio` with {label} on every source (the worst decides): "
                             f"{f'{worst:g}' if worst else 'none'} (" + ", ".join(
                                 f"{src}: {r:g}" if r else f"{src}: none" for src, r in each.items()) + ")")
    if summary:
        lines += ["", "| method | stored B/chunk (ratio) | plans chosen (min/median/max) | positions | KL | ΔNLL "
                  "| top-1 | KV rel.err |", "|---|---|---|---|---|---|---|---|"]
    for s in sorted(summary, key=lambda s: (s["kind"] == "standalone", s.get("stored_ratio", 0))):
        if "stored_ratio" in s:
            stored = f"{s['stored_bytes_per_chunk']:,.0f} ({s['stored_ratio']:.1f}×)"
        else:
            stored = f"blob {s['blob_bytes_per_chunk']:,.0f} ({s['blob_ratio']:.1f}×)"
        plans = "/".join(f"{p:.1f}×" for p in s["plans"]) if "plans" in s else "–"
        kl, nll = s["kl_range"], s["delta_nll_range"]
        lines.append(f"| {s['method']} | {stored} | {plans} | {s.get('positions_right', '–')} | {s['kl']:.4f} "
                     f"[{kl[0]:.4f}–{kl[1]:.4f}] | {s['delta_nll']:+.4f} [{nll[0]:+.3f}–{nll[1]:+.3f}] "
                     f"| {s['top1']:.3f} | {s['kv_rel_error']:.4f} |")
    if report.get("per_source"):
        kvtc = sorted((s for s in report["per_source"] if s["kind"] in (*KVTC_KINDS, "lmcache", "fp8-cache")),
                      key=lambda s: (s["source"], s.get("stored_ratio", 0)))
        lines += ["", "Per source (mean over its contexts):", "",
                  "| source | method | stored ratio | KL | ΔNLL | top-1 |", "|---|---|---|---|---|---|"]
        lines += [f"| {s['source']} | {s['method']} | {s['stored_ratio']:.1f}× | {s['kl']:.4f} | "
                  f"{s['delta_nll']:+.4f} | {s['top1']:.3f} |" for s in kvtc if "stored_ratio" in s]
    if "retrieval" in report:
        info = report["retrieval"]
        depths = [f"{d:g}" for d in info["depths"]]
        lines += ["", f"Multi-key retrieval: {info['keys']} keys per prompt, {len(depths)} depths × "
                  f"{info['trials_per_depth']} prompts of {report['prefix'] + 1} tokens, the whole prefix through "
                  "each path.", "", "| method | accuracy | " + " | ".join(depths) + " |",
                  "|---|---|" + "---|" * len(depths)]
        for name, acc in info["accuracy"].items():
            lines.append(f"| {name} | {acc['accuracy']:.2f} | " + " | ".join(f"{acc['by_depth'][d]:.2f}"
                                                                          for d in depths) + " |")
    if hits:
        lines += ["", "| position estimate: source | tokens | candidates | right | ms/chunk | min margin |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {h['source']} | {h['tokens']} | {h['candidates']} | {h['right']}/{h['chunks']} "
                  f"| {h['ms_per_chunk']} | {h['min_margin']:.4f} |" for h in hits]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    stored = [s for s in report["summary"] if "stored_ratio" in s]
    for ax, metric in zip(axes, ("kl", "delta_nll"), strict=True):
        for kind, name in KVTC_KINDS.items():
            kvtc = sorted((s for s in stored if s["kind"] == kind), key=lambda s: s["stored_ratio"])
            if kvtc:
                ax.plot([s["stored_ratio"] for s in kvtc], [s[metric] for s in kvtc], "o-",
                        label=f"{name} (through LMCache)")
        for s in stored:
            if s["kind"] not in KVTC_KINDS:
                ax.plot(s["stored_ratio"], s[metric], "s" if s["kind"] == "lmcache" else "^", label=s["method"])
        ax.set(xscale="log", xlabel="stored ratio vs bf16", ylabel={"kl": "KL (nats/token)", "delta_nll": "ΔNLL"}[
            metric], title=f"{report['model']}: {metric} on the LMCache path")
        if metric == "kl":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(report: dict, out: Path | None) -> None:
    report_files.write(out, report, f"{report['model']} through LMCache 0.5.6", markdown(report),
                       plot if report["summary"] else None,  # a retrieval-only run (--contexts 0) has no curve
                       "KL and ΔNLL vs stored ratio")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lmcache_report", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help=f"offline model name (default {MODEL})")
    parser.add_argument("--calibration", type=Path, help="calibration file (default: the model's embedded default)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[8, 12, 16, 20, 24, 32])
    parser.add_argument("--contexts", type=int, default=2, help="contexts per text source (0: retrieval only)")
    parser.add_argument("--sources", nargs="+", choices=list(SOURCES), default=list(SOURCES))
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                        help="KIVI and turboquant in-process beside LMCache's fp8 (default: on)")
    parser.add_argument("--prefix", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=512)
    parser.add_argument("--keys", type=int, default=4, help="keys per retrieval prompt (0: no retrieval test)")
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--trials", type=int, default=2, help="retrieval prompts per depth")
    parser.add_argument("--standalone", action="store_true", help="also the standalone codec on the whole prefix")
    parser.add_argument("--fp8-cache", action="store_true",
                        help="also vLLM's fp8 (e4m3) KV cache, alone and through kvtc (kv_cache_dtype fp8)")
    parser.add_argument("--long", type=int, default=0, help="tokens of the long position-estimate contexts (0: skip)")
    parser.add_argument("--max-positions", type=int, nargs="+", default=[32768, 131072, 1 << 20])
    parser.add_argument("--out", type=Path, help="output prefix: writes .json, .md and .png")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    calibration_path = args.calibration or default_calibration(args.model)
    model, tokenizer = models.load(args.model)
    methods = path_methods(calibration_path, args.ratios, kv_dims(model.config)[2], args.standalone, args.baselines,
                           args.fp8_cache)
    rows = quality_runs(model, tokenizer, methods, args.contexts, args.prefix, args.continuation, args.sources)
    calibration = Calibration.load(calibration_path)
    report = {"model": args.model, "calibration": str(calibration_path),
              "calibration_source": calibration.info.get("source"), "contexts": args.contexts, "sources": args.sources,
              "prefix": args.prefix, "continuation": args.continuation, "date": time.strftime("%Y-%m-%d"),
              "cpu": cpu_name(),
              "command": "python -m benchmarks.lmcache_report " + " ".join(sys.argv[1:] if argv is None else argv),
              "summary": summarize(rows), "per_source": summarize(rows, by_source=True), "rows": rows,
              "hit_rates": hit_rates(model, tokenizer, calibration_path, args.long, args.max_positions)
              if args.long else []}
    write(report, args.out)  # the quality rows are kept even if the retrieval test is stopped
    if args.keys:
        report["retrieval"] = retrieval_runs(model, tokenizer, methods, args.prefix, args.keys, args.depths,
                                             args.trials)
        write(report, args.out)
    table = markdown(report)
    print(table)


if __name__ == "__main__":
    main()
