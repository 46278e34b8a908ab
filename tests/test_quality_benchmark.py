"""The quality benchmark at smoke scale on the real 0.5B model: what it measures and what it writes."""

from __future__ import annotations

import json

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
    assert set(variants) == {"no RoPE removal", "per-layer PCA", "greedy allocation"}
    greedy, per_layer, rotated = variants["greedy allocation"], variants["per-layer PCA"], variants["no RoPE removal"]
    for stream in ("keys", "values"):  # same text, contexts and features as the reference: the same PCA
        reference, refit = small_calibration.streams[stream], greedy.streams[stream]
        rank = min(reference.basis.shape[1], refit.basis.shape[1])
        assert torch.allclose(refit.eigenvalues, reference.eigenvalues, rtol=1e-6)
        assert torch.allclose(refit.basis[:, :rank].abs(), reference.basis[:, :rank].abs(), atol=1e-4)
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
            "KVTC no RoPE removal 16x", "KVTC greedy allocation 8x"} <= set(rows)
    kvtc = rows["KVTC 16x"]
    assert 12 < kvtc["region_pre_entropy"] <= kvtc["region_ratio"]
    assert all(kvtc["region_ratio"] > r["region_ratio"] for r in rows.values() if r["kind"] == "baseline")
    # Qwen's outlier key channels wreck per-token int2; KVTC's PCA absorbs them at 3× its ratio
    assert kvtc["kl"] < rows["per-token int2 (g32)"]["kl"]
    assert kvtc["rel_err_keys"] < rows["per-token int2 (g32)"]["rel_err_keys"]
    assert result["retrieval"]["accuracy"]["bf16"]["by_depth"] == {"0.5": 1.0}
    assert "| KVTC 16x |" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").stat().st_size > 10_000
