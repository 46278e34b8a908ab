"""Calibration files round-trip exactly; damaged or foreign files are refused."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmcache_kvtc import Calibration, CalibrationError


def test_calibration_file_roundtrips_exactly(small_calibration, tmp_path):
    path = tmp_path / "copy.safetensors"
    small_calibration.save(path)
    loaded = Calibration.load(path)
    assert loaded.fingerprint == small_calibration.fingerprint
    assert loaded.plans == small_calibration.plans
    assert loaded.model_id == small_calibration.model_id and loaded.info == small_calibration.info
    for stream in ("keys", "values"):
        assert torch.equal(loaded.streams[stream].basis, small_calibration.streams[stream].basis)
        assert torch.equal(loaded.streams[stream].mean, small_calibration.streams[stream].mean)
    assert torch.equal(loaded.rope.inv_freq, small_calibration.rope.inv_freq)


def test_changed_content_changes_the_fingerprint(small_calibration_path, tmp_path):
    tensors = load_file(str(small_calibration_path))
    from safetensors import safe_open

    with safe_open(str(small_calibration_path), "pt") as f:
        metadata = f.metadata()
    tensors["values.mean"][0] += 1e-3
    path = tmp_path / "edited.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    assert Calibration.load(path).fingerprint != Calibration.load(small_calibration_path).fingerprint


def test_damaged_or_foreign_files_are_refused(small_calibration_path, tmp_path):
    data = small_calibration_path.read_bytes()
    cases = {
        "missing.safetensors": None,
        "truncated.safetensors": data[: len(data) // 2],
        "garbage.safetensors": b"\x00" * 64,
        "pickle.pt": b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.",
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(CalibrationError):
            Calibration.load(path)


def test_inconsistent_plans_are_refused(small_calibration_path, tmp_path):
    from safetensors import safe_open

    tensors = load_file(str(small_calibration_path))
    with safe_open(str(small_calibration_path), "pt") as f:
        meta = json.loads(f.metadata()["kvtc"])
    path = tmp_path / "bad-plan.safetensors"
    keys = meta["plans"][0]["streams"]["keys"]
    for field, value, message in (("rank", 10**6, "components"), ("step", -1.0, "invalid"),
                                  ("step", float("nan"), "invalid"), ("wide", 10**6, "invalid")):
        saved, keys[field] = keys[field], value
        save_file(tensors, str(path), metadata={"kvtc": json.dumps(meta)})
        with pytest.raises(CalibrationError, match=message):
            Calibration.load(path)
        keys[field] = saved
    tensors["keys.basis"] = tensors["keys.basis"][:10]
    save_file(tensors, str(path), metadata={"kvtc": json.dumps(meta)})
    with pytest.raises(CalibrationError, match="features"):
        Calibration.load(path)


def test_layer_scale_is_stored_fingerprinted_and_validated(small_calibration, tmp_path):
    from safetensors import safe_open

    scale = torch.linspace(0.5, 2.0, small_calibration.features)
    streams = {s: dataclasses.replace(b, scale=scale.clone()) for s, b in small_calibration.streams.items()}
    scaled = dataclasses.replace(small_calibration, streams=streams)
    path = tmp_path / "scaled.safetensors"
    scaled.save(path)
    loaded = Calibration.load(path)
    assert torch.equal(loaded.streams["values"].scale, scale)
    assert loaded.fingerprint == scaled.fingerprint != small_calibration.fingerprint
    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors["keys.scale"][3] = -1.0
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CalibrationError, match="scale"):
        Calibration.load(path)


def test_fitted_bases_are_stored_in_fp16_and_older_fp32_bases_keep_their_fingerprint(small_calibration, tmp_path):
    fitted, old = tmp_path / "fitted.safetensors", tmp_path / "old.safetensors"
    small_calibration.save(fitted)
    assert all(t.dtype == torch.float16 for n, t in load_file(str(fitted)).items() if n.endswith(".basis"))
    streams = {s: dataclasses.replace(b, basis=b.basis + 1e-6) for s, b in small_calibration.streams.items()}
    fp32 = dataclasses.replace(small_calibration, streams=streams)  # values fp16 cannot hold: a pre-fp16 file
    fp32.save(old)
    assert all(t.dtype == torch.float32 for n, t in load_file(str(old)).items() if n.endswith(".basis"))
    for calibration, path in ((small_calibration, fitted), (fp32, old)):
        loaded = Calibration.load(path)
        assert loaded.fingerprint == calibration.fingerprint
        assert all(b.basis.dtype == torch.float32 for b in loaded.streams.values())
    assert fitted.stat().st_size < 0.75 * old.stat().st_size


def test_a_basis_of_another_dtype_is_refused(small_calibration_path, tmp_path):
    tensors = load_file(str(small_calibration_path))
    from safetensors import safe_open

    with safe_open(str(small_calibration_path), "pt") as f:
        metadata = f.metadata()
    tensors["keys.basis"] = tensors["keys.basis"].to(torch.int8)
    path = tmp_path / "int8.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(CalibrationError, match="fp16 or fp32"):
        Calibration.load(path)


def test_calibration_records_how_it_was_captured_and_fitted(small_calibration):
    info = small_calibration.info
    assert info["capture_dtype"] in ("bfloat16", "float32") and info["fit"] == "FeatureCovariance"
    assert set(info["stage_seconds"]) == {"capture", "fit_and_tuning"} and info["stage_seconds"]["capture"] > 0


def test_capture_runs_in_bf16_on_a_gpu_and_in_the_faster_dtype_on_this_cpu():
    from lmcache_kvtc.calibrate.capture import fastest_dtype

    assert fastest_dtype("cuda") == torch.bfloat16  # decided without touching a GPU
    assert fastest_dtype("cpu") in (torch.bfloat16, torch.float32)
