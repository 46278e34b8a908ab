"""Faults in the real components under LMCache 0.5.6's MP StorageManager with the kvtc serde: Redis killed
mid-stream, a file system that fills up mid-store, a calibration file replaced under a running server.
What the user must see each time: failed stores and misses, never wrong KV, and recovery."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import torch
from lmcache_helpers import redis_storage_manager, standalone, stored_files
from prepared import missing

from calibration import tiers
from lmcache_kvtc import Calibration
from lmcache_kvtc.lmcache.serde import KVTCEngine, SerdeOptions


@pytest.fixture(scope="module")
def chunks(eval_kv):
    kv, _ = eval_kv
    return [kv[:, :, i : i + 256].contiguous() for i in (0, 256)]


@pytest.fixture(scope="module")
def expected(chunks, small_calibration):
    """What a correct load of each chunk returns: the codec alone at the chunk's true position."""
    return [standalone(small_calibration, chunk, start) for chunk, start in zip(chunks, (0, 256), strict=True)]


def assert_exact_or_missing(loaded: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """A load may stop short (a miss), but every chunk it returns is exactly the stored one."""
    for got, want in zip(loaded, expected, strict=False):
        assert torch.equal(got, want)


def wait_backend_up(sm, timeout: float = 30.0) -> float:
    started = time.monotonic()
    while not sm.report_status()["l2_adapters"][0].get("kvtc_reconnect", {}).get("backend_up"):
        assert time.monotonic() - started < timeout, "adapter never came back"
        time.sleep(0.1)
    return time.monotonic() - started


def test_redis_killed_mid_stream_costs_misses_only_and_recovers_with_or_without_its_data(
        chunks, expected, small_calibration_path, small_calibration, redis_server, capsys):
    redis_server.stop()
    redis_server.start(persist=True)
    sm, listener = redis_storage_manager(redis_server, small_calibration_path, reconnect_seconds=0.2)
    name, shape = small_calibration.model_id, chunks[0].shape

    def load(keys):
        sm.clear(force=True)
        loaded, _ = tiers.load(sm, keys, shape, torch.bfloat16, timeout=30)
        assert_exact_or_missing(loaded, expected)
        return len(loaded)

    try:
        before = tiers.chunk_keys(name, 2)
        tiers.store(sm, before, chunks)
        assert tiers.wait_stored(sm, listener, before) == 2

        torn = tiers.chunk_keys(name, 2)
        tiers.store(sm, torn, chunks)  # queued: the kill lands while these are encoded and sent
        redis_server.kill()
        tiers.wait_stored(sm, listener, torn, timeout=30, settle=2)
        for _ in range(3):  # a stream of stores and loads against a dead Redis
            during = tiers.chunk_keys(name, 2)
            tiers.store(sm, during, chunks)
            assert tiers.wait_stored(sm, listener, during, timeout=30, settle=2) == 0
            assert load(before) == 0

        redis_server.start(persist=True)  # same port, its append-only file replayed
        restarted = time.monotonic()
        wait_backend_up(sm)
        while load(before) < 2:
            assert time.monotonic() - restarted < 30, "stored chunks never came back"
            time.sleep(0.1)
        recovered_with_data = time.monotonic() - restarted
        load(torn)  # whatever of the interrupted stores made it is exact; the rest is a miss

        redis_server.kill()
        redis_server.start()  # empty: without append-only mode (and with saving off) nothing is replayed
        restarted = time.monotonic()
        wait_backend_up(sm)
        assert load(before) == 0
        after = tiers.chunk_keys(name, 2)
        while True:
            tiers.store(sm, after, chunks)
            if tiers.wait_stored(sm, listener, after, timeout=30, settle=2) == 2:
                break
            assert time.monotonic() - restarted < 30, "stores never recovered"
            after = tiers.chunk_keys(name, 2)
        recovered_empty = time.monotonic() - restarted
        assert load(after) == 2
    finally:
        sm.close()
    with capsys.disabled():
        print(f"\nRedis SIGKILL: back with its data in {recovered_with_data:.2f} s, empty in {recovered_empty:.2f} s")


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs: room for a few 16× blobs of the 0.5B model, so a store runs out of space mid-way."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        missing("a tmpfs mount needs root and mount(8); run as root (CI does)")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if result.returncode:
        missing(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_file_system_fails_the_store_cleanly_and_keeps_earlier_objects(chunks, expected, small_fs,
                                                                             small_calibration_path,
                                                                             small_calibration):
    engine = KVTCEngine(SerdeOptions(str(small_calibration_path), ratio=16))
    estimate = engine.estimate([chunks[0].shape], [torch.bfloat16])
    fits = (1 << 20) // estimate
    assert 2 <= fits < 12, f"{estimate}-byte blobs: choose another tmpfs size"
    sm = tiers.storage_manager([tiers.with_kvtc({"type": "fs", "base_path": str(small_fs)},
                                                str(small_calibration_path), 16)])
    listener = tiers.StoreListener()
    sm.register_l2_listener(listener)
    name, shape = small_calibration.model_id, chunks[0].shape
    try:
        first = tiers.chunk_keys(name, 2)
        tiers.store(sm, first, chunks)
        assert tiers.wait_stored(sm, listener, first) == 2
        prefixes = [tiers.chunk_keys(name, 2) for _ in range(fits)]  # twice what fits
        for keys in prefixes:
            tiers.store(sm, keys, chunks)
        stored = sum(tiers.wait_stored(sm, listener, keys, timeout=60, settle=3) for keys in prefixes)
        assert stored <= fits - 2  # the disk filled up: some stores failed
        for f in stored_files(small_fs):  # whatever is left behind, nothing partial under a final name
            assert f.suffix != ".data" or f.stat().st_size == estimate, f
        sm.clear(force=True)
        loaded, hits = tiers.load(sm, first, shape, torch.bfloat16)
        assert hits == 2 and len(loaded) == 2
        assert_exact_or_missing(loaded, expected)
        for keys in prefixes:
            sm.clear(force=True)
            got, _ = tiers.load(sm, keys, shape, torch.bfloat16)
            assert_exact_or_missing(got, expected)
    finally:
        sm.close()


def test_a_calibration_replaced_under_a_running_server_never_decodes_old_blobs_with_the_new_one(
        chunks, expected, small_calibration_path, small_calibration, tmp_path, caplog):
    path = tmp_path / "calibration.safetensors"
    shutil.copy(small_calibration_path, path)
    adapter = tiers.with_kvtc({"type": "fs", "base_path": str(tmp_path / "l2")}, str(path), 16)
    name, shape = small_calibration.model_id, chunks[0].shape
    keys = tiers.chunk_keys(name, 2)
    sm = tiers.storage_manager([adapter])
    listener = tiers.StoreListener()
    sm.register_l2_listener(listener)
    try:
        tiers.store(sm, keys, chunks)
        assert tiers.wait_stored(sm, listener, keys) == 2
        replacement = Calibration.load(small_calibration_path)
        replacement.streams["values"].mean.add_(0.01)  # another calibration: another fingerprint
        replacement.info = {**replacement.info, "replaced": True}
        replacement.save(path)
        assert Calibration.load(path).fingerprint != small_calibration.fingerprint
        sm.clear(force=True)
        loaded, hits = tiers.load(sm, keys, shape, torch.bfloat16)
        assert hits == 2 and len(loaded) == 2  # the running server keeps the calibration it coded them with
        assert_exact_or_missing(loaded, expected)
    finally:
        sm.close()
    sm = tiers.storage_manager([adapter])  # restarted: it reads the new file
    try:
        loaded, hits = tiers.load(sm, keys, shape, torch.bfloat16)
    finally:
        sm.close()
    assert loaded == [] and hits == 0
    assert "which is not in" in caplog.text
