"""Push a real KV cache through LMCache 0.5.6's MP StorageManager with the kvtc serde and back.

This is the path a ``lmcache server`` takes for every chunk: L1 write → serialize → L2 adapter
store; then, with L1 cleared, prefetch → L2 load → deserialize → L1 read. Used by the tests and
the report; config goes through LMCache's own argument parser, so adapters are LMCache's own.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from lmcache.v1.distributed.api import GroupedObjectKeys, MemoryLayoutDesc, ObjectKey, PrefetchTaskSpec
from lmcache.v1.distributed.config import get_arg_parser, parse_args_to_config
from lmcache.v1.distributed.internal_api import L2AdapterListener
from lmcache.v1.distributed.storage_manager import StorageManager

from lmcache_kvtc.calibration import Calibration
from lmcache_kvtc.defaults import CHUNK_TOKENS
from lmcache_kvtc.lmcache.engine import EncodeEvent, Observer
from lmcache_kvtc.lmcache.serde import SERDE_TYPE, register


@dataclass
class StoreListener(L2AdapterListener):
    """Counts the keys (and bytes) L2 adapters report as stored."""

    stored: dict[bytes, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on_l2_keys_stored(self, keys: list[ObjectKey], sizes: list[int]) -> None:
        with self.lock:
            for key, size in zip(keys, sizes, strict=False):
                self.stored[key.chunk_hash] = size

    def on_l2_keys_accessed(self, keys: list[ObjectKey]) -> None:
        pass

    def on_l2_keys_deleted(self, keys: list[ObjectKey]) -> None:
        pass


def storage_manager(adapters: list[dict[str, Any]], l1_size_gb: float = 0.5,
                    observer: Observer | None = None, shm_name: str | None = None) -> StorageManager:
    """A CPU StorageManager built from ``--l2-adapter`` JSON specs by LMCache's own parser; ``observer`` is handed
    to every kvtc serde through the parsed config (see ``make_serde``). ``shm_name`` names L1's shared-memory
    segment (``""``: none); LMCache's default is one per process, so a second live StorageManager in the same
    process needs another (with the default both use one segment name, and closing the second fails)."""
    args = ["--l1-size-gb", str(l1_size_gb), "--eviction-policy", "LRU", "--no-l1-use-lazy"]
    for spec in adapters:
        args += ["--l2-adapter", json.dumps(spec)]
    config = parse_args_to_config(get_arg_parser().parse_args(args))
    if shm_name is not None:
        for l1 in config.l1_manager_configs:
            l1.memory_config.shm_name = shm_name
    if observer is not None:
        for adapter in config.l2_adapter_config.adapters:
            if adapter.serde_config is not None and adapter.serde_config.type == SERDE_TYPE:
                adapter.serde_config.kwargs["observer"] = observer
    return StorageManager(config)


def with_kvtc(adapter: dict[str, Any], calibration_path: str, ratio: float, **serde: Any) -> dict[str, Any]:
    """``adapter`` with a kvtc ``serde`` entry (kept as is when it already names one)."""
    spec = dict(adapter)
    spec.setdefault("serde", {"type": SERDE_TYPE, "calibration": str(calibration_path), "ratio": ratio, **serde})
    return spec


def chunk_keys(model_name: str, count: int, seed: bytes | None = None, cache_salt: str = "") -> list[ObjectKey]:
    """Rolling prefix hashes like LMCache's (one per chunk), fresh per call unless ``seed`` is given."""
    prefix = os.urandom(16) if seed is None else seed
    keys = []
    for i in range(count):
        prefix = hashlib.sha256(prefix + i.to_bytes(8, "little")).digest()
        keys.append(ObjectKey(chunk_hash=prefix, model_name=model_name, kv_rank=0, cache_salt=cache_salt))
    return keys


def store(sm: StorageManager, keys: list[ObjectKey], chunks: list[torch.Tensor]) -> int:
    """Write chunks into L1 (which queues their L2 stores); returns how many L1 accepted."""
    layout = MemoryLayoutDesc([chunks[0].shape], [chunks[0].dtype])
    reserved = sm.reserve_write(keys, layout)
    for key, chunk in zip(keys, chunks, strict=True):
        if key in reserved:
            reserved[key].tensor.copy_(chunk)
    sm.finish_write([k for k in keys if k in reserved])
    return len(reserved)


def wait_stored(sm: StorageManager, listener: StoreListener, keys: list[ObjectKey], timeout: float = 120.0,
                settle: float = 10.0) -> int:
    """Wait until every key is in L2, or the store controllers are idle (failed stores); returns stored count.

    Polling the controller counters alone is racy (they read 0 before a task is picked up, and while the
    serde still encodes), so the idle state must hold for ``settle`` seconds — longer than one chunk's
    encode on a busy CPU — before we give up on the remaining keys.
    """
    wanted = {k.chunk_hash for k in keys}
    deadline, idle_since = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        with listener.lock:
            done = len(wanted & listener.stored.keys())
        if done == len(wanted):
            break
        status = sm.report_status()["store_controllers"].values()
        idle = all(s["in_flight_task_count"] == 0 and s["pending_keys_count"] == 0 for s in status)
        idle_since = (idle_since or time.monotonic()) if idle else None
        if idle_since is not None and time.monotonic() - idle_since > settle:
            break
        time.sleep(0.05)
    time.sleep(0.1)  # let the store controller release the L1 read locks of the finished task
    with listener.lock:
        return len(wanted & listener.stored.keys())


def load(sm: StorageManager, keys: list[ObjectKey], shape: torch.Size, dtype: torch.dtype,
         timeout: float = 120.0) -> tuple[list[torch.Tensor], int]:
    """Prefetch ``keys`` (prefix policy) into L1 and copy them out; returns (chunks of the hit prefix, L2 hits)."""
    layout = MemoryLayoutDesc([shape], [dtype])
    handle = sm.submit_prefetch_task(PrefetchTaskSpec([GroupedObjectKeys(keys, 0, layout)]))
    if not sm.wait_prefetch_status(handle, timeout):
        raise TimeoutError(f"prefetch of {len(keys)} chunks did not finish in {timeout}s")
    result = sm.query_prefetch_status(handle)
    hits = result.hit_cells[0]
    prefix = 0
    while prefix < len(keys) and hits.test(prefix):
        prefix += 1
    chunks: list[torch.Tensor] = []
    held = [k for i, k in enumerate(keys) if hits.test(i)]
    if held:
        with sm.read_prefetched_results(held) as objs:
            if objs is not None:
                chunks = [o.tensor.clone() for o in objs[:prefix]]
        sm.finish_read_prefetched(held)
    return chunks, result.l2_hit_count


def store_and_load(kv: torch.Tensor, calibration_path: str, adapter: dict[str, Any], ratio: float = 16,
                   model_name: str | None = None, **serde: Any) -> tuple[torch.Tensor | None, dict[str, Any]]:
    """Round-trip ``kv [2, L, T, H·D]`` (T a multiple of 256) through L1 → kvtc → ``adapter`` → kvtc → L1.

    Returns the restored tensor (``None`` unless every chunk came back) and stats: raw and stored
    bytes per chunk, the estimated base positions and how many were right, hit counts, seconds.
    """
    register()
    tokens = kv.shape[2]
    if tokens % CHUNK_TOKENS:
        raise ValueError(f"{tokens} tokens is not a multiple of the {CHUNK_TOKENS}-token chunk")
    model_name = model_name or Calibration.load(calibration_path).model_id
    chunks = [kv[:, :, i : i + CHUNK_TOKENS].contiguous() for i in range(0, tokens, CHUNK_TOKENS)]
    keys = chunk_keys(model_name, len(chunks))
    l1_gb = max(0.25, 6 * kv.numel() * kv.element_size() / 2**30)
    events: list[EncodeEvent] = []
    sm = storage_manager([with_kvtc(adapter, calibration_path, ratio, **serde)], l1_size_gb=l1_gb,
                         observer=events.append)
    listener = StoreListener()
    sm.register_l2_listener(listener)
    try:
        started = time.monotonic()
        store(sm, keys, chunks)
        stored = wait_stored(sm, listener, keys)
        stored_s = time.monotonic() - started
        sm.clear(force=True)
        started = time.monotonic()
        loaded, l2_hits = load(sm, keys, chunks[0].shape, kv.dtype)
        load_s = time.monotonic() - started
    finally:
        sm.close()
    restored = torch.cat(loaded, dim=2) if len(loaded) == len(chunks) else None
    return restored, _stats(keys, chunks, events, listener, stored, l2_hits, len(loaded), stored_s, load_s)


def _stats(keys, chunks, events: list[EncodeEvent], listener: StoreListener, stored: int, l2_hits: int,
           loaded: int, stored_s: float, load_s: float) -> dict[str, Any]:
    index = {k.chunk_hash: i for i, k in enumerate(keys)}
    starts = {index[e.key.chunk_hash]: e.start for e in events if e.key is not None and e.key.chunk_hash in index}
    blob = {index[e.key.chunk_hash]: e.blob_bytes for e in events if e.key is not None and e.key.chunk_hash in index}
    plans = {index[e.key.chunk_hash]: e.plan_ratio for e in events if e.key is not None and e.key.chunk_hash in index}
    true_starts = [i * CHUNK_TOKENS for i in range(len(chunks))]
    return {
        "chunks": len(chunks),
        "raw_bytes_per_chunk": chunks[0].numel() * chunks[0].element_size(),
        "stored_bytes": [listener.stored.get(k.chunk_hash) for k in keys],
        "blob_bytes": [blob.get(i) for i in range(len(chunks))],
        "plan_ratios": [plans.get(i) for i in range(len(chunks))],
        "estimated_starts": [starts.get(i) for i in range(len(chunks))],
        "true_starts": true_starts,
        "positions_right": sum(starts.get(i) == s for i, s in enumerate(true_starts)),
        "candidates": events[0].candidates if events else None,
        "stored_chunks": stored,
        "l2_hits": l2_hits,
        "loaded_chunks": loaded,
        "store_seconds": round(stored_s, 3),
        "load_seconds": round(load_s, 3),
    }
