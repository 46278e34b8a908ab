"""What a calibration fit costs as models grow: time, peak memory, basis file size and what the rank cap loses.

For each feature count p (per stream: layers × KV heads × head_dim of one worker) and each fit — the exact
fp64 covariance (``exact``) and the Frequent Directions sketch (``sketch``, rank ``--rank``) — one subprocess
accumulates ``--tokens`` tokens of two streams in 2,040-token batches (a 2K context less sinks and window, as
``kvtc calibrate`` does) and decomposes them, on ``--device``. Peak memory is the subprocess's peak RSS (and
the GPU allocator's peak on CUDA); time is accumulate + decompose.

Features are SYNTHETIC with a realistic spectrum: eigenvalues ∝ i^-2 (a power law fitted to Qwen2.5-Coder-0.5B's
measured spectra: exponent 2.2 for keys, 1.9 for values) plus a mean, along the coordinate axes — both fits are
rotation-equivariant, so axes cost and lose exactly what a rotated basis would. What a fit loses is the energy a
basis of rank k drops (of the true covariance) over the least any rank-k basis drops: 1.00 is optimal.

    python -m benchmarks.fit_scaling --out benchmarks/results/fit-scaling-cpu.md            # this machine
    python -m benchmarks.fit_scaling --device cuda --out fit-scaling-gpu.md                 # a GPU machine
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmcache_kvtc.calibrate.fitting import FeatureCovariance, SketchedCovariance

from .machine import cpu_name

BATCH = 2040
#: p -> (what has that many features per stream, parameters behind one worker's cache)
SHAPES = {
    3072: ("Qwen2.5-Coder-0.5B", 0.494e9),
    7168: ("Qwen2.5-Coder-1.5B", 1.54e9),
    10240: ("Llama-3.1-70B at TP 8 (one rank)", 70.6e9 / 8),
    32768: ("Llama-3.1-8B", 8.03e9),
}


def spectrum(p: int) -> torch.Tensor:
    return torch.arange(1, p + 1, dtype=torch.float64) ** -2.0


def fit_once(p: int, method: str, tokens: int, rank: int, device: str) -> dict:
    """One fit of two streams in this process; returns its measurements."""
    sigmas = spectrum(p).sqrt().float().to(device)
    mean = torch.linspace(-1, 1, p, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    accumulators = [FeatureCovariance(p, device) if method == "exact" else SketchedCovariance(p, rank, device)
                    for _ in range(2)]
    started = time.perf_counter()
    for first in range(0, tokens, BATCH):
        n = min(BATCH, tokens - first)
        for accumulator in accumulators:
            accumulator.add(torch.randn(n, p, generator=generator, device=device) * sigmas + mean)
    accumulated = time.perf_counter() - started
    bases = [accumulator.pca() for accumulator in accumulators]
    seconds = time.perf_counter() - started
    true = spectrum(p)
    losses = {}
    for k in sorted({p // 16, p // 8, min(p // 4, rank)}):
        dropped = float(true.sum() - (bases[0].basis[:, :k].double().square() * true[:, None]).sum())
        losses[k] = dropped / float(true[k:].sum())
    kept = bases[0].basis.shape[1] if method == "exact" else rank
    return {
        "p": p, "method": method, "tokens": tokens, "rank": kept, "seconds": seconds, "accumulate_s": accumulated,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "peak_gpu_gb": torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else 0.0,
        "basis_mb": 2 * p * kept * 2 / 2**20,  # two streams, fp16 (what a calibration stores)
        "loss": losses,
    }


def needed_gb(p: int, method: str, rank: int) -> float:
    """Rough peak of a fit: exact holds two p² fp64 covariances plus a decomposition's copy."""
    return (3 * p * p * 8 if method == "exact" else 2 * (3 * rank) * p * 4 * 2) / 2**30


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--features", default="3072,7168,10240,32768")
    parser.add_argument("--methods", default="exact,sketch")
    parser.add_argument("--tokens", type=int, default=48 * 1024)
    parser.add_argument("--rank", type=int, default=4096, help="the sketch's rank (kvtc calibrate's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--memory-gb", type=float, default=None, help="skip fits estimated above this")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per fit")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # "p,method": run one fit and print its JSON
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.one:
        p, method = args.one.split(",")
        print(json.dumps(fit_once(int(p), method, args.tokens, args.rank, args.device)))
        return 0
    if args.memory_gb is None:
        if args.device.startswith("cuda"):
            args.memory_gb = torch.cuda.get_device_properties(0).total_memory / 2**30 * 0.8
        else:
            import os

            args.memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 * 0.8
    machine = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else cpu_name()
    rows = []
    for p in (int(x) for x in args.features.split(",")):
        for method in args.methods.split(","):
            if method == "sketch" and args.rank >= p:
                continue
            if needed_gb(p, method, args.rank) > args.memory_gb:
                rows.append({"p": p, "method": method, "skipped": f"needs ~{needed_gb(p, method, args.rank):.0f} GB"})
                print(rows[-1], flush=True)
                continue
            command = [sys.executable, "-m", "benchmarks.fit_scaling", "--one", f"{p},{method}", "--tokens",
                       str(args.tokens), "--rank", str(args.rank), "--device", args.device]
            try:
                done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else
                            {"p": p, "method": method, "skipped": f"failed: {done.stderr.strip()[-200:]}"})
            except subprocess.TimeoutExpired:
                rows.append({"p": p, "method": method, "skipped": f"over {args.timeout} s"})
            print(rows[-1], flush=True)
    text = report(rows, machine, args)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


def report(rows: list[dict], machine: str, args: argparse.Namespace) -> str:
    lines = [f"# Calibration fit scaling ({machine}; device {args.device}; {args.tokens} tokens per stream; "
             f"sketch rank {args.rank})", "",
             "Synthetic features, eigenvalues ∝ i^-2 (Qwen2.5-Coder-0.5B's measured decay); two streams per fit. "
             "Loss at rank k: energy dropped by the fit's top-k basis / the least any rank-k basis drops.", "",
             "| p | shape | fit | rank kept | time s (accumulate) | peak RSS GB | peak GPU GB | fp16 bases MB (% of "
             "params' bf16 bytes) | loss at k |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        shape, params = SHAPES.get(r["p"], ("", 0.0))
        if "skipped" in r:
            lines.append(f"| {r['p']} | {shape} | {r['method']} | | not run: {r['skipped']} | | | | |")
            continue
        share = f" ({100 * r['basis_mb'] * 2**20 / (2 * params):.1f} %)" if params else ""
        loss = ", ".join(f"k={k}: {v:.3f}" for k, v in r["loss"].items())
        lines.append(f"| {r['p']} | {shape} | {r['method']} | {r['rank']} | {r['seconds']:.1f} "
                     f"({r['accumulate_s']:.1f}) | {r['peak_rss_gb']:.2f} | {r['peak_gpu_gb']:.2f} | "
                     f"{r['basis_mb']:.0f}{share} | {loss} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
