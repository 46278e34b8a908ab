"""Calibration report: eigen-spectra and expected rate–distortion per plan vs the theoretical limit."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from ..calibration import STREAMS, Calibration  # noqa: E402


def water_filling(eigenvalues: torch.Tensor, energy: float, points: int = 60) -> tuple[list[float], list[float]]:
    """Reverse water-filling limit for Gaussian components: (ratio vs 16-bit, relative squared error).

    D(θ) = Σ min(θ, λ), R(θ) = Σ max(0, ½·log2(λ/θ)) bits per token.
    """
    lam = eigenvalues.double().clamp(min=1e-30)
    ratios, errors = [], []
    for theta in torch.logspace(float(lam.max().log10()), float(lam.max().log10()) - 8, points, dtype=torch.float64):
        rate = (0.5 * torch.log2(lam / theta)).clamp(min=0).sum()
        if rate <= 0:
            continue
        ratios.append(float(16 * len(lam) / rate))
        errors.append(float(torch.minimum(lam, theta).sum() / energy))
    return ratios, errors


def water_filling_bits(eigenvalues: torch.Tensor, energy: float, rel_error: float) -> float:
    """Bits per token the reverse water-filling limit needs for ``rel_error`` (relative squared error)."""
    lam = eigenvalues.double().clamp(min=1e-30)
    low, high = float(lam.min().log()) - 40, float(lam.max().log())
    for _ in range(100):  # bisection on log θ: D(θ) grows with θ
        mid = (low + high) / 2
        if float(torch.minimum(lam, torch.tensor(mid).exp()).sum()) < rel_error * energy:
            low = mid
        else:
            high = mid
    return float((0.5 * torch.log2(lam / torch.tensor(low).exp())).clamp(min=0).sum())


def write_report(calibration: Calibration, directory: str | Path) -> Path:
    """Write ``report.md``, ``spectrum.png`` and ``rate_distortion.png`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    energy = calibration.info.get("heldout_energy", {})

    fig, ax = plt.subplots(figsize=(6, 4))
    for s in STREAMS:
        lam = calibration.streams[s].eigenvalues
        ax.loglog(torch.arange(1, len(lam) + 1), (lam / lam.sum()).clamp(min=1e-12), label=s)
    ax.set(xlabel="principal component", ylabel="share of variance", title=f"{calibration.model_id}: eigen-spectrum")
    ax.legend()
    fig.tight_layout()
    fig.savefig(directory / "spectrum.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for s, color in zip(STREAMS, ("tab:blue", "tab:orange"), strict=True):
        ratios = [16 * calibration.features / p.bits_per_token(s) for p in calibration.plans]
        ax.loglog(ratios, [p.expected_error[s] for p in calibration.plans], "o-", color=color,
                  label=f"{s}: plans (held-out, entropy-coded)")
        if s in energy:
            ratios, errors = water_filling(calibration.streams[s].eigenvalues, energy[s])
            ax.loglog(ratios, errors, "--", color=color, alpha=0.6, label=f"{s}: reverse water-filling limit")
    ax.set(xlabel="compression ratio vs 16-bit", ylabel="relative squared error",
           title=f"{calibration.model_id}: expected rate–distortion")
    ax.set_xlim(2, 100)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(directory / "rate_distortion.png", dpi=120)
    plt.close(fig)

    def limit(p, s: str) -> str:
        if s not in energy:
            return "–"
        return f"{water_filling_bits(calibration.streams[s].eigenvalues, energy[s], p.expected_error[s]):.0f}"

    rows = [
        f"| {p.ratio:g}× | {p.streams['keys'].step:.3g} / {p.streams['values'].step:.3g} | "
        f"{p.bits_per_token('keys'):.0f} / {p.bits_per_token('values'):.0f} | "
        f"{limit(p, 'keys')} / {limit(p, 'values')} | {p.rank('keys')} / {p.rank('values')} | "
        f"{p.expected_error['keys']:.2e} / {p.expected_error['values']:.2e} |"
        for p in calibration.plans
    ]
    text = "\n".join([
        f"# KVTC calibration report: {calibration.model_id}",
        "",
        f"fingerprint `{calibration.fingerprint.hex()}`, p = {calibration.features} features per stream "
        f"({calibration.layers} layers × {calibration.kv_heads} KV heads × {calibration.head_dim})",
        "",
        "```json",
        json.dumps(calibration.info, indent=2),
        "```",
        "",
        "| plan | step K / V | coded bits/token K / V | water-filling limit at that error K / V | rank K / V "
        "| expected rel. sq. error K / V (held-out) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        "![spectrum](spectrum.png) ![rate-distortion](rate_distortion.png)",
        "",
    ])
    (directory / "report.md").write_text(text)
    return directory / "report.md"
