"""kvtc blobs in Redis through LMCache 0.5.6's native ``resp`` L2 adapter (a real redis-server on loopback)."""

from __future__ import annotations

import time

import pytest
import redis
import torch
from lmcache_helpers import redis_storage_manager, standalone

from calibration import tiers
from lmcache_kvtc.lmcache.serde import KVTCEngine, SerdeOptions


@pytest.fixture(scope="module")
def chunks(eval_kv):
    kv, _ = eval_kv
    return [kv[:, :, i : i + 256].contiguous() for i in (0, 256)]


def test_resp_round_trip_stores_fixed_size_blobs(chunks, small_calibration_path, small_calibration, redis_server):
    prefix = torch.cat(chunks, dim=2)
    adapter = {"type": "resp", "host": redis_server.host, "port": redis_server.port}
    restored, stats = tiers.store_and_load(prefix, str(small_calibration_path), adapter)
    assert restored is not None, stats
    assert stats["l2_hits"] == 2 and stats["positions_right"] == 2
    for start, chunk in zip((0, 256), chunks, strict=True):
        assert torch.equal(restored[:, :, start : start + 256], standalone(small_calibration, chunk, start))
    engine = KVTCEngine(SerdeOptions(str(small_calibration_path), ratio=16))
    estimate = engine.estimate([chunks[0].shape], [torch.bfloat16])
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    sizes = [client.strlen(k) for k in client.keys("*")]
    assert len(sizes) == 2 and all(estimate <= s <= estimate + 64 for s in sizes)  # value = blob (+ size header)


def test_redis_outage_fails_stores_misses_loads_and_recovers(chunks, small_calibration_path, small_calibration,
                                                            redis_server):
    sm, listener = redis_storage_manager(redis_server, small_calibration_path, reconnect_seconds=0.5)
    name, shape = small_calibration.model_id, chunks[0].shape
    try:
        before = tiers.chunk_keys(name, 2)
        tiers.store(sm, before, chunks)
        assert tiers.wait_stored(sm, listener, before) == 2

        redis_server.stop()
        during = tiers.chunk_keys(name, 2)
        tiers.store(sm, during, chunks)
        assert tiers.wait_stored(sm, listener, during, timeout=30) == 0  # failed cleanly
        sm.clear(force=True)
        assert tiers.load(sm, before, shape, torch.bfloat16, timeout=30) == ([], 0)  # a miss, no crash
        assert sm.report_status()["store_controllers"]  # still alive

        redis_server.start()  # an empty Redis: what was stored before is gone
        deadline = time.monotonic() + 30
        while not sm.report_status()["l2_adapters"][0].get("kvtc_reconnect", {}).get("backend_up"):
            assert time.monotonic() < deadline, "adapter never came back"
            time.sleep(0.2)
        after = tiers.chunk_keys(name, 2)
        tiers.store(sm, after, chunks)
        assert tiers.wait_stored(sm, listener, after) == 2
        sm.clear(force=True)
        loaded, hits = tiers.load(sm, after, shape, torch.bfloat16)
    finally:
        sm.close()
    assert hits == 2
    for start, chunk, got in zip((0, 256), chunks, loaded, strict=True):
        assert torch.equal(got, standalone(small_calibration, chunk, start))
