"""KVTC for LMCache's classic in-process engine (``LMCACHE_CONFIG_FILE`` YAML, vLLM ``LMCacheConnectorV1``).

The classic ``remote_serde`` knob is a closed list, so KVTC comes in as a storage plugin: it
compresses each chunk when LMCache puts it and keeps the blobs in CPU RAM, a local directory or
Redis (:mod:`.blob_stores`) within a byte limit (least recently used out first); a get decodes into
a LocalCPU allocation::

    storage_plugins: ["kvtc"]
    extra_config:
      storage_plugin.kvtc.module_path: lmcache_kvtc.lmcache.classic
      storage_plugin.kvtc.class_name: KVTCStoragePlugin
      kvtc.calibration: /opt/kvtc/model.safetensors   # file or directory (required)
      kvtc.ratio: 12
      kvtc.store: disk                                # ram (default), disk or redis
      kvtc.path: /var/lib/lmcache/kvtc                # disk: the directory
      kvtc.redis_url: redis://127.0.0.1:6379/0        # redis: where
      kvtc.max_size_gb: 4.0                           # compressed bytes kept in the store

On disk and in Redis each record is a small little-endian header — magic ``KVTR``, u16 version 1,
u8 dtype code, u8 LMCache ``MemoryFormat``, u8 ndim, ndim × u32 shape — then the kvtc blob. Every
field is checked on read (a record may have been written by anyone); a bad record is dropped and is
a miss.

LMCache's plugin launcher catches and only logs constructor exceptions, so a broken config would
silently drop the tier: the constructor logs a loud error first, and
``python -m lmcache_kvtc.lmcache.classic config.yaml`` checks a config file ahead of time.
"""

from __future__ import annotations

import struct
import sys

import torch
from lmcache.logging import init_logger
from lmcache.v1.distributed.api import ObjectKey
from lmcache.v1.memory_management import MemoryFormat
from lmcache.v1.storage_backend.abstract_backend import StoragePluginInterface

from ..blob import DTYPE_CODES
from ..defaults import CHUNK_TOKENS
from ..errors import CodecError, CorruptBlobError
from .blob_stores import BlobStore, DiskStore, MemoryStore, RedisStore
from .engine import KVTCEngine
from .options import SerdeOptions, typed

log = init_logger(__name__)

PREFIX = "kvtc."
_SERDE_KEYS = ("calibration", "ratio", "device", "sinks", "max_position")  # parsed by SerdeOptions
_PLUGIN_KEYS = {"max_size_gb": float, "store": str, "path": str, "redis_url": str}
_RECORD = struct.Struct("<4sHBBB")
_RECORD_MAGIC = b"KVTR"
_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}
_MAX_DIMS = 8


def pack_record(blob: bytes, shape: torch.Size, dtype: torch.dtype, fmt: MemoryFormat) -> bytes:
    header = _RECORD.pack(_RECORD_MAGIC, 1, DTYPE_CODES[dtype], fmt.value, len(shape))
    return header + struct.pack(f"<{len(shape)}I", *shape) + blob


def unpack_record(record: bytes) -> tuple[memoryview, torch.Size, torch.dtype, MemoryFormat]:
    """``(blob, shape, dtype, memory format)``; ``CorruptBlobError`` for anything that is not a valid record."""
    if len(record) < _RECORD.size:
        raise CorruptBlobError(f"record of {len(record)} bytes is shorter than its header")
    magic, version, dtype_code, fmt_code, ndim = _RECORD.unpack_from(record)
    if magic != _RECORD_MAGIC or version != 1:
        raise CorruptBlobError(f"not a kvtc record (magic {magic!r}, version {version})")
    if dtype_code not in _DTYPES or not 1 <= ndim <= _MAX_DIMS:
        raise CorruptBlobError(f"record declares dtype code {dtype_code}, {ndim} dims")
    try:
        fmt = MemoryFormat(fmt_code)
    except ValueError:
        raise CorruptBlobError(f"record declares unknown memory format {fmt_code}") from None
    end = _RECORD.size + 4 * ndim
    if len(record) < end:
        raise CorruptBlobError("record ends inside its shape")
    shape = torch.Size(struct.unpack_from(f"<{ndim}I", record, _RECORD.size))
    if min(shape) < 1:
        raise CorruptBlobError(f"record declares shape {tuple(shape)}")
    return memoryview(record)[end:], shape, _DTYPES[dtype_code], fmt


def decode_record(engine: KVTCEngine, record: bytes, max_tokens: int) -> tuple[torch.Tensor, MemoryFormat]:
    """A stored record's KV and memory format, validated; raises ``CodecError``.

    The record's shape is as hostile as its blob: one of more than ``max_tokens`` (LMCache's chunk size) is
    refused before anything is allocated for it.
    """
    blob, shape, dtype, fmt = unpack_record(record)
    (layout,) = engine.group_layouts([shape], [dtype])
    if layout.tokens > max_tokens:
        raise CorruptBlobError(f"record declares {layout.tokens} tokens; LMCache's chunks hold {max_tokens}")
    (tensor,) = engine.decode(blob, [shape], [dtype])
    return tensor, fmt


def store_from_options(values: dict, max_bytes: int) -> BlobStore:
    """The store ``kvtc.store`` names, from its ``kvtc.path`` / ``kvtc.redis_url``; raises ``ValueError``."""
    kind = values.get("store", "ram")
    if kind == "ram":
        return MemoryStore(max_bytes)
    if kind == "disk":
        if not values.get("path"):
            raise ValueError("kvtc.store: disk needs kvtc.path (a directory)")
        return DiskStore(values["path"], max_bytes)
    if kind == "redis":
        if not values.get("redis_url"):
            raise ValueError("kvtc.store: redis needs kvtc.redis_url (e.g. redis://127.0.0.1:6379/0)")
        return RedisStore(values["redis_url"], max_bytes)
    raise ValueError(f"kvtc.store must be ram, disk or redis, got {kind!r}")


def options_from_extra_config(extra: dict | None) -> tuple[SerdeOptions, int, dict]:
    """``(serde options, byte limit, store settings)`` from the ``kvtc.*`` keys of ``extra_config``; raises
    ``ValueError``."""
    extra = extra or {}
    values = {k[len(PREFIX) :]: v for k, v in extra.items() if isinstance(k, str) and k.startswith(PREFIX)}
    known = (*_SERDE_KEYS, *_PLUGIN_KEYS)
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown extra_config keys {sorted(PREFIX + k for k in unknown)}; "
                         f"known: {sorted(PREFIX + k for k in known)}")
    plugin = {k: typed(k, values.pop(k), kind, PREFIX) for k, kind in _PLUGIN_KEYS.items() if k in values}
    options = SerdeOptions.from_kwargs({**values, "fixed_size": False}, source=PREFIX)
    limit = int(plugin.pop("max_size_gb", 1.0) * 2**30)
    if limit <= 0:
        raise ValueError("kvtc.max_size_gb must be positive")
    return options, limit, plugin


class KVTCStoragePlugin(StoragePluginInterface):
    """A compressed tier (RAM, disk or Redis): KVTC blobs in, decoded KV out (LRU within ``kvtc.max_size_gb``)."""

    def __init__(self, dst_device: str = "cpu", config=None, metadata=None, local_cpu_backend=None, loop=None):
        super().__init__(dst_device=dst_device, config=config, metadata=metadata,
                         local_cpu_backend=local_cpu_backend, loop=loop)
        try:
            options, max_bytes, store = options_from_extra_config(getattr(config, "extra_config", None))
            self.engine = KVTCEngine(options)
            if local_cpu_backend is None:
                raise ValueError("LMCache passed no local_cpu_backend to allocate decoded chunks from")
            self.store = store_from_options(store, max_bytes)
            self.max_tokens = int(getattr(config, "chunk_size", 0) or CHUNK_TOKENS)
        except (ValueError, OSError, CodecError) as exc:
            log.error("=" * 80)
            log.error("kvtc storage plugin NOT created, so LMCache runs WITHOUT the KVTC tier: %s", exc)
            log.error("=" * 80)
            raise
        log.info("kvtc storage plugin: ratio %s, up to %.2f GB of blobs in the %s", options.ratio, max_bytes / 2**30,
                 self.store)

    def __str__(self) -> str:
        return "KVTCStoragePlugin"

    @staticmethod
    def _object_key(key) -> ObjectKey:
        world, worker = int(getattr(key, "world_size", 1)), int(getattr(key, "worker_id", 0))
        rank = ObjectKey.ComputeKVRank(world_size=world, global_rank=worker, local_world_size=world, local_rank=worker)
        return ObjectKey(chunk_hash=str(key.chunk_hash).encode(), model_name=key.model_name, kv_rank=rank)

    @staticmethod
    def _name(key) -> str:
        """The record's name: LMCache's own key string (model, ranks, chunk hash, dtype, tags)."""
        return key.to_string()

    def contains(self, key, pin: bool = False) -> bool:
        return self.store.contains(self._name(key))

    def exists_in_put_tasks(self, key) -> bool:
        return False  # puts are synchronous

    def batched_submit_put_task(self, keys, objs, transfer_spec=None, on_complete_callback=None):
        for key, obj in zip(keys, objs, strict=True):
            try:
                blob = self.engine.encode([obj.tensor], self._object_key(key))
            except CodecError:
                continue  # logged by the engine; this chunk is simply not in this tier
            record = pack_record(blob, obj.get_shape(), obj.get_dtype(), obj.get_memory_format())
            if self.store.put(self._name(key), record) and on_complete_callback is not None:
                try:
                    on_complete_callback(key)
                except Exception:
                    log.exception("kvtc: put completion callback failed")
        return None

    def get_blocking(self, key):
        name = self._name(key)
        record = self.store.get(name)
        if record is None:
            return None
        try:
            tensor, fmt = decode_record(self.engine, record, self.max_tokens)
        except CodecError as exc:
            self.engine.stats.load_failed(type(exc).__name__)
            log.error("kvtc: record for %s failed validation (%s): dropped, reporting a miss", key, exc)
            self.store.remove(name)
            return None
        obj = self.local_cpu_backend.allocate(tensor.shape, tensor.dtype, fmt=fmt)
        if obj is None:
            return None
        obj.tensor.copy_(tensor)
        return obj

    def pin(self, key) -> bool:
        return self.contains(key)

    def unpin(self, key) -> bool:
        return self.contains(key)

    def remove(self, key, force: bool = True) -> bool:
        return self.store.remove(self._name(key))

    def get_allocator_backend(self):
        return self.local_cpu_backend

    def stored_bytes(self) -> int:
        return self.store.used_bytes()

    def close(self) -> None:
        self.store.close()


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
    options, max_bytes, store = options_from_extra_config(extra)
    KVTCEngine(options)  # loads and checks the calibration(s)
    store_from_options(store, max_bytes).close()  # the store settings are complete, the directory exists
    return options


if __name__ == "__main__":
    try:
        print(check_config_file(sys.argv[1]))
    except (IndexError, ValueError, CodecError) as exc:
        sys.exit(f"kvtc classic config check failed: {exc}")
