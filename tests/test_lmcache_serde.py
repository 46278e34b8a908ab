"""The kvtc serde on its own: options, registration, fixed size, layouts, refusals (real calibration, real KV)."""

from __future__ import annotations

import dataclasses
import gc
import json
import re
import struct
import subprocess
import sys
import weakref

import pytest
import torch
from lmcache.v1.distributed.api import MemoryLayoutDesc
from lmcache.v1.distributed.serde import SerdeConfig, create_serde_processor, get_registered_serde_types
from lmcache_helpers import KEY, byte_buffer, memory_obj, roundtrip, standalone

from lmcache_kvtc import CalibrationError, CodecError
from lmcache_kvtc import blob as wire
from lmcache_kvtc.inspect import describe
from lmcache_kvtc.lmcache import layouts
from lmcache_kvtc.lmcache.selection import CalibrationSet, decode_kv_rank
from lmcache_kvtc.lmcache.serde import (
    KVTCDeserializer,
    KVTCEngine,
    KVTCSerializer,
    SerdeOptions,
    make_serde,
    register,
)
from lmcache_kvtc.lmcache.stats import SerdeStats


@pytest.fixture(scope="module")
def engine(small_calibration_path):
    return KVTCEngine(SerdeOptions(calibration=str(small_calibration_path), ratio=16))


@pytest.fixture(scope="module")
def chunks(eval_kv):
    kv, _ = eval_kv
    return [kv[:, :, i : i + 256].contiguous() for i in (0, 256)]



def test_a_closed_serde_lets_go_of_its_calibrations_while_lmcache_still_holds_the_processor(small_calibration_path):
    processor = make_serde({"calibration": str(small_calibration_path)})  # kept, as 0.5.6 keeps closed ones
    engine = weakref.ref(processor._serializer.engine)
    calibrations = [weakref.ref(c) for c in engine().calibrations.all()]
    processor.close()
    gc.collect()
    assert engine() is None and all(c() is None for c in calibrations)

def test_register_is_idempotent_and_a_second_import_does_not_raise():
    register()
    register()
    assert get_registered_serde_types().count("kvtc") == 1
    code = "import lmcache_kvtc.lmcache, importlib, lmcache_kvtc.lmcache.loader as l; importlib.reload(l); print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().endswith("ok")


def test_options_come_from_the_adapter_json_and_are_validated(small_calibration_path):
    path = str(small_calibration_path)
    options = SerdeOptions.from_kwargs({"calibration": path, "ratio": 32, "fixed_size": False, "max_workers": 2})
    assert (options.ratio, options.fixed_size, options.max_workers, options.device) == (32.0, False, 2, "cpu")
    for bad in ({}, {"calibration": path, "ratioo": 16}, {"calibration": path, "fixed_size": "yes"},
                {"calibration": path, "max_workers": 0}, {"calibration": path, "max_workers": True},
                {"calibration": path, "ratio": 0.5}, {"calibration": path, "ratio": float("nan")}):
        with pytest.raises(ValueError):
            SerdeOptions.from_kwargs(bad)
    # a ratio is a byte budget, not a plan: 12 is not a rung of this (8, 16, 32) calibration and still works
    create_serde_processor(SerdeConfig("kvtc", {"calibration": path, "ratio": 12})).close()
    with pytest.raises(CalibrationError):
        create_serde_processor(SerdeConfig("kvtc", {"calibration": path + ".missing"}))
    processor = create_serde_processor(SerdeConfig("kvtc", {"calibration": path, "max_workers": 2}))
    processor.close()


def test_fixed_size_blob_is_padded_to_exactly_its_bf16_bytes_over_the_ratio(engine, chunks, small_calibration):
    layout = MemoryLayoutDesc([chunks[0].shape], [chunks[0].dtype])
    estimate = KVTCSerializer(engine).estimate_serialized_size(layout)
    assert estimate == chunks[0].numel() * 2 // 16  # the contract: ratio 16 stores 1/16 of the bf16 bytes
    noise = (torch.rand(chunks[0].shape, generator=torch.Generator().manual_seed(0)) * 8 - 4).to(torch.bfloat16)
    for tensor in (chunks[0], chunks[1], noise):
        written, dst, _ = roundtrip(engine, [tensor])
        assert written == estimate == dst.get_size()
        data = bytes(dst.byte_array)
        info = describe(data)
        assert info["start_estimated"] and info["bytes"]["padded_blob"] == estimate
        assert info["bytes"]["blob"] <= estimate and not any(data[info["bytes"]["blob"] :])
        header, _ = wire.parse(data)
        assert header.flags & wire.FLAG_PADDED


def test_serde_output_equals_the_standalone_codec_at_the_true_position(small_calibration_path, chunks,
                                                                      small_calibration):
    events = []
    engine = KVTCEngine(SerdeOptions(calibration=str(small_calibration_path), ratio=16), observer=events.append)
    for start, chunk in zip((0, 256), chunks, strict=True):
        _, _, (restored,) = roundtrip(engine, [chunk])
        assert torch.equal(restored, standalone(small_calibration, chunk, start))
    assert [e.start for e in events] == [0, 256] and {e.key for e in events} == {KEY}
    assert torch.equal(restored[:, :, :4], standalone(small_calibration, chunks[1], 256)[:, :, :4])
    _, _, (first,) = roundtrip(engine, [chunks[0]])
    assert torch.equal(first[:, :, :4], chunks[0][:, :, :4])  # sinks exact at position 0


def test_fixed_size_false_returns_the_true_size_and_still_decodes(small_calibration_path, chunks):
    engine = KVTCEngine(SerdeOptions(calibration=str(small_calibration_path), ratio=16, fixed_size=False))
    written, dst, (restored,) = roundtrip(engine, [chunks[1]])
    assert written < dst.get_size()
    assert written == describe(bytes(dst.byte_array)[:written])["bytes"]["blob"]


def test_fused_layout_round_trips_through_the_split_codec(engine, chunks, small_calibration):
    d = small_calibration.head_dim
    split = layouts.GroupLayout(layouts.SPLIT, 24, 256, small_calibration.hidden, torch.bfloat16)
    fused_layout = layouts.classify((1, 24, 256, 2 * small_calibration.hidden), torch.bfloat16, d)
    assert fused_layout.kind == layouts.FUSED and fused_layout.hidden == split.hidden
    fused = layouts.from_split(chunks[1], fused_layout, d)
    # per head h: [K_h | V_h]
    assert torch.equal(fused[0, :, :, 2 * d : 3 * d], chunks[1][0, :, :, d : 2 * d])
    assert torch.equal(fused[0, :, :, 3 * d : 4 * d], chunks[1][1, :, :, d : 2 * d])
    assert torch.equal(layouts.to_split(fused[0], fused_layout, d), chunks[1])
    _, _, (restored,) = roundtrip(engine, [fused])
    assert torch.equal(restored, layouts.from_split(standalone(small_calibration, chunks[1], 256), fused_layout, d))


def test_multi_group_objects_code_each_group(engine, chunks, small_calibration):
    written, dst, restored = roundtrip(engine, [chunks[1], chunks[0]])
    assert written == dst.get_size() == 2 * chunks[0].numel() * 2 // 16  # container header included
    budgets = engine.budgets([chunks[1].shape, chunks[0].shape], [torch.bfloat16] * 2)
    assert torch.equal(restored[0], standalone(small_calibration, chunks[1], 256, budget=budgets[0]))
    assert torch.equal(restored[1], standalone(small_calibration, chunks[0], 0, budget=budgets[1]))


@pytest.mark.parametrize(
    "shape, dtype, reason",
    [((2, 24, 256, 128), torch.uint8, "uint8"), ((1, 24, 256, 576), torch.bfloat16, "MLA"),
     ((2, 12, 256, 128), torch.bfloat16, "12 layers"), ((2, 24, 256), torch.bfloat16, "kv_size")],
)
def test_unsupported_objects_fail_to_serialize_with_a_clear_log_line(engine, shape, dtype, reason, caplog):
    tensor = torch.zeros(shape, dtype=dtype)
    serializer = KVTCSerializer(engine)
    estimate = serializer.estimate_serialized_size(MemoryLayoutDesc([tensor.shape], [dtype]))
    with pytest.raises(CodecError):
        serializer.serialize(memory_obj([tensor]), byte_buffer(max(estimate, 4096)), KEY)
    assert "kvtc: cannot code LMCache object" in caplog.text


def test_corrupted_or_foreign_bytes_never_reach_the_destination(engine, chunks):
    _, dst, _ = roundtrip(engine, [chunks[1]])
    data = bytearray(bytes(dst.byte_array))
    for mutate in (lambda b: b.__setitem__(500, b[500] ^ 0xFF), lambda b: b.__setitem__(slice(0, 4), b"XXXX")):
        bad = bytearray(data)
        mutate(bad)
        out = memory_obj([torch.full_like(chunks[1], 7)])
        with pytest.raises(CodecError):
            KVTCDeserializer(engine).deserialize(memory_obj([torch.frombuffer(bad, dtype=torch.uint8)]), out, KEY)
        assert (out.get_tensor(0) == 7).all()  # untouched


def test_calibration_selection_by_model_rank_and_group(tmp_path, small_calibration, small_calibration_path):
    other = dataclasses.replace(small_calibration, model_id="other-model", info={})
    other.save(tmp_path / "other.safetensors")
    (tmp_path / "qwen.safetensors").write_bytes(small_calibration_path.read_bytes())
    found = CalibrationSet.from_path(tmp_path)  # no index: model ids name the files
    pick = found.select("Qwen/qwen2.5-coder-0.5b", 0, 0, 0, 24, small_calibration.hidden)
    assert pick.fingerprint == small_calibration.fingerprint
    assert found.select("other-model", 0, 0, 0, 24, small_calibration.hidden).model_id == "other-model"
    with pytest.raises(CalibrationError):
        found.select("unknown/model", 0, 0, 0, 24, small_calibration.hidden)  # two fit: ambiguous
    (tmp_path / "index.json").write_text(json.dumps({"calibrations": [
        {"file": "qwen.safetensors", "model_name": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "tp_size": 2, "tp_rank": 1},
        {"file": "other.safetensors", "model_name": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "object_group_id": 3},
    ]}))
    indexed = CalibrationSet.from_path(tmp_path)
    rank1_of_2 = (2 << 24) | (1 << 16) | (2 << 8) | 1
    assert decode_kv_rank(rank1_of_2) == (2, 1)
    name = "Qwen/Qwen2.5-Coder-0.5B-Instruct"
    assert indexed.select(name, rank1_of_2, 0, 0, 24, small_calibration.hidden).model_id == small_calibration.model_id
    assert indexed.select(name, 0, 3, 0, 24, small_calibration.hidden).model_id == "other-model"
    assert indexed.by_fingerprint(other.fingerprint).model_id == "other-model"
    (tmp_path / "index.json").write_text(json.dumps({"calibrations": [{"file": "missing.safetensors"}]}))
    with pytest.raises(CalibrationError):
        CalibrationSet.from_path(tmp_path)


def test_a_corrupt_calibration_in_an_index_fails_the_config_check_not_the_first_store(tmp_path,
                                                                                    small_calibration_path):
    (tmp_path / "good.safetensors").write_bytes(small_calibration_path.read_bytes())
    (tmp_path / "bad.safetensors").write_bytes(small_calibration_path.read_bytes()[:1000])
    (tmp_path / "index.json").write_text(json.dumps({"calibrations": [
        {"file": "good.safetensors", "tp_rank": 0}, {"file": "bad.safetensors", "tp_rank": 1}]}))
    with pytest.raises(CalibrationError, match="bad.safetensors"):
        make_serde({"calibration": str(tmp_path)})


def test_an_observer_is_given_to_make_serde_in_code_never_in_json(small_calibration_path):
    with pytest.raises(ValueError, match="observer must be callable"):
        make_serde({"calibration": str(small_calibration_path), "observer": "print"})
    make_serde({"calibration": str(small_calibration_path), "observer": print}).close()


def test_stats_count_stores_plans_refusals_loads_and_failures_and_reach_prometheus(small_calibration_path, chunks,
                                                                                   caplog):
    """Through OpenTelemetry's Prometheus reader, as LMCache's MP server exports them at /metrics."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from prometheus_client import REGISTRY, generate_latest

    provider = MeterProvider(metric_readers=[PrometheusMetricReader()])
    try:
        stats = SerdeStats(provider.get_meter("test"), log_interval=0, labels={"calibration": "cal"})
        engine = KVTCEngine(SerdeOptions(calibration=str(small_calibration_path), ratio=16), stats=stats)
        _, dst, _ = roundtrip(engine, [chunks[1]])
        with pytest.raises(CodecError):
            KVTCSerializer(engine).serialize(memory_obj([torch.zeros(2, 24, 256, 128, dtype=torch.uint8)]),
                                             byte_buffer(4096), KEY)
        bad = bytearray(bytes(dst.byte_array))
        bad[:4] = b"XXXX"
        with pytest.raises(CodecError):
            KVTCDeserializer(engine).deserialize(memory_obj([torch.frombuffer(bad, dtype=torch.uint8)]),
                                                 memory_obj([torch.zeros_like(chunks[1])]), KEY)
        exposition = generate_latest(REGISTRY).decode()
    finally:
        provider.shutdown()
    snapshot = stats.snapshot()
    assert (snapshot["stored"], snapshot["loaded"]) == (1, 1)
    assert sum(snapshot["plans"].values()) == 1 and snapshot["raw_bytes"] == chunks[1].numel() * 2
    assert 0 < snapshot["stored_bytes"] <= chunks[1].numel() * 2 // 16
    assert snapshot["refused"] == {"UnsupportedLayoutError": 1}
    assert snapshot["failed_loads"] == {"ForeignBlobError": 1}
    (plan,) = snapshot["plans"]
    for line in ('kvtc_objects_stored_total{calibration="cal"} 1.0',
                 f'kvtc_plans_chosen_total{{calibration="cal",plan_ratio="{plan}"}} 1.0',
                 'kvtc_objects_refused_total{calibration="cal",reason="UnsupportedLayoutError"} 1.0',
                 'kvtc_objects_loaded_total{calibration="cal"} 1.0',
                 'kvtc_loads_failed_total{calibration="cal",reason="ForeignBlobError"} 1.0',
                 'kvtc_encode_seconds_count{calibration="cal"} 1.0',
                 'kvtc_decode_seconds_bucket{calibration="cal",le="+Inf"} 1.0'):
        assert line in exposition, line
    raw = re.search(r'^kvtc_raw_bytes_total\{calibration="cal"\} (\S+)$', exposition, re.M)
    assert raw and float(raw.group(1)) == chunks[1].numel() * 2
    assert "kvtc serde: 1 objects stored" in caplog.text  # the periodic summary line (log_interval=0: every event)


def test_a_damaged_multi_group_container_is_refused(engine, chunks):
    _, dst, _ = roundtrip(engine, [chunks[0], chunks[1]])
    data = bytes(dst.byte_array)
    content = 24 + sum(struct.unpack_from("<QQ", data, 8))  # container header and both blobs; zeros follow
    for bad in (data[:6], data[:20], b"KVTG\x01\x00\x03\x00" + data[8:], data[: content - 1000]):
        out = memory_obj([torch.full_like(chunks[0], 7), torch.full_like(chunks[1], 7)])
        with pytest.raises(CodecError):
            src = memory_obj([torch.frombuffer(bytearray(bad), dtype=torch.uint8)])
            KVTCDeserializer(engine).deserialize(src, out, KEY)
        assert (out.get_tensor(0) == 7).all() and (out.get_tensor(1) == 7).all()
