"""Rate control: a byte budget is a contract -- the finest plan that fits, never a byte over."""

from __future__ import annotations

import pytest
import torch

from lmcache_kvtc import KVTCCodec, LayoutError
from lmcache_kvtc import blob as wire


def _case(kv: torch.Tensor, seed: int) -> tuple[torch.Tensor, int, int]:
    """A chunk of random length and position from a real cache (rescaled, or replaced by noise), a budget."""
    g = torch.Generator().manual_seed(seed)
    tokens = int(torch.randint(1, 385, (1,), generator=g))
    start = int(torch.randint(0, kv.shape[2] - tokens + 1, (1,), generator=g))
    chunk = kv[:, :, start : start + tokens].float() * float(torch.empty(1).uniform_(0.5, 2.0, generator=g))
    if seed % 4 == 3:
        chunk = torch.randn(chunk.shape, generator=g) * chunk.std()
    raw = chunk.numel() * 2
    budget = int(raw / float(torch.empty(1).uniform_(5.0, 40.0, generator=g)))
    return chunk.to(kv.dtype).contiguous(), start, budget


@pytest.mark.parametrize("seed", range(12))
def test_a_rate_controlled_blob_never_exceeds_its_budget_and_takes_the_finest_plan_that_fits(
    small_calibration, eval_kv, seed
):
    chunk, start, budget = _case(eval_kv[0], seed)
    cal = small_calibration
    codec = KVTCCodec(cal)
    by_plan = {p: codec.encode(chunk, plan=p, start=start, window=0) for p in range(len(cal.plans))}
    finest_first = sorted(by_plan, key=lambda p: cal.plans[p].ratio)
    try:
        blob = codec.encode_within(chunk, budget=budget, start=start, window=0)
    except LayoutError:
        assert len(by_plan[finest_first[-1]]) > budget, "refused although the coarsest plan fits"
        return
    assert len(blob) <= budget
    plan = wire.parse(blob)[0].plan
    assert blob == by_plan[plan], "the chosen plan codes exactly as the codec at that plan does"
    finer = finest_first[: finest_first.index(plan)]
    if finer:
        assert len(by_plan[finer[-1]]) > budget, "a finer plan would have fit"
    assert codec.decode(blob).shape == chunk.shape


def test_a_budget_no_plan_can_meet_and_a_plan_the_ladder_lacks_are_refused(small_calibration, eval_kv):
    codec = KVTCCodec(small_calibration)
    chunk = eval_kv[0][:, :, 256:512].contiguous()
    with pytest.raises(LayoutError, match="no plan of the calibration fits"):
        codec.encode_within(chunk, budget=2000, start=256, window=0)
    for plan in (len(small_calibration.plans), -1, 1.0, True, "16"):
        with pytest.raises(LayoutError, match="plan must be an index"):
            codec.encode(chunk, plan=plan)
    index = small_calibration.plan_index(16)
    assert codec.encode(chunk, plan=torch.tensor(index)) == codec.encode(chunk, plan=index)  # any int type


def test_an_object_too_small_for_its_ratio_gets_its_coarsest_plans_typical_size_and_gives_up_exact_sinks(
        small_calibration_path, eval_kv):
    from lmcache_kvtc.lmcache.engine import KVTCEngine
    from lmcache_kvtc.lmcache.options import SerdeOptions

    engine = KVTCEngine(SerdeOptions(calibration=str(small_calibration_path), ratio=64))  # coarsest plan: 32×
    first = eval_kv[0][:, :, :256].contiguous()  # at 64× its 4 exact sinks alone would take 1/64 of bf16
    (budget,) = engine.budgets([first.shape], [first.dtype])
    assert first.numel() * 2 // 64 < budget < first.numel() * 2 // 16  # the floor, not the ratio's share
    blob = engine.encode([first], key=None)
    assert len(blob) <= budget and wire.parse(blob)[0].exact_head == 0
    tiny = eval_kv[0][:, :, 300:303].contiguous()
    (budget,) = engine.budgets([tiny.shape], [tiny.dtype])
    assert len(engine.encode([tiny], key=None)) <= budget
    refused = 0
    for scale in (1, 4, 64):  # noise far from the calibration fits or is refused; never over budget
        noise = (torch.randn(tiny.shape, generator=torch.Generator().manual_seed(5)) * scale).to(tiny.dtype)
        try:
            assert len(engine.encode([noise], key=None)) <= budget
        except LayoutError:
            refused += 1
    assert refused, "noise 64× the KV's scale cannot fit the coarsest plan's typical size"
