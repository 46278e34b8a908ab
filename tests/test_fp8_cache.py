"""vLLM fp8 KV caches (``--kv-cache-dtype fp8 | fp8_e5m2``): uint8 objects coded in bf16 and handed back as the
same uint8 bytes vLLM would write (real calibration, real KV of Qwen2.5-Coder-0.5B cast the way vLLM casts it)."""

from __future__ import annotations

import pytest
import torch
from lmcache_helpers import KEY, memory_obj, roundtrip, standalone

from calibration import tiers
from lmcache_kvtc import CodecError
from lmcache_kvtc.lmcache import layouts
from lmcache_kvtc.lmcache.fp8 import FP8_FORMATS, Fp8Cache
from lmcache_kvtc.lmcache.serde import KVTCDeserializer, KVTCEngine, SerdeOptions


def vllm_fp8(kv: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    """A bf16 cache as vLLM writes it with scale 1: saturating round-to-nearest cast, bytes as uint8."""
    limit = torch.finfo(fmt).max
    return kv.float().clamp(-limit, limit).to(fmt).view(torch.uint8)


@pytest.fixture(scope="module")
def fp8_engine(small_calibration_path):
    return KVTCEngine(SerdeOptions(calibration=str(small_calibration_path), ratio=16, kv_cache_dtype="fp8"))


@pytest.fixture(scope="module")
def fp8_chunk(eval_kv):
    kv, _ = eval_kv
    return vllm_fp8(kv[:, :, 256:512].contiguous(), torch.float8_e4m3fn)


@pytest.mark.parametrize("option", sorted(FP8_FORMATS))
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 4.0)])
def test_every_finite_fp8_byte_comes_back_unchanged(option, scales):
    cache = Fp8Cache.from_option(option, *scales)
    every = torch.arange(256, dtype=torch.uint8)
    finite = every[torch.isfinite(every.view(cache.fmt).float())]
    kv = finite.expand(2, 1, 1, -1).contiguous()
    coded = cache.dequantize(kv)
    assert coded.dtype == torch.bfloat16
    assert torch.equal(cache.quantize(coded), kv)


def test_quantize_saturates_and_rounds_like_vllm():
    cache = Fp8Cache.from_option("fp8")
    kv = torch.tensor([1e6, -1e6, 0.3, 449.0]).view(2, 1, 1, 2)
    assert cache.quantize(kv).view(torch.float8_e4m3fn).float().flatten().tolist() == [448, -448, 0.3125, 448]


def test_nan_bytes_are_refused():
    cache = Fp8Cache.from_option("fp8")
    with pytest.raises(CodecError, match="NaN"):
        cache.dequantize(torch.full((2, 1, 1, 4), 0x7F, dtype=torch.uint8))


def test_kv_cache_dtype_option_is_validated(small_calibration_path):
    path = str(small_calibration_path)
    assert SerdeOptions.from_kwargs({"calibration": path, "kv_cache_dtype": "fp8_e5m2"}).fp8.fmt == torch.float8_e5m2
    assert SerdeOptions.from_kwargs({"calibration": path}).fp8 is None
    for bad in ({"kv_cache_dtype": "int8"}, {"kv_cache_dtype": "fp8", "k_scale": 0}, {"v_scale": float("inf")}):
        with pytest.raises(ValueError):
            SerdeOptions.from_kwargs({"calibration": path, **bad})


def test_uint8_objects_are_refused_until_the_fp8_format_is_named():
    with pytest.raises(layouts.UnsupportedLayoutError, match="kv_cache_dtype"):
        layouts.classify((2, 24, 256, 128), torch.uint8, 64)
    assert layouts.classify((2, 24, 256, 128), torch.uint8, 64, fp8=True).coded_dtype == torch.bfloat16
    with pytest.raises(layouts.UnsupportedLayoutError, match="vLLM-CPU's fp8 KV cache"):
        layouts.classify((24, 256, 256), torch.uint8, 64, paged_block_size=128, fp8=True)


def test_fp8_objects_decode_to_vllms_bytes_of_what_the_codec_restores(fp8_engine, fp8_chunk, small_calibration):
    written, _, (restored,) = roundtrip(fp8_engine, [fp8_chunk])
    assert restored.dtype == torch.uint8 and restored.shape == fp8_chunk.shape
    assert written == fp8_chunk.numel() * 2 // 16  # the ratio counts bf16 bytes: 8x the fp8 object
    bf16 = Fp8Cache.from_option("fp8").dequantize(fp8_chunk)
    expected = standalone(small_calibration, bf16, 256, budget=fp8_engine.budgets([bf16.shape], [bf16.dtype])[0])
    assert torch.equal(restored, vllm_fp8(expected, torch.float8_e4m3fn))


def test_fp8_objects_lose_no_more_than_bf16_objects_at_the_same_stored_size(fp8_engine, engine_bf16, eval_kv):
    kv = eval_kv[0][:, :, 256:512].contiguous()
    _, _, (from_bf16,) = roundtrip(engine_bf16, [kv])
    _, _, (from_fp8,) = roundtrip(fp8_engine, [vllm_fp8(kv, torch.float8_e4m3fn)])
    from_fp8 = from_fp8.view(torch.float8_e4m3fn).float()

    def error(restored):
        return ((restored.float() - kv.float()).norm() / kv.float().norm()).item()

    fp8_alone = error(vllm_fp8(kv, torch.float8_e4m3fn).view(torch.float8_e4m3fn))
    assert fp8_alone < error(from_bf16) and error(from_fp8) < 1.1 * (error(from_bf16) + fp8_alone)


@pytest.fixture(scope="module")
def engine_bf16(small_calibration_path):
    return KVTCEngine(SerdeOptions(calibration=str(small_calibration_path), ratio=16))


def test_fused_fp8_objects_keep_their_layout(fp8_engine, fp8_chunk):
    head_dim = 64
    fused = layouts.from_split(fp8_chunk, layouts.classify(fp8_chunk.shape, torch.uint8, head_dim, fp8=True),
                               head_dim)
    _, _, (restored,) = roundtrip(fp8_engine, [fused])
    _, _, (split,) = roundtrip(fp8_engine, [fp8_chunk])
    assert restored.shape == fused.shape and restored.dtype == torch.uint8
    assert torch.equal(layouts.to_split(restored, layouts.classify(fused.shape, torch.uint8, head_dim, fp8=True),
                                        head_dim), split)


def test_a_corrupt_fp8_blob_leaves_the_destination_untouched(fp8_engine, fp8_chunk):
    _, dst, _ = roundtrip(fp8_engine, [fp8_chunk])
    bad = bytearray(bytes(dst.byte_array))
    bad[400] ^= 0xFF
    out = memory_obj([torch.full_like(fp8_chunk, 7)])
    with pytest.raises(CodecError):
        KVTCDeserializer(fp8_engine).deserialize(memory_obj([torch.frombuffer(bad, dtype=torch.uint8)]), out, KEY)
    assert (out.get_tensor(0) == 7).all()


@pytest.mark.parametrize("option", ["fp8", "fp8_e5m2"])
def test_fp8_cache_through_the_storage_manager_and_fs(option, eval_kv, small_calibration_path, tmp_path):
    fmt = FP8_FORMATS[option]
    cache = vllm_fp8(eval_kv[0][:, :, :512].contiguous(), fmt)
    adapter = {"type": "fs", "base_path": str(tmp_path)}
    restored, stats = tiers.store_and_load(cache, str(small_calibration_path), adapter, kv_cache_dtype=option)
    assert restored is not None, stats
    assert restored.dtype == torch.uint8 and restored.shape == cache.shape
    assert stats["stored_bytes"] == [cache[:, :, :256].numel() * 2 // 16] * 2
    error = (restored.view(fmt).float() - cache.view(fmt).float()).norm() / cache.view(fmt).float().norm()
    assert 0 < error.item() < 0.15
