"""GPU entropy path: backend detection, nvCOMP batching/offsets, cross-device blob compatibility.

No GPU exists in CPU CI, so the batching and container logic of :class:`DeflateNvcomp` is
driven by ``ZlibStandIn``: a STAND-IN for ``nvidia.nvcomp`` that mimics the calls we make
(Codec/as_arrays/BatchArray) with zlib raw DEFLATE inside. It proves our offsets, padding and
index, not nvCOMP itself. The tests at the end run only on a CUDA machine with nvCOMP.
"""

from __future__ import annotations

import logging
import sys
import zlib
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmcache_kvtc import blob as wire
from lmcache_kvtc import entropy_gpu
from lmcache_kvtc.codec import KVTCCodec
from lmcache_kvtc.entropy import CHUNK_ALIGNMENT, CHUNK_SIZE, ChunkEntry, DeflateCPU
from lmcache_kvtc.entropy_gpu import DeflateNvcomp, probe, select_coder
from lmcache_kvtc.errors import CorruptBlobError

CUDA = torch.cuda.is_available()
NEEDS_GPU = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU with nvCOMP (none in CPU CI)")


@pytest.fixture(autouse=True)
def _fresh_detection():
    entropy_gpu.clear_detection_cache()
    yield
    entropy_gpu.clear_detection_cache()


# -- a stand-in for nvidia.nvcomp (NOT nvCOMP: zlib inside, same call shapes) ---------------------------------
class _Batch:
    def __init__(self, arrays: list[np.ndarray], sizes: list[int] | None = None):
        self.arrays = arrays
        self.sizes = sizes if sizes is not None else [len(a) for a in arrays]

    def __len__(self) -> int:
        return len(self.arrays)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.arrays[i]

    @property
    def buffer_sizes(self) -> list[int]:
        return self.sizes


class ZlibStandIn:
    """Stand-in module: records calls and checks the alignment nvCOMP Deflate requires (8 B in, 4 B out)."""

    BitstreamKind = SimpleNamespace(RAW="RAW", NVCOMP_NATIVE="NATIVE")

    def __init__(self, broken: bool = False):
        self.encodes = 0
        self.decodes = 0
        self.broken = broken
        stand_in = self

        class Codec:
            def __init__(self, **kwargs):
                assert kwargs["algorithm"] == "Deflate" and kwargs["bitstream_kind"] == "RAW"

            def encode(self, batch: _Batch, out: _Batch) -> _Batch:
                stand_in.encodes += 1
                assert all(a.ctypes.data % 8 == 0 for a in batch.arrays), "unaligned chunk handed to encode"
                sizes = []
                for a, dst in zip(batch.arrays, out.arrays, strict=True):
                    coder = zlib.compressobj(6, zlib.DEFLATED, -15)  # LZ77 + Huffman: another encoder than DeflateCPU
                    packed = (b"\xff" if stand_in.broken else b"") + coder.compress(a.tobytes()) + coder.flush()
                    if len(packed) > len(dst):
                        raise ValueError("output buffer too small")
                    dst[: len(packed)] = np.frombuffer(packed, np.uint8)
                    sizes.append(len(packed))
                return _Batch(out.arrays, sizes)

            def get_max_comp_buffer_size(self, array: np.ndarray) -> int:
                return len(array) + len(array) // 100 + 64

            def decode(self, batch: _Batch, out: _Batch, decompression_config=None) -> _Batch:
                stand_in.decodes += 1
                assert all(a.ctypes.data % 4 == 0 for a in batch.arrays + out.arrays), "unaligned decode buffer"
                sizes = []
                for src, dst in zip(batch.arrays, out.arrays, strict=True):
                    inflater = zlib.decompressobj(-15)
                    try:
                        raw = inflater.decompress(src.tobytes(), len(dst))
                    except zlib.error as exc:
                        raise RuntimeError(f"status error: {exc}") from exc
                    dst[: len(raw)] = np.frombuffer(raw, np.uint8)
                    sizes.append(len(raw) + (0 if inflater.eof and not inflater.unconsumed_tail else 1))
                return _Batch(out.arrays, sizes)

            def compression_config(self, sizes):
                return tuple(sizes)

            def decompression_config(self, config):
                return config

            def get_required_decompression_alignment(self) -> int:
                return 4

        self.Codec = Codec

    @staticmethod
    def as_array(buffer: torch.Tensor) -> np.ndarray:
        return buffer.numpy()

    @staticmethod
    def as_arrays(buffer: torch.Tensor, offsets: list[int], sizes: list[int], cuda_stream: int = 0) -> _Batch:
        data = buffer.numpy()
        return _Batch([data[o : o + s] for o, s in zip(offsets, sizes, strict=True)])


def _standin_coder(**kwargs) -> tuple[DeflateNvcomp, ZlibStandIn]:
    module = ZlibStandIn(**kwargs)
    return DeflateNvcomp("cpu", nvcomp=module), module


def _sections(seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    sizes = [0, 1001, 3 * CHUNK_SIZE + 17, CHUNK_SIZE]
    return [(rng.integers(0, 16, n, dtype=np.uint8) * rng.integers(0, 2, n, dtype=np.uint8)).tobytes() for n in sizes]


# -- detection -----------------------------------------------------------------------------------------------
def test_real_nvcomp_wheel_without_gpu_falls_back_with_one_warning(caplog):
    if CUDA:
        pytest.skip("this machine has a GPU: the fallback is tested where there is none")
    pytest.importorskip("nvidia.nvcomp", reason="install nvidia-nvcomp-cu12==6.0.0.12 to test detection against it")
    with pytest.raises(RuntimeError):  # the documented fact: importable, but every Codec raises without a GPU
        DeflateNvcomp("cuda")
    with caplog.at_level(logging.INFO, logger="lmcache_kvtc.entropy_gpu"):
        coders = [select_coder("cuda") for _ in range(3)]
    assert all(type(c) is DeflateCPU for c in coders)
    assert len(caplog.records) == 1 and caplog.records[0].levelno == logging.WARNING
    assert "falling back to CPU" in caplog.records[0].getMessage()


def test_cpu_device_selects_cpu_coder_with_one_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="lmcache_kvtc.entropy_gpu"):
        assert type(select_coder("cpu")) is DeflateCPU
        assert type(select_coder(torch.device("cpu"))) is DeflateCPU
    assert len(caplog.records) == 1


def test_missing_nvcomp_module_falls_back_without_raising(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "nvidia.nvcomp", None)  # makes the import raise ImportError
    with caplog.at_level(logging.INFO, logger="lmcache_kvtc.entropy_gpu"):
        assert type(select_coder("cuda:0")) is DeflateCPU
    assert [r.levelno for r in caplog.records] == [logging.WARNING]


def test_detection_runs_once_per_device(monkeypatch):
    calls = []

    def failing_detect(device):
        calls.append(device)
        raise RuntimeError("no GPU here")

    monkeypatch.setattr(entropy_gpu, "_detect", failing_detect)
    for _ in range(3):
        assert type(select_coder("cuda")) is DeflateCPU
    select_coder("cuda:1")
    assert [str(d) for d in calls] == ["cuda", "cuda:1"]


# -- DeflateNvcomp's batching and container, driven by the stand-in -------------------------------------------
def test_standin_container_matches_the_cpu_layout_and_inflates_with_zlib():
    coder, module = _standin_coder()
    sections = _sections()
    payload, index = coder.compress(sections)
    _, cpu_index = DeflateCPU().compress(sections)
    assert module.encodes == 1
    assert [e.raw for e in index] == [e.raw for e in cpu_index]  # same chunking: never across sections
    end = 0
    for e in index:
        assert e.offset % CHUNK_ALIGNMENT == 0 and e.offset == -(-end // CHUNK_ALIGNMENT) * CHUNK_ALIGNMENT
        end = e.offset + e.compressed
    assert len(payload) == end  # no trailing padding, as DeflateCPU
    assert DeflateCPU.decompress(memoryview(payload), index, len(b"".join(sections))) == b"".join(sections)


def test_standin_batch_of_objects_is_one_encode_call_and_each_object_stands_alone():
    coder, module = _standin_coder()
    objects = [_sections(seed) for seed in range(4)] + [[b""]]
    results = coder.compress_batch(objects)
    assert module.encodes == 1 and results[-1] == (b"", [])
    for sections, (payload, index) in zip(objects, results, strict=True):
        data = b"".join(sections)
        assert DeflateCPU.decompress(memoryview(payload), index, len(data)) == data


def test_standin_decodes_cpu_blobs_into_a_preallocated_tensor_even_unaligned():
    coder, module = _standin_coder()
    sections = _sections(1)
    data = b"".join(sections)
    payload, index = DeflateCPU().compress(sections)
    assert coder.decompress(memoryview(payload), index, len(data)) == data
    backing = torch.zeros(len(data) + 1, dtype=torch.uint8)
    out = backing[1:]  # an odd address: chunks go through the aligned scratch buffer
    assert coder.decompress_tensor(memoryview(payload), index, len(data), out=out) is out
    assert out.numpy().tobytes() == data


def test_standin_realigns_chunks_at_unaligned_payload_offsets():
    coder, _ = _standin_coder()
    data = bytes(range(256)) * 300
    chunks = [data[:CHUNK_SIZE], data[CHUNK_SIZE:]]
    payload, index = b"", []
    for chunk in chunks:  # a valid container whose second chunk starts at an odd offset
        c = zlib.compressobj(1, zlib.DEFLATED, -15)
        packed = c.compress(chunk) + c.flush()
        index.append(ChunkEntry(len(payload) + 1, len(packed), len(chunk)))
        payload += b"\0" + packed
    assert coder.decompress(memoryview(payload), index, len(data)) == data


@pytest.mark.parametrize("damage", ["garbage", "short_total", "raw_too_large", "raw_too_small", "outside"])
def test_standin_rejects_bad_chunks_with_corrupt_blob_error(damage):
    coder, _ = _standin_coder()
    data = bytes(range(200)) * 500
    payload, index = DeflateCPU().compress([data])
    total, last = len(data), index[-1]
    if damage == "garbage":
        payload = payload[: index[0].offset] + b"\xff" * 8 + payload[index[0].offset + 8 :]
    elif damage == "short_total":
        total -= 1
    elif damage in ("raw_too_large", "raw_too_small"):
        delta = 1 if damage == "raw_too_large" else -1
        index[-1], total = replace(last, raw=last.raw + delta), total + delta
    else:
        index[-1] = replace(last, compressed=len(payload))
    with pytest.raises(CorruptBlobError):
        coder.decompress(memoryview(payload), index, total)


def test_probe_accepts_the_standin_and_rejects_a_broken_one():
    probe(_standin_coder()[0])
    with pytest.raises(Exception):  # noqa: B017 - any failure is a "no"
        probe(_standin_coder(broken=True)[0])


def test_standin_coder_inside_the_codec_gives_the_same_kv_as_the_cpu_coder(synthetic):
    calibration, make = synthetic
    kv = make(300, 10)
    coder, _ = _standin_coder()
    blob = KVTCCodec(calibration, coder=coder).encode(kv, plan=1, start=10)
    reference = KVTCCodec(calibration).encode(kv, plan=1, start=10)
    cpu = KVTCCodec(calibration)
    assert torch.equal(cpu.decode(blob), cpu.decode(reference))  # same symbols, other DEFLATE bytes
    assert torch.equal(KVTCCodec(calibration, coder=coder).decode(reference), cpu.decode(reference))


# -- GPU only ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gpu_coder():
    pytest.importorskip("nvidia.nvcomp", reason="nvCOMP is not installed (pip install nvidia-nvcomp-cu12==6.0.0.12)")
    entropy_gpu.clear_detection_cache()
    coder = select_coder("cuda")
    assert isinstance(coder, DeflateNvcomp), "a GPU and nvCOMP are present, yet detection fell back to the CPU"
    return coder


@NEEDS_GPU
@pytest.mark.parametrize("algorithm_type", [0, 1])
def test_gpu_entropy_layer_interoperates_with_zlib_both_ways(gpu_coder, algorithm_type):
    coder = DeflateNvcomp("cuda", algorithm_type=algorithm_type, sizes_config=gpu_coder.sizes_config)
    objects = [_sections(seed) for seed in range(8)]
    for sections, (payload, index) in zip(objects, coder.compress_batch(objects), strict=True):
        data = b"".join(sections)
        assert DeflateCPU.decompress(memoryview(payload), index, len(data)) == data
        cpu_payload, cpu_index = DeflateCPU().compress(sections)
        out = torch.empty(len(data), dtype=torch.uint8, device="cuda")
        coder.decompress_tensor(memoryview(cpu_payload), cpu_index, len(data), out=out)
        assert out.cpu().numpy().tobytes() == data


@NEEDS_GPU
def test_gpu_chunk_declared_longer_than_it_inflates_raises_or_leaves_zeros_never_stale_memory(gpu_coder):
    """nvCOMP 6.0.0.12 with a sizes config reports the declared sizes, so a forged index (valid CRCs) that
    declares one byte more than a chunk inflates to may go unnoticed; the byte it never wrote must then be 0,
    not whatever the caching allocator last held there."""
    data = bytes(range(200)) * 500
    payload, index = DeflateCPU().compress([data])
    index[-1] = ChunkEntry(index[-1].offset, index[-1].compressed, index[-1].raw + 1)
    torch.full((len(data) + 1 + CHUNK_SIZE,), 0xAB, dtype=torch.uint8, device="cuda")  # dirty the freed block
    try:
        out = gpu_coder.decompress(memoryview(payload), index, len(data) + 1)
    except CorruptBlobError:
        return
    assert bytes(out) == data + b"\0"


@NEEDS_GPU
def test_gpu_garbage_chunk_raises_corrupt_blob_error_or_inflates_without_crashing(gpu_coder):
    data = bytes(range(200)) * 500
    payload, index = DeflateCPU().compress([data])
    garbage = bytes(np.random.default_rng(1).integers(0, 256, len(payload), dtype=np.uint8))
    try:
        out = gpu_coder.decompress(memoryview(garbage), index, len(data))
    except CorruptBlobError as error:
        print(f"nvCOMP refused a garbage chunk: {error}")
        return
    assert len(out) == len(data)  # the codec's payload CRC (and finiteness check) are then what refuse it
    print("nvCOMP inflated a garbage chunk without an error status")


def _payload_and_index(blob: bytes) -> tuple[memoryview, list[ChunkEntry], int]:
    header, payload = wire.parse(blob)
    return payload, header.chunks, sum(c.raw for c in header.chunks)


def _within_one_bf16_rounding(a: torch.Tensor, b: torch.Tensor) -> None:
    """CPU and GPU sum the same fp32 products in another order, so a value may round to a neighbouring bf16."""
    a, b = a.cpu().float(), b.cpu().float()
    ulp = torch.maximum(a.abs(), b.abs()) * 2.0**-7
    assert ((a - b).abs() <= ulp + 1e-6).all(), f"max difference {(a - b).abs().max():.3g} exceeds one bf16 ulp"
    print(f"identical values: {(a == b).float().mean():.4%}")


@NEEDS_GPU
def test_gpu_blob_decodes_on_cpu_within_one_rounding(gpu_coder, synthetic):
    calibration, make = synthetic
    kv = make(600, 10)
    gpu = KVTCCodec(calibration, device="cuda", coder=gpu_coder)
    cpu = KVTCCodec(calibration)
    blob = gpu.encode(kv.cuda(), plan=1, start=10)
    _within_one_bf16_rounding(cpu.decode(blob), gpu.decode(blob))


@NEEDS_GPU
def test_cpu_blob_decodes_on_gpu_within_one_rounding(gpu_coder, synthetic):
    calibration, make = synthetic
    kv = make(600, 10)
    gpu = KVTCCodec(calibration, device="cuda", coder=gpu_coder)
    cpu = KVTCCodec(calibration)
    blob = cpu.encode(kv, plan=1, start=10)
    _within_one_bf16_rounding(gpu.decode(blob), cpu.decode(blob))


@NEEDS_GPU
def test_gpu_and_cpu_encoders_write_the_same_symbols_and_keep_the_window_exact(gpu_coder, synthetic):
    """Both encoders quantize to the same symbols (payloads inflate to the same bytes) up to values on a
    rounding boundary; the exact window is bit-exact on every device."""
    calibration, make = synthetic
    kv = make(1000, 0)
    gpu = KVTCCodec(calibration, device="cuda", coder=gpu_coder)
    cpu = KVTCCodec(calibration)
    blobs = gpu.encode(kv.cuda(), plan=1), cpu.encode(kv, plan=1)
    symbols = [bytes(DeflateCPU.decompress(*_payload_and_index(b))) for b in blobs]
    differing = sum(x != y for x, y in zip(*symbols, strict=True))
    assert len(symbols[0]) == len(symbols[1]) and differing <= len(symbols[0]) // 1000, differing
    for blob in blobs:
        _within_one_bf16_rounding(gpu.decode(blob), cpu.decode(blob))
        assert torch.equal(gpu.decode(blob)[:, :, -128:].cpu(), kv[:, :, -128:])


class _ByteTokenizer:
    """UTF-8 bytes as token ids: a tokenizer that needs no files (a GPU machine may have no offline models)."""

    bos_token_id = None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": list(text.encode())}


@NEEDS_GPU
def test_calibration_fitted_on_the_gpu_codes_as_well_as_the_cpu_fit():
    """``kvtc calibrate --device cuda``: prefill, de-rotation, accumulation and the decomposition on the GPU, exact
    and sketched; the calibrations must code held-out KV about as well as the CPU fit (not bit-identically: the
    model's GPU kernels differ from its CPU ones)."""
    from pathlib import Path

    from tiny_models import SUPPORTED, build

    from lmcache_kvtc.calibrate.capture import prefill
    from lmcache_kvtc.calibrate.driver import calibrate

    documents = [p.read_text() for p in sorted(Path(entropy_gpu.__file__).parent.rglob("*.py"))]
    model_type, overrides, _ = SUPPORTED["Llama 3.x"]
    model = build(model_type, overrides, 256)
    options = dict(tokens=8192, context=512, ratios=(8.0, 16.0), key_weight=None, normalize="none")
    fits = {"cpu": calibrate(("tiny-llama", model, _ByteTokenizer()), documents, **options)}
    for name, max_rank in (("cuda", None), ("cuda sketch", 32)):
        fits[name] = calibrate(("tiny-llama", model, _ByteTokenizer()), documents, device="cuda", max_rank=max_rank,
                               **options)
    assert fits["cuda sketch"].info["fit"] == "SketchedCovariance" and fits["cuda"].info["fit"] == "FeatureCovariance"
    ids = torch.tensor(list(Path(__file__).read_bytes()[:700]))
    kv = prefill(model.cpu(), ids, logits_to_keep=1)[0]
    errors = {}
    for name, calibration in fits.items():
        codec = KVTCCodec(calibration)
        decoded = codec.decode(codec.encode(kv, plan=calibration.plan_index(16.0)))
        errors[name] = float((decoded.float() - kv.float()).square().sum() / kv.float().square().sum())
    print(errors)
    assert errors["cuda"] <= 1.25 * errors["cpu"] and errors["cuda sketch"] <= 1.5 * errors["cpu"], errors
