"""Chunk base-position estimation on a real model's cache (the serde never sees positions)."""

from __future__ import annotations

import pytest
import torch
from prepared import text

from lmcache_kvtc import KVTCCodec
from lmcache_kvtc.lmcache.position import PositionEstimator


@pytest.fixture(scope="module")
def long_kv(qwen05):
    """A real 2048-token cache of held-out text (KJV; the calibration saw other prose)."""
    from calibration import texts
    from lmcache_kvtc.calibrate.capture import prefill

    model, tokenizer = qwen05
    ids = texts.token_contexts(tokenizer, text("kjv"), 1, 2048, seed=5)[0]
    kv, _ = prefill(model, ids, logits_to_keep=1)
    return kv


@pytest.mark.parametrize("max_position", [32768, 131072, 1 << 20])
def test_every_chunk_position_is_found_among_many_candidates(long_kv, small_calibration, max_position):
    keys = small_calibration.streams["keys"]
    estimator = PositionEstimator(small_calibration.rope, keys.mean, small_calibration.kv_heads, max_position)
    found = [estimator.estimate(long_kv[0, :, s : s + 256], 256) for s in range(0, 2048, 256)]
    assert [f.start for f in found] == list(range(0, 2048, 256))
    assert found[0].candidates == max_position // 256


def test_the_search_depends_on_the_data_not_on_luck(long_kv, small_calibration):
    keys = small_calibration.streams["keys"]
    estimator = PositionEstimator(small_calibration.rope, keys.mean, small_calibration.kv_heads, 131072)
    chunk = long_kv[0, :, 512:768]
    scores = estimator.scores(chunk, 256)
    assert int(scores.argmax()) == 2
    # re-rotating the same keys by 1024 more positions moves the estimate by exactly 1024
    rope = small_calibration.rope
    shifted = rope.rotate(rope.unrotate(chunk, torch.arange(512, 768), chunk.dtype), torch.arange(1536, 1792),
                          chunk.dtype).to(chunk.dtype)
    assert estimator.estimate(shifted, 256).start == 1536


def test_a_wrong_estimate_costs_quality_never_correctness(long_kv, small_calibration):
    codec, plan = KVTCCodec(small_calibration), small_calibration.plan_index(16)
    chunk = long_kv[:, :, 1024:1280].contiguous()

    def error(start):
        restored = codec.decode(codec.encode(chunk, plan=plan, start=start, sinks=4, window=0))
        assert restored.shape == chunk.shape and torch.isfinite(restored.float()).all()
        return float((restored.float() - chunk.float()).norm() / chunk.float().norm())

    right, wrong = error(1024), error(1024 + 256 * 37)
    assert right < wrong < 1.0
