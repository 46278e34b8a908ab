"""Every bad input ends in a typed CodecError: never garbage KV, never another exception.

Pure format logic, so a synthetic calibration (``tests/synthetic.py``) stands in for a model's; the real-model
blobs get the same treatment from the fuzzer (``tests/test_fuzz_blobs.py``)."""

from __future__ import annotations

import dataclasses
import random
import struct
import zlib

import pytest
import torch

from lmcache_kvtc import (
    CalibrationMismatchError,
    CodecError,
    CorruptBlobError,
    ForeignBlobError,
    KVTCCodec,
    LayoutError,
    TruncatedBlobError,
)
from lmcache_kvtc import blob as wire

PLAN = 1  # the synthetic calibration's 16x rung


@pytest.fixture(scope="module")
def codec_and_blob(synthetic):
    calibration, make = synthetic
    assert calibration.plans[PLAN].ratio == 16
    codec = KVTCCodec(calibration)
    kv = make(300)
    return codec, codec.encode(kv, plan=PLAN), kv


def test_blob_from_another_calibration_is_refused(codec_and_blob):
    codec, blob, _ = codec_and_blob
    calibration = codec.calibration
    other = dataclasses.replace(calibration, info={**calibration.info, "note": "another calibration"})
    other.__dict__.pop("_fingerprint", None)
    assert other.fingerprint != calibration.fingerprint
    with pytest.raises(CalibrationMismatchError, match="another calibration"):
        KVTCCodec(other).decode(blob)


def test_every_truncation_is_refused(codec_and_blob):
    codec, blob, _ = codec_and_blob
    lengths = sorted(set(range(0, 200)) | set(random.Random(0).sample(range(200, len(blob)), 200)))
    for n in lengths:
        with pytest.raises((TruncatedBlobError, ForeignBlobError, CorruptBlobError)):
            codec.decode(blob[:n])


def test_random_bit_flips_are_refused(codec_and_blob):
    codec, blob, _ = codec_and_blob
    rng = random.Random(7)
    for _ in range(400):
        corrupted = bytearray(blob)
        for _ in range(rng.choice((1, 1, 2, 8))):
            corrupted[rng.randrange(len(corrupted))] ^= 1 << rng.randrange(8)
        if corrupted == blob:
            continue
        with pytest.raises(CodecError):
            codec.decode(bytes(corrupted))


def test_foreign_bytes_and_versions_are_refused(codec_and_blob):
    codec, blob, _ = codec_and_blob
    for foreign in (b"", b"PK\x03\x04" + bytes(200), bytes(1000), b"\x80\x04\x95" + bytes(50)):
        with pytest.raises(ForeignBlobError):
            codec.decode(foreign)
    for version in (1, 99):  # 1: the per-token min/max format of earlier releases
        other = bytearray(blob)
        other[4:6] = struct.pack("<H", version)
        with pytest.raises(ForeignBlobError, match=f"version {version}"):
            codec.decode(bytes(other))


def _forge(blob: bytes, **changes) -> bytes:
    """A hostile blob: edited header fields with recomputed, valid CRCs."""
    header, payload = wire.parse(blob)
    header = dataclasses.replace(header, **changes)
    return header.to_bytes() + bytes(payload)


def test_forged_headers_with_valid_crcs_are_refused_before_allocating(codec_and_blob):
    codec, blob, _ = codec_and_blob
    for changes in (
        {"tokens": wire.MAX_TOKENS},  # would allocate gigabytes if trusted
        {"tokens": 301},
        {"exact_tail": 0},
        {"layers": 3},
        {"plan": 7},
        {"kv_size": 1},
        {"start": -5},
        {"start": (1 << 63) - 10},  # positions would overflow int64 in the decoder
        {"start": wire.MAX_POSITION},
    ):
        with pytest.raises(CodecError):
            codec.decode(_forge(blob, **changes))
    with pytest.raises(CodecError):
        codec.decode(_forge(blob, tokens=1 << 30))


def test_forged_payload_that_inflates_wrongly_is_refused(codec_and_blob):
    codec, blob, _ = codec_and_blob
    header, payload = wire.parse(blob)
    bogus = zlib.compressobj(1, zlib.DEFLATED, -15)
    chunk = bogus.compress(bytes(100)) + bogus.flush()
    entry = header.chunks[-1]
    forged_payload = bytes(payload[: entry.offset]) + chunk
    chunks = header.chunks[:-1] + [dataclasses.replace(entry, compressed=len(chunk))]
    forged = dataclasses.replace(header, chunks=chunks, payload_size=len(forged_payload),
                                 payload_crc=zlib.crc32(forged_payload))
    with pytest.raises(CorruptBlobError):
        codec.decode(forged.to_bytes() + forged_payload)


@pytest.mark.parametrize("fill", [0x7F, 0x80])
def test_forged_extreme_symbols_never_decode_to_non_finite_kv(codec_and_blob, fill):
    """A payload rewritten (CRCs valid) so that every symbol is int8's extreme: finite KV or a CodecError."""
    codec, blob, _ = codec_and_blob
    header, payload = wire.parse(blob)
    exact = 2 * header.layers * (header.exact_head + header.exact_tail) * header.hidden * header.dtype.itemsize
    stream = codec.coder.decompress(payload, header.chunks, header.stream_size)
    stream[exact:] = bytes([fill]) * (len(stream) - exact)
    forged_payload, chunks = codec.coder.compress([bytes(stream[:exact]), bytes(stream[exact:])])
    forged = dataclasses.replace(header, chunks=chunks, payload_size=len(forged_payload),
                                 payload_crc=zlib.crc32(forged_payload))
    try:
        out = codec.decode(forged.to_bytes() + forged_payload)
    except CodecError:
        return
    assert torch.isfinite(out).all()


def test_wrong_shapes_dtypes_and_values_are_refused(codec_and_blob):
    codec, _, kv = codec_and_blob
    bad_inputs = [
        kv[0],  # 3-D
        kv[:, :-1],  # wrong layer count
        kv[..., :-2],  # wrong hidden size
        kv.float(),  # fp32
        kv.to(torch.float8_e4m3fn),  # an fp8 cache
        kv.view(torch.uint8),  # raw bytes
        kv[:, :, :0],  # no tokens
        "not a tensor",
    ]
    for bad in bad_inputs:
        with pytest.raises(LayoutError):
            codec.encode(bad, plan=PLAN)
    poisoned = kv.clone()
    poisoned[1, 1, 50, 3] = float("nan")
    with pytest.raises(LayoutError, match="NaN"):
        codec.encode(poisoned, plan=PLAN)
    poisoned = kv.clone()
    poisoned[0, 0, 1, 0] = float("inf")  # in an exact sink token: it could be stored but never decoded
    with pytest.raises(LayoutError, match="NaN or infinity"):
        codec.encode(poisoned, plan=PLAN, start=0, sinks=4)
    with pytest.raises(LayoutError):
        codec.encode(kv, plan=PLAN, start=-1)
    with pytest.raises(LayoutError, match="exceed"):
        codec.encode(kv, plan=PLAN, start=wire.MAX_POSITION)
