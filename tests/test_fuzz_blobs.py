"""A few thousand seeded hostile blobs through every reader: a ``CodecError`` or finite KV of the right shape.

The full run (``tests/fuzz_blobs.py``, ≥ 100,000 cases) uses the default calibration; this one the test
calibration, so every strategy and door is exercised on each submission.
"""

from __future__ import annotations

import pytest
from fuzz_blobs import STRATEGIES, build, fuzz

CASES = 3000


@pytest.fixture(scope="module")
def doors_and_seeds(small_calibration_path, eval_kv):
    kv, _ = eval_kv
    return build(small_calibration_path, kv[:, :, :512].contiguous())


def test_hostile_blobs_are_refused_or_decode_to_finite_kv_of_the_destination(doors_and_seeds):
    doors, seeds = doors_and_seeds
    report = fuzz(doors, seeds, CASES, seed=1)
    assert report["findings"] == []
    outcomes = report["outcomes"]
    # every strategy reached every door, and the forgeries that get past the CRCs really are decoded sometimes
    for strategy in STRATEGIES:
        for door in ("codec", "engine", "classic"):
            assert sum(outcomes[f"{strategy} / {door}"].values()) > 0
    assert outcomes["symbols / codec"].get("decoded", 0) > 0
    assert sum(outcomes["group_container / engine"].values()) > 0


def test_the_unchanged_seeds_decode_through_every_door(doors_and_seeds):
    """The harness itself: without mutation every seed is accepted (else the fuzz would prove nothing)."""
    doors, seeds = doors_and_seeds
    assert len(seeds) >= 4
    for seed in seeds:
        for door, call in doors.all(seed.blob, seed.tokens).items():
            assert call() is None, (seed.label, door)
