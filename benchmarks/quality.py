"""Rate–distortion of KVTC vs baselines on a real model and held-out text.

For each context: prefill, keep 4 sink + 128 recent tokens exact, replace the cache of the
other tokens with each codec's reconstruction, and read the continuation teacher-forced on
top of it. Reports ΔNLL, KL(uncompressed ‖ compressed) and top-1 agreement per token,
ratios vs bf16 counting every byte (region = compressed tokens only; overall = whole cache).

    python -m benchmarks.quality --model qwen2.5-coder-1.5b --contexts 8 --out benchmarks/results/qwen15
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from calibration import texts
from calibration.calibrate import default_calibration, load_model
from calibration.kv_capture import prefill
from calibration.metrics import compare_logits, continuation_logits
from lmcache_kvtc import Calibration, KVTCCodec
from lmcache_kvtc.inspect import describe

from .baselines import default_baselines

SINKS, WINDOW = 4, 128


def evaluate(model: str, calibration: Path, contexts: int, context: int, continuation: int,
             ratios: list[float] | None = None, baselines: list | None = None) -> dict:
    lm, tokenizer = load_model(model)
    cal = Calibration.load(calibration)
    ids_list = texts.token_contexts(tokenizer, texts.python_docs(), contexts, context + continuation, seed=1)
    rows: dict[str, dict] = {}

    def record(name: str, kind: str, metrics: dict, region_ratio: float, overall_ratio: float, **extra) -> None:
        row = rows.setdefault(name, {"method": name, "kind": kind, "runs": []})
        row["runs"].append({**metrics, "region_ratio": region_ratio, "overall_ratio": overall_ratio, **extra})

    for n, ids in enumerate(ids_list):
        started = time.time()
        prefix, cont = ids[:context], ids[context:]
        kv, _ = prefill(lm, prefix, logits_to_keep=1)
        reference = continuation_logits(lm, kv, cont)
        raw_bytes = kv.numel() * kv.element_size()
        region = slice(SINKS, context - WINDOW)
        region_raw = kv[:, :, region].numel() * kv.element_size()
        exact_raw = raw_bytes - region_raw
        for ratio in cal.ratios if ratios is None else ratios:
            codec = KVTCCodec(cal, ratio=ratio)
            blob = codec.encode(kv, start=0, sinks=SINKS, window=WINDOW)
            info = describe(blob)
            metrics = compare_logits(reference, continuation_logits(lm, codec.decode(blob), cont), cont)
            record(f"KVTC {ratio:g}x", "kvtc", metrics, info["ratio"]["region"], info["ratio"]["overall"],
                   region_pre_entropy=info["ratio"]["region_pre_entropy"], plan=ratio)
        for baseline in default_baselines() if baselines is None else baselines:
            restored = kv.clone()
            restored[:, :, region], stored = baseline.roundtrip(kv[:, :, region].contiguous())
            metrics = compare_logits(reference, continuation_logits(lm, restored, cont), cont)
            record(baseline.name, "baseline", metrics, region_raw / stored, raw_bytes / (stored + exact_raw))
        print(f"context {n + 1}/{len(ids_list)} done in {time.time() - started:.0f}s", flush=True)

    summary = []
    for row in rows.values():
        runs = row.pop("runs")
        out = dict(row)
        for key in ("delta_nll", "kl", "top1", "region_ratio", "overall_ratio", "region_pre_entropy"):
            values = [r[key] for r in runs if key in r]
            if values:
                out[key] = statistics.fmean(values)
                out[key + "_std"] = statistics.pstdev(values)
        summary.append(out)
    return {
        "model": model,
        "calibration": str(calibration),
        "calibration_source": cal.info.get("source"),
        "calibration_key_weight": cal.info.get("key_weight"),
        "eval_text": "Python 3 docs (stdlib pydoc_data topics) — not the calibration source",
        "contexts": contexts,
        "context_tokens": context,
        "continuation_tokens": continuation,
        "exact_tokens": {"sinks": SINKS, "window": WINDOW},
        "date": time.strftime("%Y-%m-%d"),
        "results": sorted(summary, key=lambda r: r["region_ratio"]),
    }


def markdown(result: dict) -> str:
    lines = [
        f"## {result['model']} — {result['contexts']} contexts × {result['context_tokens']} tokens, "
        f"next {result['continuation_tokens']} tokens teacher-forced ({result['date']})",
        "",
        f"Calibration: {result['calibration_source']}; evaluation: {result['eval_text']}. "
        f"{result['exact_tokens']['sinks']} sink + {result['exact_tokens']['window']} recent tokens exact for every "
        "method. Region ratio = bf16 bytes of the compressed tokens / bytes stored for them (KVTC: blob minus exact "
        "tokens, header included); overall = whole cache incl. exact tokens.",
        "",
        "| method | region ratio | (pre-entropy) | overall ratio | ΔNLL (nats/token) | KL (nats/token) | top-1 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        pre = f"{r['region_pre_entropy']:.1f}×" if "region_pre_entropy" in r else "—"
        lines.append(
            f"| {r['method']} | {r['region_ratio']:.1f}× | {pre} | {r['overall_ratio']:.1f}× | "
            f"{r['delta_nll']:+.4f} ± {r['delta_nll_std']:.4f} | {r['kl']:.4f} ± {r['kl_std']:.4f} | {r['top1']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, label in ((axes[0], "kl", "KL (nats/token)"), (axes[1], "delta_nll", "ΔNLL (nats/token)")):
        kvtc = [r for r in result["results"] if r["kind"] == "kvtc"]
        ax.plot([r["region_ratio"] for r in kvtc], [max(r[key], 1e-5) for r in kvtc], "o-", label="KVTC (ladder)")
        for r in result["results"]:
            if r["kind"] == "baseline":
                ax.plot(r["region_ratio"], max(r[key], 1e-5), "s", label=r["method"])
        ax.set(xscale="log", yscale="log", xlabel="compression ratio of the compressed region (vs bf16)", ylabel=label)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{result['model']}: {result['contexts']} × {result['context_tokens']}-token contexts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--calibration", help="default: the model's cached default calibration (built if missing)")
    parser.add_argument("--contexts", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--continuation", type=int, default=256)
    parser.add_argument("--ratios", type=float, nargs="*", help="KVTC plans to run (default: the whole ladder)")
    parser.add_argument("--out", required=True, help="output prefix: writes .json, .md and .png")
    args = parser.parse_args(argv)
    calibration = Path(args.calibration) if args.calibration else default_calibration(args.model)
    result = evaluate(args.model, calibration, args.contexts, args.context, args.continuation, args.ratios)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.json").write_text(json.dumps(result, indent=2))
    (out.parent / f"{out.name}.md").write_text(markdown(result))
    plot(result, out.parent / f"{out.name}.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
