"""Rate–distortion of KVTC vs baselines and ablations on a real model and held-out text, plus passkey retrieval.

For each context: prefill, keep 4 sink + 128 recent tokens exact, replace the cache of the
other tokens with each codec's reconstruction, and read the continuation teacher-forced on
top of it: ΔNLL, KL(uncompressed ‖ compressed), top-1 agreement per token, and the relative
squared error of keys and values. Ratios are vs bf16 counting every byte (region = the
compressed tokens only; overall = the whole cache). Then a passkey planted at several depths
of held-out text is asked for with each codec's cache.

    python -m benchmarks.quality --model qwen2.5-coder-0.5b --context 4096 --out benchmarks/results/q05-4k
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from calibration import models, texts
from calibration.recipes import default_calibration
from lmcache_kvtc import Calibration
from lmcache_kvtc.calibrate.capture import prefill
from lmcache_kvtc.calibrate.fitting import NAMED_RATIOS
from lmcache_kvtc.calibrate.metrics import compare_logits, continuation_logits
from lmcache_kvtc.calibrate.report import water_filling

from . import methods, retrieval
from .ablations import ABLATION_RATIOS, ablation_calibrations
from .baselines import default_baselines
from .quality_report import markdown, plot

EVAL_TEXT = "Python 3 docs (stdlib pydoc_data topics), not the calibration source"
SUMMARY_KEYS = ("delta_nll", "kl", "top1", "rel_err_keys", "rel_err_values", "region_ratio", "overall_ratio",
                "region_pre_entropy")


def candidates(calibration: Calibration, ratios: list[float] | None, ablations: dict[str, Calibration]) -> list:
    """The calibration's named rungs (or ``ratios``), every baseline, and each ablation at its ratios."""
    if ratios is None:
        ratios = [r for r in calibration.ratios if r in NAMED_RATIOS] or calibration.ratios
    out = [methods.kvtc(calibration, r) for r in ratios]
    out += [methods.baseline(b) for b in default_baselines()]
    for variant, cal in ablations.items():
        out += [methods.kvtc(cal, r, kind="ablation", label=f"KVTC {variant}") for r in cal.ratios]
    return out


def rate_distortion(lm, ids_list, continuation: int, candidates: list) -> list[dict]:
    """Mean ± std over contexts of every metric, one row per method."""
    runs: dict[str, list[dict]] = {}
    for n, ids in enumerate(ids_list):
        started = time.time()
        prefix, cont = ids[:-continuation], ids[-continuation:]
        kv, _ = prefill(lm, prefix, logits_to_keep=1)
        reference = continuation_logits(lm, kv, cont)
        for method in candidates:
            restored, ratios = method.restore(kv)
            metrics = compare_logits(reference, continuation_logits(lm, restored, cont), cont)
            runs.setdefault(method.name, []).append({**metrics, **ratios, **methods.relative_errors(kv, restored)})
        print(f"context {n + 1}/{len(ids_list)} done in {time.time() - started:.0f}s", flush=True)
    rows = []
    for method in candidates:
        row = {"method": method.name, "kind": method.kind, "plan": runs[method.name][0].get("plan")}
        for key in SUMMARY_KEYS:
            values = [r[key] for r in runs[method.name] if key in r]
            if values:
                row[key], row[key + "_std"] = statistics.fmean(values), statistics.pstdev(values)
        rows.append(row)
    return sorted(rows, key=lambda r: r["region_ratio"])


def evaluate(model: str, calibration: Path, contexts: int, context: int, continuation: int,
             ratios: list[float] | None = None, ablations: bool = True, depths: tuple[float, ...] = (),
             trials_per_depth: int = 2, keys: int = 1) -> dict:
    lm, tokenizer = models.load(model)
    cal = Calibration.load(calibration)
    variants = ablation_calibrations(calibration) if ablations else {}
    chosen = candidates(cal, ratios, variants)
    docs = texts.python_docs()
    ids_list = texts.token_contexts(tokenizer, docs, contexts, context + continuation, seed=1)
    trial_list = retrieval.trials(tokenizer, docs, context, depths, trials_per_depth, seed=2, keys=keys)
    for trial in trial_list:  # every needle must sit in what every method compresses
        for start, end in trial.needles:
            if not methods.SINKS <= start < end <= len(trial.ids) - 1 - methods.WINDOW:
                raise ValueError(f"needle {(start, end)} of the prompt for depth {trial.depth} is outside "
                                 "the compressed region")
    result = {
        "model": model,
        "calibration": str(calibration),
        "calibration_source": cal.info.get("source"),
        "calibration_key_weight": cal.info.get("key_weight"),
        "calibration_normalize": cal.info.get("normalize", "none"),
        "eval_text": EVAL_TEXT,
        "contexts": contexts,
        "context_tokens": context,
        "continuation_tokens": continuation,
        "exact_tokens": {"sinks": methods.SINKS, "window": methods.WINDOW},
        "date": time.strftime("%Y-%m-%d"),
        "water_filling": _limits(cal),
        "results": rate_distortion(lm, ids_list, continuation, chosen),
    }
    if trial_list:
        probed = [m for m in chosen if m.kind != "ablation"]
        restorers = {m.name: (lambda kv, m=m: m.restore(kv)[0]) for m in probed}
        result["retrieval"] = {"depths": list(depths), "trials_per_depth": trials_per_depth, "keys": keys,
                               "accuracy": retrieval.run(lm, tokenizer, trial_list, restorers)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--calibration", help="default: the model's cached default calibration (built if missing)")
    parser.add_argument("--contexts", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048, help="tokens prefilled per context")
    parser.add_argument("--continuation", type=int, default=512, help="tokens read teacher-forced after it")
    parser.add_argument("--ratios", type=float, nargs="*",
                        help="KVTC plans to run (default: the ladder's named rungs, 4x to 64x)")
    parser.add_argument("--no-ablations", action="store_true",
                        help=f"skip the ablations (refit once per calibration; run at {list(ABLATION_RATIOS)}×)")
    parser.add_argument("--depths", type=float, nargs="*", default=[0.1, 0.3, 0.5, 0.7, 0.9],
                        help="passkey depths (fractions of the context); none = no retrieval test")
    parser.add_argument("--trials", type=int, default=2, help="passkey prompts per depth")
    parser.add_argument("--keys", type=int, default=1,
                        help="keys per prompt: 1 = the classic passkey; more = keys for differently coloured "
                             "doors at random depths, one asked for (harder)")
    parser.add_argument("--out", required=True, help="output prefix: writes .json, .md and .png")
    args = parser.parse_args(argv)
    calibration = Path(args.calibration) if args.calibration else default_calibration(args.model)
    result = evaluate(args.model, calibration, args.contexts, args.context, args.continuation, args.ratios,
                      ablations=not args.no_ablations, depths=tuple(args.depths), trials_per_depth=args.trials,
                      keys=args.keys)
    result["command"] = "python -m benchmarks.quality " + " ".join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / f"{out.name}.json").write_text(json.dumps(result, indent=1))
    (out.parent / f"{out.name}.md").write_text(markdown(result))
    plot(result, out.parent / f"{out.name}.png")
    print(markdown(result))
    return 0


def _limits(cal: Calibration) -> dict[str, dict[str, list[float]]]:
    """Reverse water-filling (ratio, relative squared error) per stream from the calibration spectrum.

    Left out for layer-scaled streams: their spectrum lives in the scaled space, the measured errors do not.
    """
    energy = cal.info.get("heldout_energy", {})
    return {
        s: dict(zip(("ratio", "rel_err"), water_filling(cal.streams[s].eigenvalues, energy[s]), strict=True))
        for s in energy
        if cal.streams[s].scale is None
    }


if __name__ == "__main__":
    raise SystemExit(main())
