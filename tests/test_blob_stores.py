"""The classic plugin's stores: byte limits, LRU eviction, persistence, and faults that become misses."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from lmcache.v1.memory_management import MemoryFormat

from lmcache_kvtc.errors import CorruptBlobError
from lmcache_kvtc.lmcache.blob_stores import DiskStore, MemoryStore, RedisStore, _file_name
from lmcache_kvtc.lmcache.classic import pack_record, unpack_record


def make_store(kind: str, tmp_path, redis_server, limit: int):
    if kind == "ram":
        return MemoryStore(limit)
    if kind == "disk":
        return DiskStore(str(tmp_path / "store"), limit)
    return RedisStore(f"redis://{redis_server.host}:{redis_server.port}/0", limit)


@pytest.fixture
def redis_or_none(request):
    return request.getfixturevalue("redis_server") if request.node.callspec.params.get("kind") == "redis" else None


@pytest.mark.parametrize("kind", ["ram", "disk", "redis"])
def test_the_least_recently_used_record_goes_first_and_the_limit_holds(kind, tmp_path, redis_or_none):
    store = make_store(kind, tmp_path, redis_or_none, limit=250)
    assert store.put("a", b"a" * 100) and store.put("b", b"b" * 100)
    assert store.get("a") == b"a" * 100  # "a" is now the most recent
    assert store.put("c", b"c" * 100)
    assert store.used_bytes() <= 250
    assert store.contains("a") and store.contains("c") and not store.contains("b")
    assert store.get("b") is None
    assert not store.put("huge", b"x" * 251)  # larger than the whole store: refused, nothing evicted
    assert store.contains("a") and store.contains("c")
    assert store.remove("a") and not store.contains("a") and store.get("a") is None


@pytest.mark.parametrize("kind", ["disk", "redis"])
def test_records_survive_the_process_and_are_found_by_another(kind, tmp_path, redis_or_none):
    first = make_store(kind, tmp_path, redis_or_none, limit=1000)
    assert first.put("chunk-1", b"1" * 300)
    other = make_store(kind, tmp_path, redis_or_none, limit=1000)  # a restarted or second process
    assert other.contains("chunk-1") and other.get("chunk-1") == b"1" * 300
    assert first.put("chunk-2", b"2" * 300)  # written after `other` started: found on lookup
    assert other.contains("chunk-2") and other.get("chunk-2") == b"2" * 300


def test_a_smaller_limit_on_restart_evicts_the_oldest_files(tmp_path):
    store = DiskStore(str(tmp_path / "store"), 1000)
    for i in range(5):
        store.put(f"r{i}", bytes([i]) * 150)
        os.utime(store.path / _file_name(f"r{i}"), (1000 + i, 1000 + i))  # distinct mtimes, in order
    smaller = DiskStore(str(tmp_path / "store"), 400)
    assert smaller.used_bytes() <= 400
    assert [smaller.contains(f"r{i}") for i in range(5)] == [False, False, False, True, True]
    assert len(list(smaller.path.glob("*.kvtc"))) == 2


def test_a_full_disk_is_a_record_not_kept_never_an_exception(tmp_path, monkeypatch, caplog):
    """ENOSPC cannot be produced on this machine's disk without root mounts: ``os.replace`` raises it instead."""
    store = DiskStore(str(tmp_path / "store"), 10_000)
    assert store.put("kept", b"k" * 10)

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    assert not store.put("lost", b"l" * 10)
    assert not store.contains("lost") and store.get("kept") == b"k" * 10
    assert not list(store.path.glob(".tmp-*")), "the partial file is removed"
    assert "No space left on device" in caplog.text


def test_redis_down_is_a_miss_and_the_store_works_again_when_it_is_back(redis_server, caplog):
    store = RedisStore(f"redis://{redis_server.host}:{redis_server.port}/0", 10_000)
    assert store.put("a", b"a" * 10)
    redis_server.stop()
    assert not store.put("b", b"b" * 10)
    assert store.get("a") is None and not store.contains("b")
    assert "failed" in caplog.text
    redis_server.start()  # a fresh, empty Redis on the same port
    assert store.put("c", b"c" * 10) and store.get("c") == b"c" * 10


SHAPE = torch.Size([2, 24, 256, 128])
RECORD = pack_record(b"BLOB", SHAPE, torch.bfloat16, MemoryFormat.KV_2LTD)


def test_a_record_round_trips():
    blob, shape, dtype, fmt = unpack_record(RECORD)
    assert bytes(blob) == b"BLOB" and shape == SHAPE and dtype == torch.bfloat16 and fmt == MemoryFormat.KV_2LTD


@pytest.mark.parametrize("forged", [
    RECORD[:5],                                            # shorter than the header
    b"XXXX" + RECORD[4:],                                  # magic
    RECORD[:4] + b"\x02\x00" + RECORD[6:],                 # version
    RECORD[:6] + b"\x09" + RECORD[7:],                     # dtype code
    RECORD[:7] + b"\xff" + RECORD[8:],                     # memory format
    RECORD[:8] + b"\x00" + RECORD[9:],                     # no dims
    RECORD[:8] + b"\x63" + RECORD[9:],                     # 99 dims
    RECORD[:9] + b"\x00\x00\x00\x00" + RECORD[13:],        # a zero dim
    RECORD[:15],                                           # ends inside the shape
], ids=["short", "magic", "version", "dtype", "format", "ndim0", "ndim99", "zero-dim", "cut-shape"])
def test_every_record_header_field_is_checked(forged):
    with pytest.raises(CorruptBlobError):
        unpack_record(forged)
