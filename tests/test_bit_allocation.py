"""The DP bit allocation: within budget, and better than greedy on held-out data."""

from __future__ import annotations

import torch

from calibration import texts
from calibration.calibrate import _features
from calibration.kv_capture import prefill
from lmcache_kvtc.bit_allocation import Block, allocate, greedy_allocate, measure_errors, plan_error
from lmcache_kvtc.quantizer import squared_error


def test_dp_plans_fit_their_budget_and_cover_every_component(rng):
    projections = torch.randn(512, 256, generator=rng) * torch.logspace(1, -3, 256).sqrt()
    table = measure_errors(projections)
    budgets = [64, 256, 1024, 2048]
    for budget, covering in zip(budgets, allocate(table, budgets), strict=True):
        assert sum(block.cost for block in covering) <= budget
        position = 0
        for block in covering:
            assert block.start == position
            position += block.size
        assert position == table.rank


def test_dp_error_prediction_equals_the_quantizer_error(rng):
    projections = torch.randn(300, 128, generator=rng) * torch.logspace(1, -2, 128).sqrt()
    table = measure_errors(projections)
    (covering,) = allocate(table, [600])
    measured = sum(
        float(squared_error(projections[:, b.start : b.start + b.size].unsqueeze(1), b.bits).sum()) for b in covering
    ) / len(projections)
    assert abs(measured - plan_error(table, covering)) <= 1e-6 * measured


def _real_projections(model, tokenizer, calibration, seed: int) -> torch.Tensor:
    ids = texts.token_contexts(tokenizer, texts.python_docs(), 1, 1024, seed=seed)[0]
    values = _features(prefill(model, ids, logits_to_keep=1)[0], calibration.rope)[1]
    full_basis = calibration.streams["values"].basis
    return (values - calibration.streams["values"].mean) @ full_basis


def test_dp_beats_greedy_on_held_out_real_values(qwen05, small_calibration):
    model, tokenizer = qwen05
    fit = measure_errors(_real_projections(model, tokenizer, small_calibration, seed=11))
    heldout = measure_errors(_real_projections(model, tokenizer, small_calibration, seed=12))
    p = small_calibration.features
    wins = 0
    for ratio in (8, 16, 32):
        budget = 16 * p // ratio
        (dp,) = allocate(fit, [budget])
        greedy = greedy_allocate(fit, budget)
        assert sum(b.cost for b in greedy) <= budget
        dp_error, greedy_error = plan_error(heldout, dp), plan_error(heldout, greedy)
        assert dp_error <= greedy_error * 1.02  # never meaningfully worse on unseen tokens
        wins += dp_error < greedy_error
    assert wins >= 2


def test_block_cost_counts_fp16_shift_and_scale():
    assert Block(0, 64, 4).cost == 64 * 4 + 32
    assert Block(0, 1024, 0).cost == 0
