"""kvtc blobs in a Redis Cluster through LMCache 0.5.6's ``valkey`` L2 adapter (valkey-glide-sync, cluster mode):
a shared tier for several servers. A real 3-master cluster on loopback (``redis_cluster``), the real MP
StorageManager. What must hold: a second node with an empty L1 loads exactly what the first stored, a SIGKILLed
master costs misses only (never wrong KV, never an exception), and the tier works again once it is back."""

from __future__ import annotations

import time

import pytest
import torch
from lmcache.v1.distributed.l2_adapters.native_connector_l2_adapter import _object_key_to_string
from lmcache_helpers import LOADER, standalone
from prepared import missing

from calibration import tiers
from lmcache_kvtc import blob
from lmcache_kvtc.lmcache.serde import KVTCEngine, SerdeOptions, register

STARTS = (0, 256)


@pytest.fixture(scope="module", autouse=True)
def glide():
    try:
        import glide_sync  # noqa: F401  (what the valkey adapter imports on its worker threads)
    except ImportError:
        missing("valkey-glide-sync is not installed (pip install 'lmcache-kvtc[valkey]')")


@pytest.fixture(scope="module")
def chunks(eval_kv):
    kv, _ = eval_kv
    return [kv[:, :, i : i + 256].contiguous() for i in STARTS]


@pytest.fixture(scope="module")
def expected(chunks, small_calibration):
    """What a correct load of each chunk returns: the codec alone at the chunk's true position."""
    return [standalone(small_calibration, chunk, start) for chunk, start in zip(chunks, STARTS, strict=True)]


def valkey_spec(cluster, calibration_path, loader: bool) -> dict:
    """The ``valkey`` adapter in cluster mode with short timeouts and the kvtc serde at 16x; with ``loader``
    behind the kvtc loader adapter (what ``examples/lmcache_server_valkey_cluster.sh`` runs), which answers at
    once while the cluster is down and rebuilds the glide clients when it is back."""
    inner = {"type": "valkey", "startup_nodes": cluster.startup_nodes, "cluster_mode": True, "num_workers": 2,
             "request_timeout": 1.0, "connection_timeout": 2.0}
    spec = {**LOADER, "adapter_params": {"inner": inner, "reconnect_seconds": 0.5}} if loader else inner
    return tiers.with_kvtc(spec, str(calibration_path), 16)


def node(cluster, calibration_path, loader: bool, shm_name: str | None = None):
    """``(StorageManager, listener)``: one LMCache server's storage, the cluster its only L2 tier."""
    register()  # the plain spec is what kvtc-lmcache-server runs: the serde registered before LMCache starts
    sm = tiers.storage_manager([valkey_spec(cluster, calibration_path, loader)], shm_name=shm_name)
    listener = tiers.StoreListener()
    sm.register_l2_listener(listener)
    return sm, listener


def keys_on(cluster, model_name: str, masters) -> list:
    """Chunk keys (one rolling-hash prefix) whose slots the given masters serve, in order; deterministic."""
    for i in range(10_000):
        keys = tiers.chunk_keys(model_name, len(masters), seed=f"valkey-{i}".encode())
        if [cluster.master_of(_object_key_to_string(k)) for k in keys] == list(masters):
            return keys
    raise AssertionError(f"no prefix of {len(masters)} keys lands on masters {masters}")


def backend_up(sm) -> bool:
    return bool(sm.report_status()["l2_adapters"][0]["kvtc_reconnect"]["backend_up"])


def wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen in {timeout}s"
        time.sleep(0.1)


def assert_exact_or_missing(loaded: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    """A load may stop short (a miss), but every chunk it returns is exactly the stored one."""
    assert len(loaded) <= len(expected)
    for got, want in zip(loaded, expected, strict=False):
        assert torch.equal(got, want)


def test_a_second_node_loads_bit_identical_kv_from_blobs_spread_over_the_masters(
        chunks, expected, small_calibration_path, small_calibration, redis_cluster):
    name, shape = small_calibration.model_id, chunks[0].shape
    keys = keys_on(redis_cluster, name, (0, 1))
    writer, listener = node(redis_cluster, small_calibration_path, loader=False)
    reader = None
    try:
        tiers.store(writer, keys, chunks)
        assert tiers.wait_stored(writer, listener, keys) == 2
        assert sorted(redis_cluster.dbsizes()) == [0, 1, 1]  # one object per master of its slot
        # a second server (its own, empty L1) sharing the tier, behind the loader adapter
        reader, _ = node(redis_cluster, small_calibration_path, loader=True, shm_name="")
        loaded, hits = tiers.load(reader, keys, shape, torch.bfloat16)
    finally:
        writer.close()
        if reader is not None:
            reader.close()
    assert hits == 2 and len(loaded) == 2
    for got, want in zip(loaded, expected, strict=True):
        assert torch.equal(got, want)
    estimate = KVTCEngine(SerdeOptions(str(small_calibration_path), ratio=16)).estimate([shape], [torch.bfloat16])
    for key, start in zip(keys, STARTS, strict=True):
        wire = _object_key_to_string(key)
        value = redis_cluster.client(redis_cluster.master_of(wire)).get(wire)
        assert len(value) == estimate  # the fixed-size kvtc object, as is
        header, _ = blob.parse(value[: blob.extent(value)])
        assert header.model_id == name and header.start == start


def test_a_killed_master_costs_misses_only_and_the_tier_recovers(
        chunks, expected, small_calibration_path, small_calibration, redis_cluster):
    name, shape = small_calibration.model_id, chunks[0].shape
    before = keys_on(redis_cluster, name, (0, 1))
    victim = 1  # serves before[1]
    sm, listener = node(redis_cluster, small_calibration_path, loader=True)

    def load(keys):
        sm.clear(force=True)
        loaded, hits = tiers.load(sm, keys, shape, torch.bfloat16, timeout=30)
        assert_exact_or_missing(loaded, expected)
        return len(loaded), hits

    try:
        tiers.store(sm, before, chunks)
        assert tiers.wait_stored(sm, listener, before) == 2

        redis_cluster.kill(victim)
        loaded, hits = load(before)  # before the cluster notices: the victim's key times out, a miss
        assert loaded <= 1 and hits <= 1
        redis_cluster.wait_state("fail")  # the survivors refuse every key now
        wait_for(lambda: not backend_up(sm), "the loader noticing the failed cluster")
        assert load(before) == (0, 0)
        during = keys_on(redis_cluster, name, (0, 2))
        tiers.store(sm, during, chunks)
        assert tiers.wait_stored(sm, listener, during, timeout=30, settle=3) == 0  # failed cleanly
        assert sm.report_status()["store_controllers"]  # still alive

        redis_cluster.restart(victim)  # same port and cluster config file: it rejoins with its slots, empty
        wait_for(lambda: backend_up(sm), "the loader rebuilding the adapter")
        assert load(before) == (1, 1)  # the survivor kept its object; the victim's is gone
        after = keys_on(redis_cluster, name, (victim, 2))
        tiers.store(sm, after, chunks)
        assert tiers.wait_stored(sm, listener, after) == 2
        assert load(after) == (2, 2)  # exact: checked by load
    finally:
        sm.close()
