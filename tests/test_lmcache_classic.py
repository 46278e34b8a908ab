"""The classic path: LMCacheEngine (as LMCacheConnectorV1 drives it) + the kvtc storage plugin, on CPU.

A 15-line CPU "GPU connector" stands in for vLLM's paged KV; the YAML is parsed by
``LMCacheEngineConfig.from_file`` and the plugin is loaded by LMCache's own storage-plugin launcher.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from lmcache.utils import mock_up_broadcast_fn, mock_up_broadcast_object_fn
from lmcache.v1.cache_engine import LMCacheEngineBuilder
from lmcache.v1.config import LMCacheEngineConfig
from lmcache.v1.gpu_connector.gpu_connectors import GPUConnectorInterface
from lmcache.v1.metadata import LMCacheMetadata
from lmcache_helpers import standalone

from lmcache_kvtc.lmcache.classic import KVTCStoragePlugin, options_from_extra_config
from lmcache_kvtc.lmcache.options import SerdeOptions

YAML = """
chunk_size: 256
local_cpu: true
max_local_cpu_size: 0.2
storage_plugins: ["kvtc"]
extra_config:
  storage_plugin.kvtc.module_path: lmcache_kvtc.lmcache.classic
  storage_plugin.kvtc.class_name: KVTCStoragePlugin
  kvtc.calibration: {calibration}
  kvtc.ratio: 16
  kvtc.max_size_gb: {limit}
{store}"""


class CPUConnector(GPUConnectorInterface):
    """Copies between LMCache chunks and a CPU ``[2, L, T, H·D]`` tensor passed as ``kvcaches``."""

    def __init__(self, layers: int, hidden: int):
        self.layers, self.hidden = layers, hidden

    def from_gpu(self, memory_obj, start, end, **kw):
        memory_obj.tensor.copy_(kw["kvcaches"][:, :, start:end])

    def to_gpu(self, memory_obj, start, end, **kw):
        kw["kvcaches"][:, :, start:end].copy_(memory_obj.tensor)

    def batched_from_gpu(self, memory_objs, starts, ends, **kw):
        for m, s, e in zip(memory_objs, starts, ends, strict=True):
            self.from_gpu(m, s, e, **kw)

    def batched_to_gpu(self, memory_objs, starts, ends, **kw):
        for m, s, e in zip(memory_objs, starts, ends, strict=True):
            self.to_gpu(m, s, e, **kw)

    def get_shape(self, num_tokens: int) -> torch.Size:
        return torch.Size([2, self.layers, num_tokens, self.hidden])


def engine_for(yaml_path, calibration, name):
    config = LMCacheEngineConfig.from_file(str(yaml_path))
    metadata = LMCacheMetadata(calibration.model_id, 1, 1, 0, 0, torch.bfloat16,
                               (calibration.layers, 2, 256, calibration.kv_heads, calibration.head_dim))
    engine = LMCacheEngineBuilder.get_or_create(name, config, metadata,
                                                CPUConnector(calibration.layers, calibration.hidden),
                                                mock_up_broadcast_fn, mock_up_broadcast_object_fn)
    engine.post_init()
    return engine


def store_yaml(store: str, tmp_path, redis_server) -> str:
    if store == "disk":
        return f"  kvtc.store: disk\n  kvtc.path: {tmp_path / 'kvtc-store'}\n"
    if store == "redis":
        return f"  kvtc.store: redis\n  kvtc.redis_url: redis://{redis_server.host}:{redis_server.port}/0\n"
    return ""


@pytest.fixture
def maybe_redis(request):
    """A real redis-server only for the cases that use one."""
    return request.getfixturevalue("redis_server") if request.node.callspec.params.get("store") == "redis" else None


@pytest.mark.parametrize("store", ["ram", "disk", "redis"])
def test_engine_store_and_retrieve_through_the_kvtc_tier(eval_kv, small_calibration, small_calibration_path,
                                                         tmp_path, monkeypatch, store, maybe_redis):
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    kv, ids = eval_kv
    prefix, tokens = kv[:, :, :512].contiguous(), ids[:512]
    path = tmp_path / "lmcache.yaml"
    path.write_text(YAML.format(calibration=small_calibration_path, limit=1.0,
                                store=store_yaml(store, tmp_path, maybe_redis)))
    engine = engine_for(path, small_calibration, "kvtc-classic-test")
    try:
        backends = engine.storage_manager.storage_backends
        plugin = backends["kvtc"]
        assert isinstance(plugin, KVTCStoragePlugin)
        engine.store(tokens, kvcaches=prefix)
        assert 0 < plugin.stored_bytes() < prefix.numel() * 2 / 8
    finally:
        LMCacheEngineBuilder.destroy("kvtc-classic-test")
    if store == "disk":
        assert len(list((tmp_path / "kvtc-store").glob("*.kvtc"))) == 2
    if store == "redis":
        import redis

        assert len(list(redis.Redis(host=maybe_redis.host, port=maybe_redis.port).scan_iter("kvtc:*"))) == 2
    if store != "ram":  # a new engine (a restarted vLLM) finds the chunks on disk / in Redis
        engine = engine_for(path, small_calibration, "kvtc-classic-test-2")
    else:
        engine = engine_for(path, small_calibration, "kvtc-classic-test-2")
        engine.store(tokens, kvcaches=prefix)
        engine.clear(locations=["LocalCPUBackend"])
    try:
        out = torch.zeros_like(prefix)
        retrieved = engine.retrieve(tokens, kvcaches=out)
    finally:
        LMCacheEngineBuilder.destroy("kvtc-classic-test-2")
    assert int(retrieved.sum()) == 512
    for start in (0, 256):
        chunk = prefix[:, :, start : start + 256]
        assert torch.equal(out[:, :, start : start + 256], standalone(small_calibration, chunk, start))


def test_a_broken_plugin_config_is_loud(small_calibration, tmp_path, caplog):
    path = tmp_path / "broken.yaml"
    path.write_text(YAML.format(calibration=tmp_path / "missing.safetensors", limit=1.0, store=""))
    result = subprocess.run([sys.executable, "-m", "lmcache_kvtc.lmcache.classic", str(path)],
                            capture_output=True, text=True, timeout=120, env={**os.environ})
    assert result.returncode != 0 and "kvtc classic config check failed" in result.stderr
    engine = engine_for(path, small_calibration, "kvtc-classic-broken")
    try:
        assert "kvtc" not in engine.storage_manager.storage_backends  # LMCache dropped it...
    finally:
        LMCacheEngineBuilder.destroy("kvtc-classic-broken")
    assert "kvtc storage plugin NOT created" in caplog.text  # ...but not silently


@pytest.mark.parametrize(("key", "value", "accepted"), [("ratio", 16, True), ("ratio", "16", False),
                                                     ("sinks", 4.0, False), ("sinks", True, False),
                                                     ("device", "cpu", True), ("max_position", 0, False)])
def test_the_classic_plugin_and_the_mp_serde_read_an_option_the_same_way(key, value, accepted):
    """One parser: a value the MP serde's JSON refuses, the classic YAML refuses too (and the reverse)."""
    def parse_mp():
        return SerdeOptions.from_kwargs({"calibration": "/c", key: value})

    def parse_classic():
        return options_from_extra_config({"kvtc.calibration": "/c", f"kvtc.{key}": value})[0]

    if accepted:
        assert getattr(parse_mp(), key) == getattr(parse_classic(), key) == value
    else:
        for parse, source in ((parse_mp, "kvtc serde: "), (parse_classic, "kvtc.")):
            with pytest.raises(ValueError, match=source.replace(".", r"\.")):
                parse()
