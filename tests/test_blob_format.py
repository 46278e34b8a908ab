"""The wire formats of ``lmcache_kvtc.blob`` on their own: header pack/parse, extent, the group container."""

from __future__ import annotations

import pytest
import torch

from lmcache_kvtc import CorruptBlobError, ForeignBlobError, KVTCCodec
from lmcache_kvtc import blob as wire


@pytest.fixture(scope="module")
def blob(synthetic):
    calibration, make = synthetic
    return KVTCCodec(calibration).encode(make(300, 7), plan=calibration.plan_index(16), start=7, sinks=4, window=16)


def test_a_parsed_header_packs_back_to_the_same_bytes(blob):
    header, payload = wire.parse(blob)
    assert header.to_bytes() + bytes(payload) == blob
    assert (header.tokens, header.start, header.exact_head, header.exact_tail) == (300, 7, 0, 16)  # no sinks at 7
    assert header.exact_bytes == wire.exact_size(header.layers, 16, header.hidden, torch.bfloat16)


def test_extent_is_header_plus_payload_whatever_follows(blob):
    assert wire.extent(blob) == len(blob)
    assert wire.extent(blob + bytes(100)) == len(blob)  # padding or an adapter's slack
    assert wire.extent(blob[:50]) == 50 and wire.extent(b"junk" * 40) == 160  # parse() reports those


def test_padding_is_accepted_only_when_flagged(blob):
    header, payload = wire.parse(blob)
    with pytest.raises(CorruptBlobError, match="unexpected bytes"):
        wire.parse(blob + bytes(8))
    header.flags |= wire.FLAG_PADDED
    padded = header.to_bytes() + bytes(payload) + bytes(8)
    assert wire.parse(padded)[0].flags & wire.FLAG_PADDED


def test_group_container_round_trips_and_refuses_a_wrong_count(blob):
    assert wire.pack_groups([blob]) == blob and wire.group_header_size(1) == 0
    packed = wire.pack_groups([blob, blob[:-1] + b"!"])
    assert len(packed) == wire.group_header_size(2) + 2 * len(blob) and packed[:4] == wire.GROUP_MAGIC
    first, second = wire.split_groups(memoryview(packed), 2)
    assert bytes(first) == blob and bytes(second) == blob[:-1] + b"!"
    with pytest.raises(CorruptBlobError, match="declares 2 groups"):
        wire.split_groups(memoryview(packed), 3)
    with pytest.raises(CorruptBlobError, match="extends past"):
        wire.split_groups(memoryview(packed[:-1]), 2)
    with pytest.raises(CorruptBlobError, match="without its group header"):
        wire.split_groups(memoryview(blob), 2)


def test_a_single_group_object_is_cut_to_its_extent(blob):
    (only,) = wire.split_groups(memoryview(blob + bytes(64)), 1)
    assert bytes(only) == blob
    with pytest.raises(ForeignBlobError):
        wire.parse(b"KVTG" + bytes(100))
