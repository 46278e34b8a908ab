"""Real LMCache 0.5.6 MP StorageManager on CPU: L1 → kvtc → L2 (fs / mock) → kvtc → L1, on a real model's KV."""

from __future__ import annotations

import pytest
import torch
from lmcache_helpers import standalone, stored_files

from calibration import tiers
from lmcache_kvtc.inspect import describe
from lmcache_kvtc.lmcache.serde import KVTCEngine, SerdeOptions


@pytest.fixture(scope="module")
def prefix(eval_kv):
    kv, _ = eval_kv
    return kv[:, :, :512].contiguous()  # two full 256-token chunks


def fs_adapter(tmp_path, calibration_path, **serde):
    return tiers.with_kvtc({"type": "fs", "base_path": str(tmp_path / "l2")}, str(calibration_path), 16, **serde)


def test_fs_round_trip_matches_the_standalone_codec_at_true_positions(prefix, small_calibration,
                                                                     small_calibration_path, tmp_path):
    calibration_path = small_calibration_path
    restored, stats = tiers.store_and_load(prefix, str(calibration_path), {"type": "fs", "base_path": str(tmp_path)})
    assert restored is not None, stats
    assert stats["l2_hits"] == 2 and stats["positions_right"] == 2
    assert stats["estimated_starts"] == [0, 256]
    for start in (0, 256):
        chunk = prefix[:, :, start : start + 256]
        assert torch.equal(restored[:, :, start : start + 256], standalone(small_calibration, chunk, start))
    assert torch.equal(restored[:, :, :4], prefix[:, :, :4])  # attention sinks exact
    error = float((restored.float() - prefix.float()).norm() / prefix.float().norm())
    assert 0 < error < 0.1
    engine = KVTCEngine(SerdeOptions(str(calibration_path), ratio=16))
    estimate = engine.estimate([prefix[:, :, :256].shape], [torch.bfloat16])
    files = stored_files(tmp_path)
    assert len(files) == 2 and {f.stat().st_size for f in files} == {estimate}
    assert stats["stored_bytes"] == [estimate, estimate]
    assert estimate * 8 < stats["raw_bytes_per_chunk"]
    assert {describe(f.read_bytes())["start"] for f in files} == {0, 256}


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_blob_file_is_a_miss_never_garbage(prefix, small_calibration_path, small_calibration, tmp_path,
                                                       damage, caplog):
    sm = tiers.storage_manager([fs_adapter(tmp_path, small_calibration_path)])
    listener = tiers.StoreListener()
    sm.register_l2_listener(listener)
    chunks = [prefix[:, :, :256].contiguous(), prefix[:, :, 256:].contiguous()]
    keys = tiers.chunk_keys(small_calibration.model_id, 2)
    try:
        tiers.store(sm, keys, chunks)
        assert tiers.wait_stored(sm, listener, keys) == 2
        victim = next(f for f in stored_files(tmp_path / "l2") if describe(f.read_bytes())["start"] == 256)
        data = bytearray(victim.read_bytes())
        if damage == "flip":
            data[len(data) // 3] ^= 0x5A
        else:
            data = data[: len(data) // 2]
        victim.write_bytes(bytes(data))
        sm.clear(force=True)
        loaded, _ = tiers.load(sm, keys, chunks[0].shape, torch.bfloat16)
    finally:
        sm.close()
    assert len(loaded) < 2  # the damaged chunk never comes back
    for start, chunk in zip((0, 256), loaded, strict=False):
        assert torch.equal(chunk, standalone(small_calibration, prefix[:, :, start : start + 256], start))
    if damage == "flip":
        assert "failed validation" in caplog.text


def test_unsupported_objects_are_a_failed_store_and_a_miss(small_calibration_path, small_calibration, tmp_path, caplog):
    sm = tiers.storage_manager([fs_adapter(tmp_path, small_calibration_path)])
    listener = tiers.StoreListener()
    sm.register_l2_listener(listener)
    try:
        for shape, dtype in (((2, 24, 256, 128), torch.uint8), ((1, 24, 256, 576), torch.bfloat16)):
            keys = tiers.chunk_keys(small_calibration.model_id, 1)
            chunk = torch.ones(shape, dtype=dtype)
            assert tiers.store(sm, keys, [chunk]) == 1
            assert tiers.wait_stored(sm, listener, keys, timeout=30) == 0
            sm.clear(force=True)
            loaded, hits = tiers.load(sm, keys, chunk.shape, dtype)
            assert (loaded, hits) == ([], 0)
    finally:
        sm.close()
    assert not stored_files(tmp_path / "l2") or all(f.stat().st_size == 0 for f in stored_files(tmp_path / "l2"))
    assert "kvtc: cannot code LMCache object" in caplog.text


def test_variable_size_blobs_with_fixed_size_false_on_the_mock_adapter(prefix, small_calibration_path,
                                                                       small_calibration):
    adapter = {"type": "mock", "max_size_gb": 1, "mock_bandwidth_gb": 100}
    restored, stats = tiers.store_and_load(prefix, str(small_calibration_path), adapter, fixed_size=False)
    assert restored is not None, stats
    assert stats["stored_bytes"] == stats["blob_bytes"]
    assert len(set(stats["stored_bytes"])) == 2  # really variable
    assert torch.equal(restored[:, :, 256:], standalone(small_calibration, prefix[:, :, 256:], 256))
