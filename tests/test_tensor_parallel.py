"""Tensor parallelism: ``--tp`` writes one calibration per vLLM rank (fitted on the KV heads vLLM gives that rank) and
an index; through LMCache's real StorageManager each rank's objects (its head slice, keyed by ``kv_rank``) are coded
with that rank's file, and a rank no file describes is a miss with one log line."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import SMALL_MODEL
from lmcache.v1.distributed.api import ObjectKey
from lmcache_helpers import standalone, stored_files
from tiny_models import build, save

from calibration import tiers
from lmcache_kvtc import Calibration, CalibrationError
from lmcache_kvtc.calibrate.tensor_parallel import feature_index, file_name, rank_heads
from lmcache_kvtc.cli import main as kvtc
from lmcache_kvtc.inspect import describe
from lmcache_kvtc.lmcache.selection import CalibrationSet


def test_ranks_hold_the_kv_heads_vllm_gives_them():
    assert [rank_heads(8, 2, r) for r in range(2)] == [range(0, 4), range(4, 8)]
    assert [rank_heads(2, 2, r) for r in range(2)] == [range(0, 1), range(1, 2)]
    # more ranks than KV heads: vLLM replicates each head on tp_size / kv_heads consecutive ranks
    assert [rank_heads(2, 4, r) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    for kv_heads, tp_size, rank in ((3, 2, 0), (2, 3, 0), (4, 6, 0), (2, 2, 2), (2, 0, 0)):
        with pytest.raises(CalibrationError):
            rank_heads(kv_heads, tp_size, rank)


def test_a_ranks_features_are_its_heads_in_every_layer():
    assert feature_index(2, 4, 3, range(1, 3)).tolist() == [3, 4, 5, 6, 7, 8, 15, 16, 17, 18, 19, 20]


def test_kvtc_calibrate_tp_writes_a_rank_directory_and_refuses_sizes_vllm_cannot_shard(tokenizer, text_file,
                                                                                     tmp_path, capsys):
    model = build("llama", {"num_key_value_heads": 2}, len(tokenizer))
    directory = save(model, tokenizer, tmp_path / "model")
    common = ["calibrate", "--model", str(directory), "--text", str(text_file), "--tokens", "3072", "--context", "512",
              "--ratios", "8", "16", "--key-weight", "equal", "--normalize", "none"]
    with pytest.raises(CalibrationError, match="multiple of the 2 KV heads"):
        kvtc([*common, "--tp", "3", "--out", str(tmp_path / "bad")])
    assert "calibrating" not in capsys.readouterr().err and not (tmp_path / "bad").exists()  # before any prefill
    assert kvtc([*common, "--tp", "2", "--out", str(tmp_path / "tp")]) == 0
    selection = CalibrationSet.from_path(tmp_path / "tp")
    for rank in (0, 1):
        kv_rank = ObjectKey.ComputeKVRank(2, rank, 2, rank)
        chosen = selection.select("any/served-name", kv_rank, 0, 0, layers=2, hidden=model.config.head_dim)
        assert chosen.info["tp_rank"] == rank


def rank_file(directory, size: int, rank: int) -> Calibration:
    return Calibration.load(directory / file_name(SMALL_MODEL, size, rank))


def test_every_rank_gets_a_calibration_of_its_own_heads(small_tp_calibration):
    directory, whole = small_tp_calibration
    index = json.loads((directory / "index.json").read_text())["calibrations"]
    assert sorted((e["tp_size"], e["tp_rank"]) for e in index) == [(1, 0), (2, 0), (2, 1), (4, 0), (4, 1), (4, 2),
                                                                     (4, 3)]
    assert rank_file(directory, 1, 0).kv_heads == 2
    for rank in (0, 1):
        part = rank_file(directory, 2, rank)
        assert (part.kv_heads, part.info["heads"], part.info["tp_rank"]) == (1, [rank, rank + 1], rank)
        index = feature_index(whole.layers, whole.kv_heads, whole.head_dim, range(rank, rank + 1))
        for stream in ("keys", "values"):  # the rank's fit sees exactly its heads' features
            assert torch.allclose(part.streams[stream].mean, whole.streams[stream].mean[index])
        replica = rank_file(directory, 4, 2 * rank + 1)  # TP 4 replicates each head on two ranks
        assert torch.equal(replica.streams["keys"].basis, part.streams["keys"].basis)


def tp_keys(count: int, world: int, rank: int, prompt: bytes = b"one prompt") -> list[ObjectKey]:
    keys = tiers.chunk_keys(SMALL_MODEL, count, seed=prompt)  # the same chunk hashes on every rank
    kv_rank = ObjectKey.ComputeKVRank(world, rank, world, rank)
    return [dataclasses.replace(k, kv_rank=kv_rank) for k in keys]


def test_each_ranks_objects_are_coded_with_its_rank_calibration(small_tp_calibration, eval_kv, tmp_path, caplog):
    directory, whole = small_tp_calibration
    kv = eval_kv[0][:, :, :512]
    width = whole.head_dim  # TP 2 of 2 KV heads: one head per rank
    slices = [kv[..., r * width : (r + 1) * width].contiguous() for r in (0, 1)]
    adapter = tiers.with_kvtc({"type": "fs", "base_path": str(tmp_path / "l2")}, str(directory), 16)
    sm = tiers.storage_manager([adapter])
    listener = tiers.StoreListener()
    sm.register_l2_listener(listener)
    shape = slices[0][:, :, :256].shape
    try:
        for rank, part in enumerate(slices):
            keys = tp_keys(2, 2, rank)
            tiers.store(sm, keys, [part[:, :, :256].contiguous(), part[:, :, 256:].contiguous()])
            assert tiers.wait_stored(sm, listener, keys) == 2
        unknown = tp_keys(1, 3, 0, b"another prompt")  # TP 3: no file describes its ranks
        tiers.store(sm, unknown, [slices[0][:, :, :256].contiguous()])
        assert tiers.wait_stored(sm, listener, unknown, timeout=30) == 0
        sm.clear(force=True)
        restored = [tiers.load(sm, tp_keys(2, 2, rank), shape, torch.bfloat16)[0] for rank in (0, 1)]
        assert tiers.load(sm, unknown, shape, torch.bfloat16) == ([], 0)
    finally:
        sm.close()
    assert "no calibration in" in caplog.text
    fingerprints = {describe(f.read_bytes())["calibration_fingerprint"] for f in stored_files(tmp_path / "l2")}
    assert fingerprints == {rank_file(directory, 2, r).fingerprint.hex() for r in (0, 1)}
    for rank, chunks in enumerate(restored):
        assert len(chunks) == 2
        for start, chunk in zip((0, 256), chunks, strict=True):
            expected = standalone(rank_file(directory, 2, rank), slices[rank][:, :, start : start + 256], start)
            assert torch.equal(chunk, expected)
    joined = torch.cat([torch.cat(chunks, dim=2) for chunks in restored], dim=-1)
    assert float((joined.float() - kv.float()).norm() / kv.float().norm()) < 0.1
