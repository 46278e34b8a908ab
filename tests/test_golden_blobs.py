"""Blobs and a calibration written by an earlier build (``tests/golden/``, made by ``make_golden.py``) decode to
exactly the KV they decoded to then, and today's encoder still makes blobs that decode the same: a refactor
that changes the wire format, the calibration format or the numerics fails here. No model needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from synthetic import tensor_digest as digest

from lmcache_kvtc import Calibration, KVTCCodec
from lmcache_kvtc.lmcache.engine import KVTCEngine
from lmcache_kvtc.lmcache.options import SerdeOptions

GOLDEN = Path(__file__).parent / "golden"
MANIFEST = json.loads((GOLDEN / "manifest.json").read_text())
INPUTS = load_file(GOLDEN / "tensors.safetensors")


def inputs(name: str) -> list[torch.Tensor]:
    return [INPUTS[f"{name}.input.{i}"] for i in range(len(MANIFEST["blobs"][name]["decoded_sha256"]))]


def test_the_golden_calibration_loads_with_its_recorded_fingerprint():
    assert Calibration.load(GOLDEN / MANIFEST["calibration"]).fingerprint.hex() == MANIFEST["fingerprint"]


def test_a_golden_codec_blob_decodes_bit_identically_and_a_fresh_encode_still_matches_it():
    case, calibration = MANIFEST["blobs"]["codec"], Calibration.load(GOLDEN / MANIFEST["calibration"])
    codec = KVTCCodec(calibration)
    assert [digest(codec.decode((GOLDEN / case["file"]).read_bytes()))] == case["decoded_sha256"]
    (kv,) = inputs("codec")
    fresh = codec.encode(kv, plan=calibration.plan_index(case["ratio"]), start=case["start"], sinks=case["sinks"],
                         window=case["window"])
    assert [digest(codec.decode(fresh))] == case["decoded_sha256"]


@pytest.mark.parametrize("name", ["engine-split", "engine-two-groups"])
def test_a_golden_serde_object_decodes_bit_identically_and_a_fresh_encode_still_matches_it(name):
    case = MANIFEST["blobs"][name]
    engine = KVTCEngine(SerdeOptions(str(GOLDEN / MANIFEST["calibration"]), ratio=case["ratio"]))
    shapes, dtypes = [torch.Size(s) for s in case["shapes"]], [torch.bfloat16] * len(case["shapes"])
    stored = (GOLDEN / case["file"]).read_bytes()
    assert len(stored) == engine.estimate(shapes, dtypes)  # the fixed size an 0.5.6 tier expects
    assert [digest(kv) for kv in engine.decode(memoryview(stored), shapes, dtypes)] == case["decoded_sha256"]
    fresh = engine.encode(inputs(name), None)
    assert [digest(kv) for kv in engine.decode(memoryview(fresh), shapes, dtypes)] == case["decoded_sha256"]
