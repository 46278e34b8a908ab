"""The ``kvtc`` command and the main job (``python -m calibration.roundtrip``), end to end on a real model."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import prepared
import pytest
import torch

from calibration import models
from calibration.roundtrip import format_report, run
from lmcache_kvtc import Calibration, KVTCCodec
from lmcache_kvtc.calibrate.driver import KEY_WEIGHT_CANDIDATES, NORMALIZATIONS
from lmcache_kvtc.cli import key_weight, main

REPO = Path(__file__).resolve().parents[1]


def test_roundtrip_main_job_reports_honest_sizes_and_small_loss(small_calibration_path, tmp_path):
    result = run(calibration=small_calibration_path, ratio=16, context=512, continuation=64, generate=8, lmcache=True,
                 blob_path=tmp_path / "rt.kvtc")
    blob = (tmp_path / "rt.kvtc").read_bytes()
    sizes = result["blob"]["bytes"]
    assert sizes["blob"] == len(blob) and sizes["raw"] == 2 * 24 * 512 * 128 * 2
    assert result["exact_tokens_identical"]
    assert result["blob"]["ratio"]["region_pre_entropy"] < result["blob"]["ratio"]["region"] / 2
    assert 8 < result["blob"]["ratio"]["region"] < 32
    assert result["blob"]["ratio"]["overall"] == pytest.approx(sizes["raw"] / len(blob))
    assert 0 < result["relative_error"]["keys"] < 0.2 and 0 < result["relative_error"]["values"] < 0.6
    assert abs(result["quality"]["delta_nll"]) < 0.5 and result["quality"]["kl"] < 0.5
    assert result["samples"]["kvtc"] and "ratio of compressed region" in format_report(result)
    tiers = result["lmcache"]  # the same cache through LMCache's StorageManager, kvtc serde and fs tier
    assert tiers["loaded_chunks"] == tiers["chunks"] == 2 and tiers["positions_right"] == 2
    assert max(tiers["stored_bytes"]) < tiers["raw_bytes_per_chunk"] / 8
    assert tiers["quality"]["kl"] < 0.5


def test_the_main_job_command_prints_its_report_without_lmcaches_info_lines(small_calibration_path, tmp_path):
    done = subprocess.run([sys.executable, "-m", "calibration.roundtrip", "--calibration", str(small_calibration_path),
                           "--context", "512", "--ratio", "16", "--blob", str(tmp_path / "rt.kvtc")],
                          capture_output=True, text=True, cwd=REPO, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "KVTC round trip" in done.stdout and "through LMCache 0.5.6" in done.stdout
    assert "chunk positions estimated right: 2/2" in done.stdout
    assert "LMCache INFO" not in done.stdout + done.stderr  # LMCACHE_LOG_LEVEL=INFO shows them


def test_inspect_explains_a_blob_and_flags_a_bad_one(small_calibration_path, eval_kv, tmp_path, capsys):
    calibration = Calibration.load(small_calibration_path)
    blob_path = tmp_path / "x.kvtc"
    blob_path.write_bytes(KVTCCodec(calibration).encode(eval_kv[0], plan=calibration.plan_index(8)))
    assert main(["inspect", str(blob_path), "--calibration", str(small_calibration_path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layout"] == [2, 24, 640, 128] and info["decodes_with"] == str(small_calibration_path)
    assert info["calibration_fingerprint"] == calibration.fingerprint.hex()
    data = bytearray(blob_path.read_bytes())
    data[len(data) // 2] ^= 0x10
    blob_path.write_bytes(data)
    assert main(["inspect", str(blob_path)]) == 2
    assert "CorruptBlobError" in capsys.readouterr().err


def test_key_weight_option_accepts_auto_equal_or_a_positive_number():
    assert (key_weight("auto"), key_weight("equal"), key_weight("16")) == ("auto", None, 16.0)
    for bad in ("even", "0", "-2", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match="positive number"):
            key_weight(bad)


def test_calibrate_command_writes_a_loadable_calibration_and_report(qwen05, tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(prepared.text("sotu")[:40]))
    out = tmp_path / "cal.safetensors"
    directory = str(models.model_dir("qwen2.5-coder-0.5b"))
    assert main(["calibrate", "--model", directory, "--text", str(text), "--tokens", "4096",
                 "--context", "1024", "--ratios", "8", "16", "--out", str(out)]) == 0
    calibration = Calibration.load(out)
    assert calibration.ratios == [8.0, 16.0] and calibration.info["source"] == str(text)
    tuning = calibration.info["tuning"]  # auto measured every normalization × K/V split
    assert len(tuning) == len(NORMALIZATIONS) * len(KEY_WEIGHT_CANDIDATES)
    assert f"normalize={calibration.info['normalize']} key_weight={calibration.info['key_weight']}" in tuning
    assert (calibration.streams["values"].scale is None) == (calibration.info["normalize"] == "none")
    report = out.with_suffix(".report")
    assert (report / "report.md").is_file() and (report / "rate_distortion.png").stat().st_size > 1000
    assert torch.isfinite(calibration.streams["keys"].basis).all()
