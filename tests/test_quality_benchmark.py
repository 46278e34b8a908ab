"""The quality benchmark at smoke scale on the real 0.5B model: what it measures and what it writes."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import quality, retrieval
from benchmarks.ablations import ablation_calibrations
from benchmarks.methods import SINKS, WINDOW
from calibration import texts


def test_passkey_prompts_plant_the_needle_inside_the_compressed_region(qwen05):
    _, tokenizer = qwen05
    trials = retrieval.trials(tokenizer, texts.python_docs(), 2048, (0.1, 0.5, 0.9), per_depth=2)
    assert len({t.key for t in trials}) == 6
    for trial in trials:
        assert len(trial.ids) == 2048
        start, end = trial.needle
        assert SINKS <= start < end <= 2048 - 1 - WINDOW
        assert tokenizer.decode(trial.ids[start:end]).count(trial.key) == 2
        assert tokenizer.decode(trial.ids[-12:]).endswith("The pass key is")


def test_multikey_prompts_ask_for_one_door_among_distinct_compressed_needles(qwen05):
    _, tokenizer = qwen05
    trials = retrieval.trials(tokenizer, texts.python_docs(), 2048, (0.1, 0.9), per_depth=2, keys=4)
    for trial in trials:
        assert len(trial.ids) == 2048 and len(trial.needles) == 4 and trial.needle == trial.needles[0]
        spans = sorted(trial.needles)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))
        assert SINKS <= spans[0][0] and spans[-1][1] <= 2048 - 1 - WINDOW
        assert abs(trial.needle[0] / 2048 - trial.depth) < 0.05
        door = tokenizer.decode(trial.ids[-24:]).split("What is the pass key of the ")[1].split(" door")[0]
        assert f"the {door} door is {trial.key}" in tokenizer.decode(trial.ids[slice(*trial.needle)])
        for span in trial.needles[1:]:
            distractor = tokenizer.decode(trial.ids[slice(*span)])
            assert trial.key not in distractor and f"the {door} door" not in distractor


def test_ablations_refit_the_reference_recipe(small_calibration_path, small_calibration):
    variants = ablation_calibrations(small_calibration_path)
    assert set(variants) == {"no RoPE removal", "per-layer PCA"}
    per_layer, rotated = variants["per-layer PCA"], variants["no RoPE removal"]
    for stream in ("keys", "values"):  # same text, contexts and features as the reference: same mean and energy
        reference, refit = small_calibration.streams[stream], per_layer.streams[stream]
        assert torch.allclose(refit.mean, reference.mean)
        assert torch.allclose(refit.eigenvalues.sum(), reference.eigenvalues.sum(), rtol=1e-6)
    layer_size = small_calibration.hidden
    for column in per_layer.streams["keys"].basis.T:
        assert (column.abs() > 0).reshape(small_calibration.layers, layer_size).any(dim=1).sum() == 1
    assert torch.count_nonzero(rotated.rope.inv_freq) == 0
    for cal in variants.values():
        for plan in cal.plans:
            assert plan.bits_per_token("keys") + plan.bits_per_token("values") <= 2 * 16 * cal.features // plan.ratio


def test_quality_benchmark_smoke_run_writes_comparable_results(small_calibration_path, tmp_path):
    out = tmp_path / "smoke"
    quality.main(["--calibration", str(small_calibration_path), "--contexts", "1", "--context", "640",
                  "--continuation", "48", "--ratios", "16", "--depths", "0.5", "--trials", "1", "--out", str(out)])
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {r["method"]: r for r in result["results"]}
    assert {"KVTC 16x", "lmcache fp8", "KIVI int2 (g32)", "per-token int2 (g32)", "KVTC per-layer PCA 16x",
            "KVTC no RoPE removal 16x", "KVTC per-layer PCA 8x"} <= set(rows)
    kvtc = rows["KVTC 16x"]
    assert kvtc["region_pre_entropy"] < kvtc["region_ratio"] and kvtc["region_ratio"] > 8
    assert all(kvtc["region_ratio"] > r["region_ratio"] for r in rows.values() if r["kind"] == "baseline")
    # Qwen's outlier key channels wreck per-token int2; KVTC's PCA absorbs them at 3× its ratio
    assert kvtc["kl"] < rows["per-token int2 (g32)"]["kl"]
    assert kvtc["rel_err_keys"] < rows["per-token int2 (g32)"]["rel_err_keys"]
    assert result["retrieval"]["accuracy"]["bf16"]["by_depth"] == {"0.5": 1.0}
    assert "| KVTC 16x |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_lmcache_path_benchmark_runs_every_method_through_its_path_and_reports_them(small_calibration_path, tmp_path):
    from benchmarks import lmcache_report

    out = tmp_path / "path-0.5b"
    lmcache_report.main(["--calibration", str(small_calibration_path), "--ratios", "16", "--contexts", "1",
                         "--prefix", "512", "--continuation", "32", "--keys", "2", "--depths", "0.5", "--trials", "1",
                         "--out", str(out)])
    report = json.loads((tmp_path / "path-0.5b.json").read_text())
    summary = {s["method"]: s for s in report["summary"]}
    assert {"LMCache fp8 serde", "kvtc ratio 16", "KIVI int4 (g32)", "KIVI int2 (g32)"} <= set(summary)
    assert any(s["kind"] == "baseline" and "turboquant" in s["method"].lower() for s in summary.values())
    kvtc = summary["kvtc ratio 16"]
    assert kvtc["contexts"] == 4  # one per text source: docs, prose, held-out code, mail
    per_source = {(s["source"], s["method"]) for s in report["per_source"]}
    assert {(src, "kvtc ratio 16") for src in ("python-docs", "kjv", "transformers-code", "mail")} <= per_source
    assert kvtc["stored_bytes_per_chunk"] == 2 * 24 * 256 * 128 * 2 // 16  # the fixed size is the budget
    assert kvtc["blob_bytes_per_chunk"] <= kvtc["stored_bytes_per_chunk"]
    assert kvtc["positions_right"] == "8/8"  # 4 sources x 2 chunks
    assert summary["LMCache fp8 serde"]["stored_ratio"] == pytest.approx(2.0, rel=0.01)
    assert kvtc["stored_ratio"] > 2.5 * summary["KIVI int2 (g32)"]["stored_ratio"] and 0 < kvtc["kl"] < 1
    assert set(report["retrieval"]["accuracy"]) >= {"bf16", "kvtc ratio 16", "LMCache fp8 serde"}
    markdown = (tmp_path / "path-0.5b.md").read_text()
    assert "| kvtc ratio 16 |" in markdown and "| transformers-code | kvtc ratio 16 |" in markdown
    assert "on every source (the worst decides)" in markdown
    assert (tmp_path / "path-0.5b.png").stat().st_size > 10_000
