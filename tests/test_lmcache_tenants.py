"""Tenants on the real LMCache 0.5.6 MP path: one ``cache_salt`` never decodes another's objects; sealed blobs
(AES-GCM per salt, bound to their key) open only for the key they were stored under."""

from __future__ import annotations

import os

import pytest
import torch
from lmcache.v1.distributed.api import ObjectKey
from lmcache.v1.distributed.serde.key_provider import HkdfKeyProvider, KeyProvider
from lmcache_helpers import stored_files

from calibration import tiers
from lmcache_kvtc.errors import SealError
from lmcache_kvtc.lmcache import sealing
from lmcache_kvtc.lmcache.serde import KVTCEngine, SerdeOptions


@pytest.fixture(scope="module")
def chunk(eval_kv):
    kv, _ = eval_kv
    return kv[:, :, :256].contiguous()


@pytest.fixture
def master_key(tmp_path):
    path = tmp_path / "master.key"
    path.write_bytes(os.urandom(32))
    return str(path)


def round_trip(root, calibration_path, chunk, store_salt: str, load_salt: str, edit=None, store_serde=None,
               load_serde=None):
    """Store ``chunk`` under ``store_salt`` through one server, then load it under ``load_salt`` through a
    fresh one (L1 empty), ``edit`` applied to the stored file in between. Returns (loaded chunks, L2 hits)."""
    seed, root = os.urandom(16), root / "l2"
    adapter = {"type": "fs", "base_path": str(root)}
    sm = tiers.storage_manager([tiers.with_kvtc(adapter, str(calibration_path), 16, **(store_serde or {}))])
    listener = tiers.StoreListener()
    sm.register_l2_listener(listener)
    keys = tiers.chunk_keys("qwen", 1, seed=seed, cache_salt=store_salt)
    try:
        tiers.store(sm, keys, [chunk])
        assert tiers.wait_stored(sm, listener, keys) == 1
    finally:
        sm.close()
    if edit:
        edit(root)
    sm = tiers.storage_manager([tiers.with_kvtc(adapter, str(calibration_path), 16, **(load_serde or store_serde
                                                                                        or {}))])
    try:
        return tiers.load(sm, tiers.chunk_keys("qwen", 1, seed=seed, cache_salt=load_salt), chunk.shape,
                          torch.bfloat16)
    finally:
        sm.close()


def move_salt(old: str, new: str):
    """What an attacker with write access to the tier does: file another tenant's object under this key."""
    def rename(root):
        (victim,) = stored_files(root)
        assert victim.name.endswith(f"@{old}.data")
        victim.rename(victim.with_name(victim.name.replace(f"@{old}.data", f"@{new}.data")))
    return rename


def test_an_object_stored_for_one_cache_salt_is_a_miss_for_another(chunk, small_calibration_path, tmp_path):
    loaded, hits = round_trip(tmp_path, small_calibration_path, chunk, "alice", "bob")
    assert (loaded, hits) == ([], 0)
    loaded, hits = round_trip(tmp_path / "again", small_calibration_path, chunk, "alice", "alice")
    assert hits == 1 and len(loaded) == 1


def test_sealed_blobs_decode_exactly_like_unsealed_ones_and_hide_the_blob(chunk, small_calibration_path,
                                                                          master_key, tmp_path):
    plain, _ = round_trip(tmp_path / "plain", small_calibration_path, chunk, "alice", "alice")
    sealed, hits = round_trip(tmp_path / "sealed", small_calibration_path, chunk, "alice", "alice",
                              store_serde={"master_key_path": master_key})
    assert hits == 1 and torch.equal(sealed[0], plain[0])
    (stored,) = stored_files(tmp_path / "sealed" / "l2")
    estimate = KVTCEngine(SerdeOptions(str(small_calibration_path), ratio=16)).estimate([chunk.shape], [torch.bfloat16])
    assert stored.stat().st_size == estimate + sealing.OVERHEAD
    data = stored.read_bytes()
    assert data[:4] == sealing.MAGIC and b"KVTC" not in data  # the blob's own header is not readable at rest


def test_a_sealed_object_filed_under_another_tenants_key_is_a_miss(chunk, small_calibration_path, master_key,
                                                                   tmp_path, caplog):
    loaded, hits = round_trip(tmp_path, small_calibration_path, chunk, "alice", "bob",
                              edit=move_salt("alice", "bob"), store_serde={"master_key_path": master_key})
    assert loaded == [] and hits == 0
    assert "does not open under this key" in caplog.text


def test_a_sealed_object_read_with_another_master_key_is_a_miss(chunk, small_calibration_path, master_key, tmp_path,
                                                                caplog):
    other = tmp_path / "other.key"
    other.write_bytes(os.urandom(32))
    loaded, hits = round_trip(tmp_path, small_calibration_path, chunk, "alice", "alice",
                              store_serde={"master_key_path": master_key}, load_serde={"master_key_path": str(other)})
    assert loaded == [] and hits == 0
    assert "does not open under this key" in caplog.text


def test_a_sealed_serde_refuses_a_planted_unsealed_blob(chunk, small_calibration_path, master_key, tmp_path, caplog):
    def pad_to_the_sealed_size(root):  # 0.5.6's fs tier loads only objects of the serde's estimated size
        (planted,) = stored_files(root)
        planted.write_bytes(planted.read_bytes() + bytes(sealing.OVERHEAD))

    loaded, hits = round_trip(tmp_path, small_calibration_path, chunk, "alice", "alice", edit=pad_to_the_sealed_size,
                              load_serde={"master_key_path": master_key})
    assert loaded == [] and hits == 0
    assert "not a sealed kvtc object" in caplog.text


@pytest.mark.parametrize("edit", ["header byte", "length field", "ciphertext byte", "tag byte", "truncated"])
def test_any_change_to_a_sealed_frame_is_a_seal_error(edit):
    sealer = sealing.Sealer(hkdf(128), aes_bits=128)
    key = ObjectKey(chunk_hash=b"\x01" * 32, model_name="m", kv_rank=0, cache_salt="alice")
    frame = bytearray(sealer.seal(b"kv" * 100, key))
    assert sealer.open(bytes(frame), key) == b"kv" * 100
    at = {"header byte": 6, "ciphertext byte": 40, "tag byte": len(frame) - 1}
    if edit in at:
        frame[at[edit]] ^= 1
    elif edit == "length field":
        frame[18:22] = (2**32 - 1).to_bytes(4, "little")
    else:
        frame = frame[:-1]
    with pytest.raises(SealError):
        sealer.open(bytes(frame), key)


@pytest.mark.parametrize("field", ["chunk_hash", "model_name", "kv_rank", "object_group_id", "cache_salt"])
def test_a_sealed_frame_opens_only_under_the_exact_key_it_was_sealed_for(field):
    sealer = sealing.Sealer(OneKeyForAll(), aes_bits=256)
    fields = {"chunk_hash": b"\x01" * 32, "model_name": "m", "kv_rank": 0, "object_group_id": 0, "cache_salt": "a"}
    frame = sealer.seal(b"kv", ObjectKey(**fields))
    other = {"chunk_hash": b"\x02" * 32, "model_name": "n", "kv_rank": 1, "object_group_id": 1, "cache_salt": "b"}
    with pytest.raises(SealError):  # the tenant key is the same: only the associated data can refuse it
        sealer.open(frame, ObjectKey(**{**fields, field: other[field]}))


def test_a_short_master_key_or_odd_key_size_is_refused_at_start_up(tmp_path):
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 16)
    with pytest.raises(ValueError, match="at least 32"):
        sealing.Sealer.from_master_key_file(str(short))
    with pytest.raises(ValueError, match="aes_bits"):
        sealing.Sealer(hkdf(128), aes_bits=192)


def hkdf(bits: int) -> HkdfKeyProvider:
    return HkdfKeyProvider(os.urandom(32), key_len=bits // 8, info_prefix=sealing.HKDF_INFO_PREFIX)


class OneKeyForAll(KeyProvider):
    """One key for every salt, so that only the associated data can tell two object keys apart."""

    def get_key(self, cache_salt: str) -> bytes:
        return b"k" * 32
