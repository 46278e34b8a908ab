"""The quality benchmark's markdown table and rate–distortion plots."""

from __future__ import annotations

from pathlib import Path

THRESHOLDS = (("kl", 0.02), ("kl", 0.05), ("delta_nll", 0.05))


def largest_ratio_within(rows: list[dict], key: str, limit: float) -> dict | None:
    """The KVTC ladder rung of highest region ratio whose mean ``key`` is ≤ ``limit``."""
    inside = [r for r in rows if r["kind"] == "kvtc" and r[key] <= limit]
    return max(inside, key=lambda r: r["region_ratio"], default=None)


def markdown(result: dict) -> str:
    rows = result["results"]
    lines = [
        f"## {result['model']}: {result['contexts']} contexts × {result['context_tokens']} tokens, "
        f"next {result['continuation_tokens']} tokens teacher-forced ({result['date']})",
        "",
        f"`{result.get('command', '')}`",
        "",
        f"Calibration: {result['calibration_source']} (K/V split key_weight={result['calibration_key_weight']}, "
        f"normalize={result.get('calibration_normalize', 'none')}); "
        f"evaluation: {result['eval_text']}. {result['exact_tokens']['sinks']} sink + "
        f"{result['exact_tokens']['window']} recent tokens exact for every method. Region ratio = bf16 bytes of the "
        "compressed tokens / bytes stored for them (KVTC: blob minus exact tokens, header included; pre-entropy = "
        "before DEFLATE); overall = whole cache incl. exact tokens. Mean ± std over contexts.",
        "",
    ]
    for key, limit in THRESHOLDS:
        best = largest_ratio_within(rows, key, limit)
        found = f"{best['method']} at {best['region_ratio']:.1f}× ({key} {best[key]:.4f})" if best else "none"
        lines.append(f"- largest KVTC ratio with {'KL' if key == 'kl' else 'ΔNLL'} ≤ {limit}: {found}")
    lines += [
        "",
        "| method | region ratio | (pre-entropy) | overall | ΔNLL (nats/token) | KL (nats/token) | top-1 "
        "| rel. sq. error K / V |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pre = f"{r['region_pre_entropy']:.1f}×" if "region_pre_entropy" in r else "—"
        lines.append(
            f"| {r['method']} | {r['region_ratio']:.1f}× | {pre} | {r['overall_ratio']:.1f}× | "
            f"{r['delta_nll']:+.4f} ± {r['delta_nll_std']:.4f} | {r['kl']:.4f} ± {r['kl_std']:.4f} | "
            f"{r['top1']:.3f} | {r['rel_err_keys']:.4f} / {r['rel_err_values']:.4f} |"
        )
    if "retrieval" in result:
        lines += _retrieval_table(result)
    return "\n".join(lines) + "\n"


def _retrieval_table(result: dict) -> list[str]:
    info = result["retrieval"]
    ratios = {r["method"]: r["region_ratio"] for r in result["results"]}
    depths = [f"{d:g}" for d in info["depths"]]
    lines = [
        "",
        f"### Passkey retrieval: {len(depths)} depths × {info['trials_per_depth']} prompts of "
        f"{result['context_tokens']} tokens{_keys(info.get('keys', 1))} (needles in the compressed region, "
        "greedy answer)",
        "",
        "| method | region ratio | accuracy | " + " | ".join(f"depth {d}" for d in depths) + " |",
        "|---|---|---|" + "---|" * len(depths),
    ]
    for name, acc in sorted(info["accuracy"].items(), key=lambda item: ratios.get(item[0], 1.0)):
        ratio = f"{ratios[name]:.1f}×" if name in ratios else "1× (bf16)"
        lines.append(f"| {name} | {ratio} | {acc['accuracy']:.2f} | "
                     + " | ".join(f"{acc['by_depth'][d]:.2f}" for d in depths) + " |")
    return lines


def _keys(keys: int) -> str:
    return "" if keys == 1 else f", {keys} keys per prompt (one asked for, {keys - 1} distractors)"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    rows = result["results"]
    colors = {name: f"C{i}" for i, name in enumerate(dict.fromkeys(_label(r) for r in rows if r["kind"] != "kvtc"))}
    colors["KVTC (ladder)"] = "black"
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    (ax_kl, ax_nll), (ax_err, ax_ret) = axes
    _series(ax_kl, rows, "kl", colors)
    ax_kl.set(yscale="log", ylabel="KL (nats/token)")
    _series(ax_nll, rows, "delta_nll", colors)
    ax_nll.set_yscale("symlog", linthresh=1e-3)
    ax_nll.set(ylabel="ΔNLL (nats/token, symlog: can be < 0)")
    for stream, style in (("keys", "-"), ("values", "--")):
        kvtc = [r for r in rows if r["kind"] == "kvtc"]
        marker = "o" if stream == "keys" else "^"
        ax_err.plot([r["region_ratio"] for r in kvtc], [r[f"rel_err_{stream}"] for r in kvtc], marker + style,
                    color="black", label=f"KVTC {stream} (measured)")
        limit = result.get("water_filling", {}).get(stream)
        if limit:
            ax_err.plot(limit["ratio"], limit["rel_err"], style, color="tab:green", alpha=0.7,
                        label=f"{stream}: reverse water-filling limit (calibration spectrum)")
        for r in rows:
            if r["kind"] == "baseline":
                ax_err.plot(r["region_ratio"], r[f"rel_err_{stream}"], marker, color=colors[r["method"]])
    ax_err.set(yscale="log", ylabel="relative squared error (● keys, ▲ values)")
    if "retrieval" in result:
        accuracy = result["retrieval"]["accuracy"]
        kvtc = [r for r in rows if r["kind"] == "kvtc" and r["method"] in accuracy]
        ax_ret.plot([r["region_ratio"] for r in kvtc], [accuracy[r["method"]]["accuracy"] for r in kvtc], "o-",
                    label="KVTC (ladder)", color="black")
        for r in rows:
            if r["kind"] == "baseline" and r["method"] in accuracy:
                ax_ret.plot(r["region_ratio"], accuracy[r["method"]]["accuracy"], "s", label=r["method"],
                            color=colors[r["method"]])
        ax_ret.axhline(accuracy["bf16"]["accuracy"], color="gray", ls=":", label="bf16 (uncompressed)")
        keys = result["retrieval"].get("keys", 1)
        ax_ret.set(ylabel="passkey accuracy" + ("" if keys == 1 else f" ({keys} keys)"), ylim=(-0.05, 1.05))
        ax_ret.legend(fontsize=7)
    for ax in axes.flat:
        ax.set(xscale="log", xlabel="compression ratio of the compressed region (vs bf16)", xlim=(1.5, 100))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="both", alpha=0.3)
    ax_kl.legend(fontsize=7)
    ax_err.legend(fontsize=7)
    fig.suptitle(f"{result['model']}: {result['contexts']} × {result['context_tokens']}-token contexts, "
                 f"{result['continuation_tokens']} continuation tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _label(row: dict) -> str:
    """The plot series a row belongs to: the ladder, one ablation, or one baseline."""
    if row["kind"] == "kvtc":
        return "KVTC (ladder)"
    return row["method"].rsplit(" ", 1)[0] if row["kind"] == "ablation" else row["method"]


def _series(ax, rows: list[dict], key: str, colors: dict[str, str]) -> None:
    """KVTC ladder and each ablation as lines, baselines as single points."""
    series: dict[str, list[dict]] = {}
    for r in rows:
        series.setdefault(_label(r), []).append(r)
    for label, members in series.items():
        style = {"kvtc": "o-", "ablation": "x--", "baseline": "s"}[members[0]["kind"]]
        ax.plot([r["region_ratio"] for r in members], [r[key] for r in members], style, label=label,
                color=colors[label])
