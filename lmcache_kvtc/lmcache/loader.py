"""A ``plugin`` L2 adapter whose job is to get ``kvtc`` registered before LMCache needs it.

LMCache 0.5.6 imports nothing by itself, and a serde type is resolved right after its adapter is
built. The ``plugin`` adapter type imports ``module_path`` while building the adapter, so this
module — which registers the serde on import — wraps a built-in ``inner`` adapter and delegates
to it::

    --l2-adapter '{"type": "plugin", "module_path": "lmcache_kvtc.lmcache.loader",
                   "class_name": "KVTCLoaderAdapter",
                   "adapter_params": {"inner": {"type": "fs", "base_path": "/data/l2"}},
                   "serde": {"type": "kvtc", "calibration": "/opt/kvtc/model.safetensors"}}'

The inner spec is parsed by LMCache's own config registry. ``adapter_params.reconnect_seconds``
(default 2 for ``resp``/``valkey``, 0 = off otherwise) rebuilds the inner adapter after a backend
outage, which 0.5.6's native Redis client does not do by itself (see :mod:`.reconnect`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lmcache.v1.distributed.l2_adapters import create_l2_adapter
from lmcache.v1.distributed.l2_adapters.config import L2AdapterConfigBase, get_l2_adapter_config_class

from .reconnect import ReconnectingAdapter
from .serde import register

register()

_NETWORK_TYPES = {"resp", "valkey"}
_PARAMS = {"inner", "reconnect_seconds"}


def inner_config(params: dict[str, Any]) -> L2AdapterConfigBase:
    """LMCache's config object for ``params["inner"]``, parsed the way ``--l2-adapter`` is."""
    inner = params.get("inner") if isinstance(params, dict) else None
    if not isinstance(inner, dict) or not isinstance(inner.get("type"), str):
        raise ValueError('KVTCLoaderAdapter needs adapter_params {"inner": {"type": <built-in adapter>, ...}}')
    unknown = set(params) - _PARAMS
    if unknown:
        raise ValueError(f"KVTCLoaderAdapter: unknown adapter_params {sorted(unknown)}; known: {sorted(_PARAMS)}")
    if inner["type"] == "plugin":
        raise ValueError("KVTCLoaderAdapter's inner adapter must be a built-in type, not another plugin")
    if inner.get("serde") is not None:
        raise ValueError("put 'serde' on the plugin adapter spec, not on its inner adapter")
    config = get_l2_adapter_config_class(inner["type"]).from_dict(inner)
    config.eviction_config = L2AdapterConfigBase._parse_eviction_config(inner)
    config.persist_config = L2AdapterConfigBase._parse_persist_config(inner)
    return config


def redis_probe(config: L2AdapterConfigBase) -> Callable[[], bool]:
    """A health probe through redis-py with short timeouts (the native client cannot tell us): a PING to
    ``resp``'s ``host:port`` or a standalone ``valkey``'s first startup node; for a ``valkey`` cluster, the first
    startup node that answers must report ``cluster_state:ok`` (a cluster missing a master serves nothing)."""
    import redis

    nodes = list(getattr(config, "startup_nodes", None) or [(config.host, config.port)])
    cluster = bool(getattr(config, "cluster_mode", False))
    clients = [redis.Redis(host=host, port=port, username=config.username or None, password=config.password or None,
                           ssl=bool(getattr(config, "tls_enable", False)), socket_timeout=0.5,
                           socket_connect_timeout=0.5)
               for host, port in (nodes if cluster else nodes[:1])]

    def probe() -> bool:
        for client in clients:
            try:
                if not cluster:
                    return bool(client.ping())
                return client.cluster("info").get("cluster_state") == "ok"
            except (redis.RedisError, OSError):
                continue  # this seed is down: ask the next
        return False

    return probe


class KVTCLoaderAdapter(ReconnectingAdapter):
    """The inner built-in adapter (rebuilt after outages when enabled); the plugin spec's serde wraps it."""

    def __init__(self, params: dict[str, Any], l1_memory_desc=None) -> None:
        config = inner_config(params)
        inner = params["inner"]
        network = inner["type"] in _NETWORK_TYPES
        retry = float(params.get("reconnect_seconds", 2.0 if network else 0.0))
        probe = redis_probe(config) if network and retry > 0 else None
        super().__init__(lambda: create_l2_adapter(config, l1_memory_desc), probe=probe, retry_seconds=retry,
                         name=inner["type"])
