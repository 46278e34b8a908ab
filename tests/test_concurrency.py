"""Many chunks at once: ``max_workers=4`` through LMCache 0.5.6's MP StorageManager, and the classic plugin's
code path (engine → record → blob store → record → engine) from several threads, give bit-identical results to
one worker, with no lost or crossed objects."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from lmcache.v1.memory_management import MemoryFormat
from lmcache_helpers import stored_files

from calibration import tiers
from lmcache_kvtc.lmcache import classic
from lmcache_kvtc.lmcache.blob_stores import DiskStore, MemoryStore
from lmcache_kvtc.lmcache.engine import KVTCEngine
from lmcache_kvtc.lmcache.options import SerdeOptions

CHUNKS = 12


@pytest.fixture(scope="module")
def many_chunks(eval_kv):
    """Twelve different real 256-token chunks (overlapping windows of one held-out prefill)."""
    kv, _ = eval_kv
    return [kv[:, :, i : i + 256].contiguous() for i in range(0, 32 * CHUNKS, 32)]


def through_storage_manager(root, calibration_path, chunks, workers: int, seed: bytes):
    sm = tiers.storage_manager([tiers.with_kvtc({"type": "fs", "base_path": str(root)}, str(calibration_path), 16,
                                                max_workers=workers)])
    listener = tiers.StoreListener()
    sm.register_l2_listener(listener)
    keys = tiers.chunk_keys("qwen", len(chunks), seed=seed)
    try:
        for key, chunk in zip(keys, chunks, strict=True):  # one object per prefix: all in flight together
            tiers.store(sm, [key], [chunk])
        assert tiers.wait_stored(sm, listener, keys) == len(chunks)
        sm.clear(force=True)
        loaded = []
        for key in keys:  # one key per prefetch: a miss on one cannot hide the others
            got, hits = tiers.load(sm, [key], chunks[0].shape, torch.bfloat16)
            assert hits == 1
            loaded += got
    finally:
        sm.close()
    return {f.name: f.read_bytes() for f in stored_files(root)}, loaded


def test_four_serde_workers_store_and_load_exactly_what_one_worker_does(many_chunks, small_calibration_path,
                                                                        tmp_path):
    seed = os.urandom(16)
    files_1, loaded_1 = through_storage_manager(tmp_path / "one", small_calibration_path, many_chunks, 1, seed)
    files_4, loaded_4 = through_storage_manager(tmp_path / "four", small_calibration_path, many_chunks, 4, seed)
    assert len(files_1) == CHUNKS and files_4 == files_1  # same blob under the same key, byte for byte
    assert len(loaded_4) == CHUNKS
    for index, (one, four) in enumerate(zip(loaded_1, loaded_4, strict=True)):
        assert torch.equal(one, four)
        errors = [float((four.float() - chunk.float()).norm()) for chunk in many_chunks]
        assert min(range(CHUNKS), key=errors.__getitem__) == index  # its own chunk came back, not another's


@pytest.mark.parametrize("store", ["ram", "disk"])
def test_the_classic_path_from_several_threads_matches_one_thread(many_chunks, small_calibration_path, tmp_path,
                                                                   store):
    def round_trip(engine, blobs, index):
        name = f"chunk-{index}"
        chunk = many_chunks[index]
        record = classic.pack_record(engine.encode([chunk], None), chunk.shape, chunk.dtype, MemoryFormat.KV_2LTD)
        assert blobs.put(name, record)
        stored = blobs.get(name)
        assert stored is not None
        return classic.decode_record(engine, stored, 256)[0]

    def run(threads: int, where: str):
        engine = KVTCEngine(SerdeOptions(str(small_calibration_path), fixed_size=False))
        blobs = MemoryStore(1 << 30) if store == "ram" else DiskStore(str(tmp_path / where), 1 << 30)
        with ThreadPoolExecutor(threads) as pool:
            out = list(pool.map(lambda i: round_trip(engine, blobs, i), range(CHUNKS)))
        return out, blobs.used_bytes()

    sequential, used_1 = run(1, "one")
    threaded, used_4 = run(4, "four")
    assert used_4 == used_1
    for a, b in zip(sequential, threaded, strict=True):
        assert torch.equal(a, b)
