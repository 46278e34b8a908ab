"""The CPU reproduction of LMCache 0.5.6's ``turboquant`` serde (benchmarks.baselines.TurboQuant) against the serde.

Its GPU-free parts (presets, codebooks, rotations, size estimate) are compared exactly; where Triton is importable the
real serializer and deserializer also run, in Triton's CPU interpreter, and must give the same reconstruction.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lmcache.v1.distributed.api import MemoryLayoutDesc
from lmcache.v1.distributed.serde.turboquant import turboquant as tq

from benchmarks.baselines import (
    TURBOQUANT_PRESETS,
    TurboQuant,
    _tq_lloyd_max,
    _tq_mse_keys,
    _tq_rotation,
    turboquant_baselines,
)

REPO = Path(__file__).resolve().parents[1]
THREE = ["turboquant_k8v4", "turboquant_4bit_nc", "turboquant_3bit_nc"]


def _gaussian(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


def _rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x.float() - y.float()) ** 2).sum() / (x.float() ** 2).sum())


def test_presets_are_the_sources():
    source = {name: (int(p["key_quant_bits"]), int(p["value_quant_bits"]), bool(p["norm_correction"]))
              for name, p in tq.TQ_PRESETS.items()}
    assert TURBOQUANT_PRESETS == source
    assert [b.name for b in turboquant_baselines(128)] == [f"lmcache {p}" for p in THREE]
    assert all(isinstance(b, TurboQuant) and b.head_dim == 64 for b in turboquant_baselines(64))


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("bits", [3, 4])
def test_codebook_is_the_sources(head_dim, bits):
    centroids, midpoints = _tq_lloyd_max(head_dim, bits)
    ref_centroids, ref_midpoints = tq._solve_lloyd_max(head_dim, bits)
    assert torch.equal(centroids, ref_centroids) and torch.equal(midpoints, ref_midpoints)
    assert centroids.shape == (2**bits,) and midpoints.shape == (2**bits - 1,)


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("layer", [0, 2, 31])
def test_rotation_is_the_sources(head_dim, layer):
    cfg = tq.TurboQuantSerdeConfig(preset="turboquant_4bit_nc", head_dim=head_dim)
    pi_t, midpoints, centroids = tq._make_tq_tensors_for_layer(cfg, layer, torch.device("cpu"))
    assert torch.equal(_tq_rotation(head_dim, layer), pi_t)
    assert torch.equal(_tq_lloyd_max(head_dim, 4)[0], centroids)
    assert torch.equal(_tq_lloyd_max(head_dim, 4)[1], midpoints)
    assert torch.allclose(pi_t @ pi_t.T, torch.eye(head_dim), atol=1e-5)
    assert not torch.equal(_tq_rotation(head_dim, layer), _tq_rotation(head_dim, layer + 1))  # seeded per layer


@pytest.mark.parametrize("preset", list(TURBOQUANT_PRESETS))
@pytest.mark.parametrize("shape", [(2, 1, 5, 128), (2, 4, 16, 256), (2, 6, 33, 512), (2, 9, 1, 64)])
@pytest.mark.parametrize("skips", [(2, 2), (0, 0), (1, 3)])
def test_bytes_are_the_source_size_estimate(preset, shape, skips):
    head_dim = 64
    cfg = tq.TurboQuantSerdeConfig(preset=preset, head_dim=head_dim, skip_first_layers=skips[0],
                                   skip_last_layers=skips[1])
    codec = TurboQuant(preset, head_dim, skip_first_layers=skips[0], skip_last_layers=skips[1])
    assert codec.slot_bytes == cfg.slot_size_aligned
    expected = tq._serialized_nbytes_for_shape(torch.Size(shape), torch.bfloat16, cfg)
    estimate = tq.TurboQuantSerializer(cfg).estimate_serialized_size(MemoryLayoutDesc([torch.Size(shape)],
                                                                                      [torch.bfloat16]))
    assert codec.stored_bytes(shape, torch.bfloat16) == expected == estimate
    assert codec.roundtrip(_gaussian(*shape))[1] == expected


def test_bytes_by_hand():
    """head_dim 128, 8 layers of which the 2 first and 2 last stay bf16, 100 tokens padded to 7 blocks of 16."""
    raw = 2 * 4 * 100 * 1024 * 2
    slots = {"turboquant_k8v4": 128 + 64 + 4, "turboquant_4bit_nc": 64 + 2 + 64 + 4,
             "turboquant_k3v4_nc": 48 + 2 + 64 + 4, "turboquant_3bit_nc": 48 + 2 + 48 + 4}
    for preset, slot in slots.items():
        assert TurboQuant(preset, 128).stored_bytes((2, 8, 100, 1024), torch.bfloat16) == raw + 4 * 112 * 8 * slot


def test_shape_dtype_raw_layers_and_determinism():
    kv = _gaussian(2, 6, 20, 256)
    for codec in turboquant_baselines(64):
        out, _ = codec.roundtrip(kv)
        assert out.shape == kv.shape and out.dtype == kv.dtype
        assert torch.equal(out[:, :2], kv[:, :2]) and torch.equal(out[:, 4:], kv[:, 4:])  # skipped layers are raw
        assert not torch.equal(out[0, 2:4], kv[0, 2:4]) and not torch.equal(out[1, 2:4], kv[1, 2:4])
        assert torch.equal(codec.roundtrip(kv)[0], out)


def test_error_and_bytes_run_opposite_ways():
    kv = _gaussian(2, 4, 64, 512)  # head_dim 128, every layer quantized
    results = [TurboQuant(p, 128, skip_first_layers=0, skip_last_layers=0).roundtrip(kv) for p in THREE]
    key_errors = [_rel_err(kv[0], out[0]) for out, _ in results]
    value_errors = [_rel_err(kv[1], out[1]) for out, _ in results]
    errors = [_rel_err(kv, out) for out, _ in results]
    sizes = [size for _, size in results]
    assert errors[0] < errors[1] < errors[2] and sizes[0] > sizes[1] > sizes[2]
    assert key_errors[0] < 2e-3 < key_errors[1] < key_errors[2] < 0.05  # fp8 keys, then 4- and 3-bit Lloyd-Max
    assert value_errors[0] == value_errors[1] < value_errors[2]  # the same 4-bit values, then 3-bit
    assert sizes == [4 * 64 * 4 * s for s in (196, 134, 102)]


@pytest.mark.parametrize("bits", [3, 4])
def test_norm_correction_keeps_key_norms(bits):
    keys = torch.randn(256, 2, 128, generator=torch.Generator().manual_seed(1)) * 3
    norms = keys.norm(dim=-1)
    corrected = _tq_mse_keys(keys, 2, bits, norm_correction=True).float().norm(dim=-1) / norms
    plain = _tq_mse_keys(keys, 2, bits, norm_correction=False).float().norm(dim=-1) / norms
    assert (corrected - 1).abs().max() < 2e-3  # the fp16 norm times a unit vector
    assert plain.mean() < 0.997  # Lloyd-Max centroids shrink the vector


def test_value_scale_is_per_token_and_head():
    """An outlier channel in head 0's values coarsens that head's min/max grid only."""
    kv = _gaussian(2, 1, 64, 256, seed=2).float()
    kv[1, :, :, 5] = 40.0
    kv = kv.to(torch.bfloat16)
    out, _ = TurboQuant("turboquant_4bit_nc", 128, skip_first_layers=0, skip_last_layers=0).roundtrip(kv)
    err = (out[1].float() - kv[1].float()).abs()
    step = (kv[1].float().reshape(1, 64, 2, 128).amax(-1) - kv[1].float().reshape(1, 64, 2, 128).amin(-1)) / 15
    assert (err.reshape(1, 64, 2, 128) <= step.unsqueeze(-1) / 2 * 1.02 + 0.25).all()  # half a step (+ bf16/fp16)
    assert err[..., :128].mean() > 4 * err[..., 128:].mean()


def test_key_outlier_channel():
    """MSE keys: rotation + stored norm keep the relative error; fp8 keys: per element, saturating at 448."""
    kv = _gaussian(2, 1, 64, 256, seed=3)
    spiky = kv.float()
    spiky[0, :, :, 7] = 60.0
    spiky[0, :, 0, 9] = 1000.0
    spiky = spiky.to(torch.bfloat16)
    mse = TurboQuant("turboquant_4bit_nc", 128, skip_first_layers=0, skip_last_layers=0)
    base_err = _rel_err(kv[0], mse.roundtrip(kv)[0][0])
    spiky_err = _rel_err(spiky[0, :, 1:], mse.roundtrip(spiky)[0][0, :, 1:])
    assert spiky_err < 1.5 * base_err and spiky_err < 0.012  # 4-bit Lloyd-Max on N(0, 1/D): about 0.0095
    fp8 = TurboQuant("turboquant_k8v4", 128, skip_first_layers=0, skip_last_layers=0).roundtrip(spiky)[0][0]
    assert fp8[0, 0, 9] == 448.0
    ok = spiky[0].float().abs() < 400
    rel = ((fp8.float() - spiky[0].float()).abs() / spiky[0].float().abs().clamp_min(2**-6))[ok]
    assert rel.max() <= 2**-4 + 1e-6  # half an e4m3 ulp


def test_constant_value_vector_is_exact_in_fp16():
    kv = _gaussian(2, 1, 4, 64, seed=4).float()
    kv[1, 0, 1] = 0.3
    codec = TurboQuant("turboquant_3bit_nc", 64, skip_first_layers=0, skip_last_layers=0)
    out, _ = codec.roundtrip(kv.to(torch.bfloat16))
    assert torch.equal(out[1, 0, 1], torch.tensor(0.3).to(torch.bfloat16).half().to(torch.bfloat16).expand(64))


def test_value_codes_round_half_up():
    """min 0, max 15: scale 1, so the halves are ties, which ``int(x / scale + 0.5)`` sends up."""
    kv = _gaussian(2, 1, 2, 64, seed=6).float()
    kv[1, 0, 0] = (torch.arange(64) % 31) / 2
    codec = TurboQuant("turboquant_4bit_nc", 64, skip_first_layers=0, skip_last_layers=0)
    out, _ = codec.roundtrip(kv.to(torch.bfloat16))
    assert torch.equal(out[1, 0, 0].float(), torch.ceil(kv[1, 0, 0]))


def test_refusals():
    with pytest.raises(ValueError, match="preset"):
        TurboQuant("turboquant_2bit", 128)
    with pytest.raises(ValueError, match="power-of-two"):
        TurboQuant("turboquant_k8v4", 96)
    with pytest.raises(ValueError, match="multiple"):
        TurboQuant("turboquant_k8v4", 128).roundtrip(_gaussian(2, 1, 3, 200))


_INTERPRETED = r"""
import sys
import numpy as np
import torch
import triton.language as tl
from triton._C.libtriton import ir
from triton.runtime.interpreter import _convert_float
from lmcache.v1.distributed.api import ObjectKey
from lmcache.v1.distributed.serde.turboquant import decode_kernel, turboquant as tq
from benchmarks.baselines import TurboQuant, _memory_obj

decode_kernel._FP8_E4B15[0] = 0  # e4m3 keys, as on compute capability >= 8.9
tq._select_cuda_device = lambda *args, **kwargs: torch.device("cpu")
kv = torch.randn(2, 3, 5, 128, generator=torch.Generator().manual_seed(5))
kv[:, :, :, 3] *= 30
kv[1, :, 2, :64] = 0.5
kv[1, :, 4, 64:] = (torch.arange(64) % 31) / 2  # ties of the 4-bit value grid
kv = kv.to(torch.bfloat16)
key = ObjectKey(bytes(32), "test", 0)
for preset in tq.TQ_PRESETS:
    cfg = tq.TurboQuantSerdeConfig(preset=preset, head_dim=64, skip_first_layers=1, skip_last_layers=1)
    dst = _memory_obj(torch.zeros(tq._serialized_nbytes_for_shape(kv.shape, kv.dtype, cfg), dtype=torch.uint8))
    stored = tq.TurboQuantSerializer(cfg).serialize(_memory_obj(kv), dst, key)
    out = _memory_obj(torch.empty_like(kv))
    tq.TurboQuantDeserializer(cfg).deserialize(dst, out, key)
    mine, size = TurboQuant(preset, 64, skip_first_layers=1, skip_last_layers=1).roundtrip(kv)
    assert size == stored, (preset, size, stored)
    real = out.tensor
    if preset == "turboquant_k8v4":
        # the interpreter's own bf16 -> fp8 emulation rounds ties up and drops mantissa carries, unlike the GPU's
        # round-to-nearest-even cvt: reproduce it to compare the rest of the path exactly
        codes = _convert_float(kv[0, 1].contiguous().view(torch.int16).numpy().view(np.uint16).reshape(-1),
                               tl.bfloat16, tl.float8e4nv, ir.ROUNDING_MODE.RTNE).astype(np.uint8).copy()
        emulated = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().half().to(kv.dtype).view(5, 128)
        assert torch.equal(real[0, 1], emulated), preset
        nearest = (mine[0, 1].float() - kv[0, 1].float()).abs() <= (real[0, 1].float() - kv[0, 1].float()).abs()
        assert nearest.all(), preset
        real[0, 1] = mine[0, 1]
    assert torch.equal(real, mine), (preset, int((real != mine).sum()))
    print(preset, "ok", stored)
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs triton (its CPU interpreter)")
def test_matches_the_real_serde_in_the_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(filter(None, [
        str(REPO), os.environ.get("PYTHONPATH", "")]))}
    done = subprocess.run([sys.executable, "-c", _INTERPRETED], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count(" ok ") == len(tq.TQ_PRESETS)
