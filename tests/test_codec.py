"""decode(encode(kv)) on real caches: exact where promised, within the plan's error elsewhere."""

from __future__ import annotations

import pytest
import torch

from lmcache_kvtc import KVTCCodec
from lmcache_kvtc.inspect import describe


def _relative_squared_error(reference: torch.Tensor, test: torch.Tensor) -> float:
    return float((test.float() - reference.float()).square().sum() / reference.float().square().sum())


@pytest.mark.parametrize("ratio", [8, 16, 32])
def test_roundtrip_is_exact_on_sinks_and_window_and_within_plan_error_elsewhere(small_calibration, eval_kv, ratio):
    kv, _ = eval_kv
    codec = KVTCCodec(small_calibration)
    out = codec.decode(codec.encode(kv, plan=small_calibration.plan_index(ratio), start=0, sinks=4, window=128))
    assert out.shape == kv.shape and out.dtype == kv.dtype
    assert torch.equal(out[:, :, :4], kv[:, :, :4])
    assert torch.equal(out[:, :, -128:], kv[:, :, -128:])
    plan = small_calibration.plans[small_calibration.plan_index(ratio)]
    middle = slice(4, kv.shape[2] - 128)
    for i, stream in enumerate(("keys", "values")):
        measured = _relative_squared_error(kv[i, :, middle], out[i, :, middle])
        # held-out text from another source than calibration: allow some distribution shift
        assert measured < 3 * plan.expected_error[stream] + 1e-4, (stream, measured, plan.expected_error[stream])
        assert measured > 0  # the middle really was compressed


def test_higher_ratio_means_smaller_blob_and_larger_error(small_calibration, eval_kv):
    kv, _ = eval_kv
    sizes, errors = [], []
    codec = KVTCCodec(small_calibration)
    for plan, ratio in enumerate(small_calibration.ratios):
        blob = codec.encode(kv, plan=plan)
        sizes.append(len(blob))
        errors.append(_relative_squared_error(kv[1], codec.decode(blob)[1]))
        info = describe(blob)
        # the plan's ratio is what it coded to on held-out calibration text; DEFLATE is where it is won
        assert ratio / 2 < info["ratio"]["region"] < ratio * 2
        assert info["ratio"]["region_pre_entropy"] < info["ratio"]["region"] / 2
    assert sizes == sorted(sizes, reverse=True)
    assert errors == sorted(errors)


def test_start_offset_without_sinks_and_zero_window(small_calibration, eval_kv):
    kv, _ = eval_kv
    chunk = kv[:, :, 256:512].contiguous()
    codec, plan = KVTCCodec(small_calibration), small_calibration.plan_index(16)
    blob = codec.encode(chunk, plan=plan, start=256, window=0)
    info = describe(blob)
    assert info["exact_tokens"] == {"head": 0, "tail": 0} and info["start"] == 256
    out = codec.decode(blob)
    assert _relative_squared_error(chunk[0], out[0]) < 0.05
    # decoding at the wrong position would rotate keys wrongly: the stored start is what makes keys right
    shifted = codec.encode(chunk, plan=plan, start=0, sinks=0, window=0)
    assert _relative_squared_error(chunk[0], codec.decode(shifted)[0]) > _relative_squared_error(chunk[0], out[0])


def test_short_sequences_are_stored_exactly(small_calibration, eval_kv):
    kv, _ = eval_kv
    codec = KVTCCodec(small_calibration)
    for tokens in (1, 4, 100, 132):
        part = kv[:, :, :tokens].contiguous()
        assert torch.equal(codec.decode(codec.encode(part, plan=0)), part)


def test_fp16_caches_roundtrip_in_fp16(small_calibration, eval_kv):
    kv = eval_kv[0].to(torch.float16)
    codec = KVTCCodec(small_calibration)
    out = codec.decode(codec.encode(kv, plan=small_calibration.plan_index(16)))
    assert out.dtype == torch.float16
    assert torch.equal(out[:, :, -128:], kv[:, :, -128:])
    assert _relative_squared_error(kv[1, :, 4:-128], out[1, :, 4:-128]) < 0.2


def test_decode_needs_no_plan_and_reads_every_plan_of_its_calibration(small_calibration, eval_kv):
    kv, _ = eval_kv
    encoder = KVTCCodec(small_calibration)
    for plan in range(len(small_calibration.plans)):
        blob = encoder.encode(kv, plan=plan)
        assert describe(blob)["plan"] == plan
        assert torch.equal(KVTCCodec(small_calibration).decode(blob), encoder.decode(blob))


def test_max_blob_size_bounds_every_blob_even_incompressible_ones(small_calibration, eval_kv):
    kv, _ = eval_kv
    codec, plan = KVTCCodec(small_calibration), small_calibration.plan_index(16)
    noise = (torch.rand(kv.shape, generator=torch.Generator().manual_seed(0)) * 8 - 4).to(kv.dtype)
    for tensor in (kv, noise):
        for start, window in ((0, 128), (256, 0)):
            blob = codec.encode(tensor, plan=plan, start=start, window=window)
            info = describe(blob)
            head, tail = info["exact_tokens"]["head"], info["exact_tokens"]["tail"]
            assert len(blob) <= codec.max_blob_size(kv.shape[2], plan, exact_head=head, exact_tail=tail)
