"""Task accuracy through the LMCache path: bf16, LMCache's fp8 serde, KIVI, turboquant and kvtc side by side.

Each prompt of :mod:`benchmarks.tasks` is prefilled once; its cached part (whole 256-token chunks) goes through each
method as in :mod:`benchmarks.lmcache_report` (kvtc and fp8 through a real LMCache StorageManager and ``fs`` tier,
the baselines in-process, charged every byte); the uncached rest of the prompt is read on the restored cache and
the answer generated greedily. Scores are paired: every method answers the same prompts, so the difference to bf16
has a much tighter interval than either score.

    python -m benchmarks.task_suite --model qwen2.5-coder-0.5b --prompts 20 --out benchmarks/results/tasks-0.5b-2k
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from calibration import models, texts
from calibration.recipes import default_calibration
from lmcache_kvtc.calibrate.capture import kv_dims, prefill
from lmcache_kvtc.calibrate.metrics import continuation_logits, greedy

from . import report_files, tasks
from .lmcache_report import CHUNK, MODEL, PathMethod, path_methods
from .machine import cpu_name

#: what answering at random scores per task (a task counts for the verdict where bf16 beats it with 95 % confidence)
CHANCE = {"many-shot-choice": 0.25}
#: "within one point" of bf16, as the paper counts it
ONE_POINT = 0.01


def bf16_method() -> PathMethod:
    return PathMethod("bf16", "bf16", 1.0, lambda kv: (kv, {"stored_bytes_per_chunk": None}))


def run(model, tokenizer, prompts: list[tasks.TaskPrompt], methods: list[PathMethod], log=print) -> list[dict]:
    """One row per prompt and method: the score and what was stored."""
    rows = []
    for i, prompt in enumerate(prompts):
        kv, _ = prefill(model, prompt.cached, logits_to_keep=1)
        raw = kv[:, :, :CHUNK].numel() * kv.element_size()
        for method in methods:
            restored, stats = method.restore(kv)
            if prompt.target is not None:
                score, output = forced_match(model, restored, prompt.rest, prompt.target), None
            else:
                tokens = greedy(model, restored, prompt.rest, prompt.new_tokens, answered(prompt, tokenizer))
                output = tokenizer.decode(tokens)
                score = prompt.score(output)
            stored = stats.get("stored_bytes_per_chunk") or raw
            rows.append({"task": prompt.task, "prompt": i, "depth": prompt.depth, "method": method.name,
                         "kind": method.kind, "ratio_target": method.ratio_target, "stored_ratio": raw / stored,
                         "score": score, "output": output and output[:120]})
            log(json.dumps(rows[-1]), flush=True)
    return rows


def forced_match(model, kv: torch.Tensor, rest: torch.Tensor, target: torch.Tensor) -> float:
    """1.0 if greedy decoding after ``rest`` on ``kv`` starts with ``target``, read in one teacher-forced pass."""
    logits = continuation_logits(model, kv, torch.cat((rest, target[:-1])))
    return float(torch.equal(logits[rest.numel() - 1 :].argmax(-1).cpu(), target))


def answered(prompt: tasks.TaskPrompt, tokenizer) -> Callable[[list[int]], bool]:
    """Generation may stop once more tokens cannot change the score: the model ended its answer, every expected
    string is there, or (a choice) its first word is complete."""

    def done(ids: list[int]) -> bool:
        if ids[-1] == tokenizer.eos_token_id:
            return True
        text = tokenizer.decode(ids)
        if prompt.choice:
            return bool(text.strip()) and (len(text.split()) > 1 or text[-1].isspace())
        return prompt.score(text) == 1.0

    return done


def _interval(values: list[float]) -> float:
    """Half-width of a normal 95 % interval of the mean of ``values``."""
    return 1.96 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")


def summarize(rows: list[dict]) -> list[dict]:
    """Per method and task: mean score, its 95 % interval, and the paired difference to bf16 with its interval."""
    scores: dict[tuple[str, str], dict[int, float]] = {}
    for r in rows:
        scores.setdefault((r["method"], r["task"]), {})[r["prompt"]] = r["score"]
    out = []
    for (method, task), by_prompt in scores.items():
        reference = scores.get(("bf16", task), {})
        common = sorted(set(by_prompt) & set(reference))
        diffs = [by_prompt[i] - reference[i] for i in common]
        ratios = [r["stored_ratio"] for r in rows if r["method"] == method and r["task"] == task]
        values = list(by_prompt.values())
        out.append({"method": method, "task": task, "prompts": len(values), "score": statistics.mean(values),
                    "interval": _interval(values), "delta": statistics.mean(diffs) if diffs else float("nan"),
                    "delta_interval": _interval(diffs), "stored_ratio": statistics.mean(ratios),
                    "kind": next(r["kind"] for r in rows if r["method"] == method),
                    "ratio_target": next(r["ratio_target"] for r in rows if r["method"] == method)})
    return out


def counted_tasks(summary: list[dict]) -> list[str]:
    """The tasks where bf16 scores above chance with 95 % confidence: only they can show a loss."""
    return [s["task"] for s in summary if s["method"] == "bf16"
            and s["score"] - s["interval"] > CHANCE.get(s["task"], 0.0)]


def largest_within(summary: list[dict], points: float = ONE_POINT) -> dict | None:
    """The kvtc row of the largest target ratio whose mean score is within ``points`` of bf16 on every counted task
    (by the point estimate; the intervals say how far the sample resolves it)."""
    counted = counted_tasks(summary)
    best = None
    for ratio in sorted({s["ratio_target"] for s in summary if s["kind"] == "kvtc"}):
        rows = [s for s in summary if s["kind"] == "kvtc" and s["ratio_target"] == ratio and s["task"] in counted]
        if rows and all(s["delta"] >= -points for s in rows):
            best = {"ratio": ratio, "stored_ratio": statistics.mean(s["stored_ratio"] for s in rows),
                    "deltas": {s["task"]: s["delta"] for s in rows}}
    return best


def markdown(report: dict) -> str:
    summary = report["summary"]
    task_names = list(dict.fromkeys(s["task"] for s in summary))
    methods = list(dict.fromkeys(s["method"] for s in summary))
    cell = {(s["method"], s["task"]): s for s in summary}
    counted = counted_tasks(summary)
    best = largest_within(summary)
    lines = [f"Model {report['model']}, calibration `{report['calibration']}`; {report['context']}-token cached part "
             f"per prompt ({report['context'] // CHUNK} LMCache chunks), the question read on the restored "
             f"cache; n prompts per task; CPU: {report['cpu']}. Score (95 % interval); Δ: paired "
             "difference to bf16 on the same prompts (95 % interval).", "",
             f"- tasks where bf16 beats chance with 95 % confidence (counted): {', '.join(counted) or 'none'}",
             "- largest kvtc `ratio` within 1 point of bf16 on every counted task (point estimate): "
             + (f"{best['ratio']:g} (stored {best['stored_ratio']:.1f}×)" if best else "none"), "",
             "| method | stored | " + " | ".join(f"{t} (n={cell[('bf16', t)]['prompts']})" for t in task_names) + " |",
             "|---|---|" + "---|" * len(task_names)]
    for method in methods:
        ratio = statistics.mean(cell[(method, t)]["stored_ratio"] for t in task_names if (method, t) in cell)
        parts = []
        for t in task_names:
            s = cell.get((method, t))
            if s is None:
                parts.append("–")
            elif method == "bf16":
                parts.append(f"{s['score']:.2f} (±{s['interval']:.2f})")
            else:
                parts.append(f"{s['score']:.2f} (Δ {s['delta']:+.2f} ± {s['delta_interval']:.2f})")
        lines.append(f"| {method} | {ratio:.1f}× | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    task_names = list(dict.fromkeys(s["task"] for s in summary))
    fig, axes = plt.subplots(1, len(task_names), figsize=(4 * len(task_names), 3.4), squeeze=False)
    for ax, task in zip(axes[0], task_names, strict=True):
        rows = [s for s in summary if s["task"] == task]
        kvtc = sorted((s for s in rows if s["kind"] == "kvtc"), key=lambda s: s["stored_ratio"])
        ax.errorbar([s["stored_ratio"] for s in kvtc], [s["score"] for s in kvtc],
                    yerr=[s["delta_interval"] for s in kvtc], marker="o", label="kvtc (± paired Δ interval)")
        for s in rows:
            if s["kind"] == "bf16":
                ax.axhline(s["score"], color="gray", linestyle="--", label="bf16")
            elif s["kind"] != "kvtc":
                ax.scatter(s["stored_ratio"], s["score"], marker="x")
                ax.annotate(s["method"], (s["stored_ratio"], s["score"]), fontsize=6)
        ax.set(title=task, xscale="log", xlabel="stored ratio vs bf16", ylabel="score", ylim=(-0.05, 1.05))
        ax.set_xticks([2, 4, 8, 16, 32], ["2", "4", "8", "16", "32"])
        ax.minorticks_off()
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(report: dict, out: Path | None) -> None:
    report_files.write(out, report, "Task suite through LMCache 0.5.6", markdown(report), plot,
                       "score vs stored ratio")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.task_suite", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help=f"offline model name (default {MODEL})")
    parser.add_argument("--calibration", type=Path, help="calibration file (default: the model's embedded default)")
    parser.add_argument("--ratios", type=float, nargs="+", default=[8, 12, 16, 20, 24, 32])
    parser.add_argument("--tasks", nargs="+", choices=list(tasks.SUITE), default=list(tasks.SUITE))
    parser.add_argument("--prompts", type=int, default=20, help="prompts per task")
    parser.add_argument("--context", type=int, default=2048, help="cached tokens per prompt (a multiple of 256)")
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                        help="KIVI and turboquant in-process beside LMCache's fp8 (default: on)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows of OUT.json (same model, calibration, context and seed) and run only the "
                             "tasks it lacks")
    parser.add_argument("--out", type=Path, help="output prefix: writes .json, .md and .png")
    args = parser.parse_args(argv)
    if args.context % CHUNK:
        parser.error(f"--context must be a multiple of {CHUNK}")
    torch.manual_seed(0)
    calibration_path = args.calibration or default_calibration(args.model)
    model, tokenizer = models.load(args.model)
    methods = [bf16_method(), *path_methods(calibration_path, args.ratios, kv_dims(model.config)[2],
                                            standalone=False, baselines=args.baselines)]
    docs = texts.kjv()
    report = {"model": args.model, "calibration": str(calibration_path), "context": args.context,
              "seed": args.seed, "prompts": args.prompts, "tasks": args.tasks, "cpu": cpu_name(),
              "date": time.strftime("%Y-%m-%d"),
              "command": "python -m benchmarks.task_suite " + " ".join(sys.argv[1:] if argv is None else argv),
              "rows": []}
    previous = args.out.parent / f"{args.out.name}.json" if args.out else None
    if args.resume and previous and previous.exists():
        old = json.loads(previous.read_text())
        if any(old.get(k) != report[k] for k in ("model", "calibration", "context", "seed")):
            parser.error(f"{previous} was made with another model, calibration, context or seed")
        report["rows"] = [r for r in old["rows"] if r["task"] in args.tasks]
    for task in (t for t in args.tasks if t not in {r["task"] for r in report["rows"]}):
        prompts = tasks.SUITE[task](tokenizer, docs, args.context, args.prompts, args.seed)
        report["rows"] += run(model, tokenizer, prompts, methods)
        report["summary"] = summarize(report["rows"])
        write(report, args.out)  # what is done so far survives a stopped run
    print(markdown(report))


if __name__ == "__main__":
    main()
