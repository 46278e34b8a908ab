"""Helpers shared by the LMCache integration tests (not fixtures: plain functions)."""

from __future__ import annotations

from pathlib import Path

import torch
from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey

from lmcache_kvtc import KVTCCodec
from lmcache_kvtc.lmcache.serde import KVTCDeserializer, KVTCSerializer


def standalone(calibration, chunk: torch.Tensor, start: int, ratio: float = 16, budget: int | None = None):
    """What the codec alone returns for a chunk at a known position, coded the way the serde codes it:
    sinks 4, no window, within ``budget`` bytes (default: the chunk's bytes / ``ratio``)."""
    codec = KVTCCodec(calibration)
    budget = int(chunk.numel() * chunk.element_size() // ratio) if budget is None else budget
    return codec.decode(codec.encode_within(chunk, budget=budget, start=start, sinks=4, window=0))


def memory_obj(tensors: list[torch.Tensor]):
    """A CPU LMCache ``TensorMemoryObj`` holding one or several kernel groups back to back."""
    from lmcache.v1.memory_management import MemoryFormat, MemoryObjMetadata, TensorMemoryObj

    raw = torch.cat([t.contiguous().view(-1).view(torch.uint8) for t in tensors])
    return TensorMemoryObj(
        raw_data=raw,
        metadata=MemoryObjMetadata(
            shape=tensors[0].shape, dtype=tensors[0].dtype, address=-1, phy_size=raw.numel(), ref_count=1,
            fmt=MemoryFormat.KV_2LTD, shapes=[t.shape for t in tensors], dtypes=[t.dtype for t in tensors],
        ),
        parent_allocator=None,
    )


def byte_buffer(size: int):
    return memory_obj([torch.zeros(size, dtype=torch.uint8)])


KEY = ObjectKey(chunk_hash=b"\x01" * 32, model_name="qwen2.5-coder-0.5b", kv_rank=0)


def roundtrip(engine, tensors: list[torch.Tensor], key: ObjectKey = KEY):
    """``(bytes written, stored buffer, restored groups)`` of one object through the serde's serializer and
    deserializer."""
    src = memory_obj(tensors)
    size = KVTCSerializer(engine).estimate_serialized_size(MemoryLayoutDesc(src.get_shapes(), src.get_dtypes()))
    dst = byte_buffer(size)
    written = KVTCSerializer(engine).serialize(src, dst, key)
    out = memory_obj([torch.zeros_like(t) for t in tensors])
    KVTCDeserializer(engine).deserialize(dst, out, key)
    return written, dst, [out.get_tensor(i) for i in range(len(tensors))]


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


LOADER = {"type": "plugin", "module_path": "lmcache_kvtc.lmcache.loader", "class_name": "KVTCLoaderAdapter"}


def redis_storage_manager(redis_server, calibration_path, reconnect_seconds: float):
    """``(StorageManager, listener)``: one L2 tier, the test's Redis behind the kvtc loader adapter (which
    rebuilds 0.5.6's connection after an outage), kvtc serde at 16x."""
    from calibration import tiers

    inner = {"type": "resp", "host": redis_server.host, "port": redis_server.port}
    spec = tiers.with_kvtc({**LOADER, "adapter_params": {"inner": inner, "reconnect_seconds": reconnect_seconds}},
                           str(calibration_path), 16)
    sm = tiers.storage_manager([spec])
    listener = tiers.StoreListener()
    sm.register_l2_listener(listener)
    return sm, listener
