"""The model families users bring, on tiny random models built offline (:mod:`tiny_models`): each supported family's
RoPE is removed exactly, ``kvtc calibrate`` runs on its model directory, its cache round-trips within the plan's
error through the codec and through the serde in both of vLLM's layouts; each refused family is refused before a
byte is written, with one line naming the reason."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from lmcache_helpers import roundtrip, standalone
from tiny_models import REFUSED, SUPPORTED, build, save

from calibration import texts
from lmcache_kvtc import Calibration, CalibrationError, KVTCCodec
from lmcache_kvtc.calibrate.architecture import check_architecture, rope_error, verified_rope_table
from lmcache_kvtc.calibrate.capture import prefill, prefill_with_prerope_keys
from lmcache_kvtc.cli import main as kvtc
from lmcache_kvtc.defaults import SINKS, WINDOW
from lmcache_kvtc.lmcache import layouts
from lmcache_kvtc.lmcache.serde import KVTCEngine, SerdeOptions

INTERLEAVED = {"cohere", "glm"}


@pytest.fixture(scope="module", params=list(SUPPORTED), ids=[t for t, _, _ in SUPPORTED.values()])
def family(request, tokenizer, text_file, tmp_path_factory):
    """``(model, calibration path, held-out token ids)`` of one family, calibrated with the ``kvtc`` command."""
    model_type, overrides, _ = SUPPORTED[request.param]
    model = build(model_type, overrides, len(tokenizer))
    directory = save(model, tokenizer, tmp_path_factory.mktemp(model_type) / "model")
    out = directory.parent / f"{model_type}.safetensors"
    assert kvtc(["calibrate", "--model", str(directory), "--text", str(text_file), "--tokens", "3072",
                 "--context", "512", "--ratios", "8", "16", "--key-weight", "equal", "--normalize", "none",
                 "--out", str(out)]) == 0
    ids = texts.token_contexts(tokenizer, texts.python_docs(), 1, 768, seed=5)[0]
    return model, out, ids


def test_rope_removal_is_exact_and_the_convention_is_derived(family):
    model, _, ids = family
    rope = verified_rope_table(model, ids[:300])
    assert rope.interleaved == (model.config.model_type in INTERLEAVED)
    kv, prerope = prefill_with_prerope_keys(model, ids[:300])
    assert rope_error(rope, kv[0], prerope) <= 1.0
    assert rope_error(dataclasses.replace(rope, interleaved=not rope.interleaved), kv[0], prerope) > 50
    rerotated = rope.rotate(rope.unrotate(kv[0], torch.arange(300), kv.dtype), torch.arange(300), kv.dtype)
    assert (rerotated.to(kv.dtype) == kv[0]).float().mean() > 0.99


def test_calibration_describes_the_model_and_codes_within_the_plans_error(family):
    model, path, ids = family
    calibration = Calibration.load(path)
    assert calibration.rope.interleaved == (model.config.model_type in INTERLEAVED)
    kv, _ = prefill(model, ids, logits_to_keep=1)
    assert (calibration.layers, calibration.hidden) == (kv.shape[1], kv.shape[3])
    codec = KVTCCodec(calibration)
    middle = slice(SINKS, kv.shape[2] - WINDOW)
    for ratio in (8, 16):
        plan = calibration.plan_index(ratio)
        decoded = codec.decode(codec.encode(kv, plan=plan))
        assert torch.equal(decoded[:, :, :SINKS], kv[:, :, :SINKS]) and torch.equal(decoded[:, :, middle.stop:],
                                                                                       kv[:, :, middle.stop:])
        for stream, index in (("keys", 0), ("values", 1)):
            exact, coded = kv[index, :, middle].float(), decoded[index, :, middle].float()
            error = float((coded - exact).square().sum() / exact.square().sum())
            expected = calibration.plans[plan].expected_error[stream]
            assert error <= 2 * expected + 1e-3, (ratio, stream, error, expected)  # held-out text of another source


@pytest.mark.parametrize("layout", [layouts.SPLIT, layouts.FUSED])
def test_the_serde_codes_both_vllm_layouts_of_the_family(family, layout):
    model, path, ids = family
    calibration = Calibration.load(path)
    kv, _ = prefill(model, ids[:512], logits_to_keep=1)
    events = []
    # 8x: a tiny model's chunk is small, so 16x plans' worst-case size (what 0.5.6's fixed-size slots reserve)
    # is only ~8.5x its bf16 bytes
    engine = KVTCEngine(SerdeOptions(calibration=str(path), ratio=8), observer=events.append)
    for start in (0, 256):
        chunk = kv[:, :, start:start + 256].contiguous()
        group = layouts.GroupLayout(layout, chunk.shape[1], 256, chunk.shape[3], chunk.dtype)
        obj = layouts.from_split(chunk, group, calibration.head_dim).contiguous()
        written, _, (restored,) = roundtrip(engine, [obj])
        assert 0 < written <= obj.numel() * obj.element_size() / 8
        expected = standalone(calibration, chunk, events[-1].start, ratio=8)  # the codec at the serde's position
        assert torch.equal(layouts.to_split(restored, group, calibration.head_dim), expected)


@pytest.mark.parametrize("family_name", list(REFUSED))
def test_unsupported_families_are_refused_before_anything_is_written(family_name, tokenizer, text_file, tmp_path):
    model_type, overrides, reason = REFUSED[family_name]
    model = build(model_type, overrides, len(tokenizer))
    with pytest.raises(CalibrationError, match=reason) as refused:
        check_architecture(model.config)
    assert "\n" not in str(refused.value)
    directory = save(model, tokenizer, tmp_path / "model")
    out = tmp_path / "refused.safetensors"
    with pytest.raises(CalibrationError, match=reason):
        kvtc(["calibrate", "--model", str(directory), "--text", str(text_file), "--tokens", "2048", "--context",
              "512", "--key-weight", "equal", "--normalize", "none", "--out", str(out)])
    assert not out.exists() and not out.with_suffix(".report").exists()
