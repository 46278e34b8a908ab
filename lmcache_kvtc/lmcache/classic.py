"""KVTC for LMCache's classic in-process engine (``LMCACHE_CONFIG_FILE`` YAML, vLLM ``LMCacheConnectorV1``).

The classic ``remote_serde`` knob is a closed list, so KVTC comes in as a storage plugin: it
compresses each chunk when LMCache puts it and keeps the blobs in a compressed CPU-RAM tier with
a byte limit (least recently used out first); a get decodes into a LocalCPU allocation::

    storage_plugins: ["kvtc"]
    extra_config:
      storage_plugin.kvtc.module_path: lmcache_kvtc.lmcache.classic
      storage_plugin.kvtc.class_name: KVTCStoragePlugin
      kvtc.calibration: /opt/kvtc/model.safetensors   # file or directory (required)
      kvtc.ratio: 16
      kvtc.max_size_gb: 4.0                           # compressed bytes kept in RAM

LMCache's plugin launcher catches and only logs constructor exceptions, so a broken config would
silently drop the tier: the constructor logs a loud error first, and
``python -m lmcache_kvtc.lmcache.classic config.yaml`` checks a config file ahead of time.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
from lmcache.logging import init_logger
from lmcache.v1.distributed.api import ObjectKey
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface

from ..errors import CodecError
from .engine import KVTCEngine
from .options import SerdeOptions

log = init_logger(__name__)

PREFIX = "kvtc."
_KEYS = {"calibration": str, "ratio": float, "device": str, "max_size_gb": float, "sinks": int, "max_position": int}


@dataclass(frozen=True)
class _Entry:
    blob: bytes
    shape: torch.Size
    dtype: torch.dtype
    fmt: MemoryFormat


def options_from_extra_config(extra: dict | None) -> tuple[SerdeOptions, int]:
    """``(serde options, RAM byte limit)`` from the ``kvtc.*`` keys of ``extra_config``; raises ``ValueError``."""
    extra = extra or {}
    values = {k[len(PREFIX) :]: v for k, v in extra.items() if isinstance(k, str) and k.startswith(PREFIX)}
    unknown = set(values) - set(_KEYS)
    if unknown:
        raise ValueError(f"unknown extra_config keys {sorted(PREFIX + k for k in unknown)}; "
                         f"known: {sorted(PREFIX + k for k in _KEYS)}")
    if not values.get("calibration"):
        raise ValueError("extra_config needs kvtc.calibration (a calibration file or directory)")
    typed = {}
    for name, value in values.items():
        try:
            typed[name] = _KEYS[name](value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{PREFIX}{name} must be {_KEYS[name].__name__}, got {value!r}") from exc
    limit = int(typed.pop("max_size_gb", 1.0) * 2**30)
    if limit <= 0:
        raise ValueError("kvtc.max_size_gb must be positive")
    return SerdeOptions(fixed_size=False, **typed), limit


class KVTCStoragePlugin(StoragePluginInterface):
    """A compressed CPU-RAM tier: KVTC blobs in, decoded KV out (LRU within ``kvtc.max_size_gb``)."""

    def __init__(self, dst_device: str = "cpu", config=None, metadata=None, local_cpu_backend=None, loop=None):
        super().__init__(dst_device=dst_device, config=config, metadata=metadata,
                         local_cpu_backend=local_cpu_backend, loop=loop)
        try:
            options, self.max_bytes = options_from_extra_config(getattr(config, "extra_config", None))
            self.engine = KVTCEngine(options)
            if local_cpu_backend is None:
                raise ValueError("LMCache passed no local_cpu_backend to allocate decoded chunks from")
        except (ValueError, CodecError) as exc:
            log.error("=" * 80)
            log.error("kvtc storage plugin NOT created, so LMCache runs WITHOUT the KVTC tier: %s", exc)
            log.error("=" * 80)
            raise
        self._blobs: OrderedDict[object, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        log.info("kvtc storage plugin: ratio %s, up to %.2f GB of blobs in RAM", options.ratio, self.max_bytes / 2**30)

    def __str__(self) -> str:
        return "KVTCStoragePlugin"

    @staticmethod
    def _object_key(key) -> ObjectKey:
        rank = (int(getattr(key, "world_size", 1)) << 24) | (int(getattr(key, "worker_id", 0)) << 16)
        return ObjectKey(chunk_hash=str(key.chunk_hash).encode(), model_name=key.model_name, kv_rank=rank)

    def contains(self, key, pin: bool = False) -> bool:
        with self._lock:
            return key in self._blobs

    def exists_in_put_tasks(self, key) -> bool:
        return False  # puts are synchronous

    def batched_submit_put_task(self, keys, objs, transfer_spec=None, on_complete_callback=None):
        for key, obj in zip(keys, objs, strict=True):
            try:
                blob = self.engine.encode([obj.tensor], self._object_key(key))
            except CodecError:
                continue  # logged by the engine; this chunk is simply not in this tier
            self._insert(key, _Entry(blob, obj.get_shape(), obj.get_dtype(), obj.get_memory_format()))
            if on_complete_callback is not None:
                try:
                    on_complete_callback(key)
                except Exception:
                    log.exception("kvtc: put completion callback failed")
        return None

    def _insert(self, key, entry: _Entry) -> None:
        with self._lock:
            old = self._blobs.pop(key, None)
            self._bytes -= len(old.blob) if old else 0
            while self._blobs and self._bytes + len(entry.blob) > self.max_bytes:
                _, evicted = self._blobs.popitem(last=False)
                self._bytes -= len(evicted.blob)
            if len(entry.blob) <= self.max_bytes:
                self._blobs[key] = entry
                self._bytes += len(entry.blob)

    def get_blocking(self, key):
        with self._lock:
            entry = self._blobs.get(key)
            if entry is not None:
                self._blobs.move_to_end(key)
        if entry is None:
            return None
        try:
            (tensor,) = self.engine.decode(memoryview(entry.blob), [entry.shape], [entry.dtype])
        except CodecError as exc:
            log.error("kvtc: blob for %s failed validation (%s): dropped, reporting a miss", key, exc)
            self.remove(key)
            return None
        obj = self.local_cpu_backend.allocate(entry.shape, entry.dtype, fmt=entry.fmt)
        if obj is None:
            return None
        obj.tensor.copy_(tensor)
        return obj

    def pin(self, key) -> bool:
        return self.contains(key)

    def unpin(self, key) -> bool:
        return self.contains(key)

    def remove(self, key, force: bool = True) -> bool:
        with self._lock:
            entry = self._blobs.pop(key, None)
            if entry is not None:
                self._bytes -= len(entry.blob)
            return entry is not None

    def get_allocator_backend(self):
        return self.local_cpu_backend

    def stored_bytes(self) -> int:
        with self._lock:
            return self._bytes

    def close(self) -> None:
        with self._lock:
            self._blobs.clear()
            self._bytes = 0


def check_config_file(path: str) -> SerdeOptions:
    """Parse a classic YAML with LMCache's own loader and validate its kvtc plugin settings."""
    from lmcache.v1.config import LMCacheEngineConfig

    config = LMCacheEngineConfig.from_file(path)
    plugins = config.storage_plugins or []
    extra = config.extra_config or {}
    names = [n for n in plugins if extra.get(f"storage_plugin.{n}.class_name") == KVTCStoragePlugin.__name__]
    if not names:
        raise ValueError(f"{path}: no storage plugin with class_name {KVTCStoragePlugin.__name__}")
    for name in names:
        if extra.get(f"storage_plugin.{name}.module_path") != __name__:
            raise ValueError(f"{path}: storage_plugin.{name}.module_path must be {__name__}")
    options, _ = options_from_extra_config(extra)
    KVTCEngine(options)  # loads and checks the calibration(s)
    return options


if __name__ == "__main__":
    try:
        print(check_config_file(sys.argv[1]))
    except (IndexError, ValueError, CodecError) as exc:
        sys.exit(f"kvtc classic config check failed: {exc}")
