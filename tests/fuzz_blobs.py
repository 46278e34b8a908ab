"""Seeded fuzzing of every door a stored blob comes back through, with mutations that reach past the CRCs.

    .venv/bin/python tests/fuzz_blobs.py --cases 100000 [--seed 0] [--out fuzz.json]

A blob in shared storage may be forged on purpose, so most strategies recompute the checksums after
mutating. Every case goes through ``KVTCCodec.decode`` (with the token count its reader expects), the
MP serde's engine and the classic plugin's record reader. The property, per door: a ``CodecError``
subclass, or finite KV of the destination's shape and dtype, within the time bound. Anything else is
a finding. Memory: every door checks the declared sizes against the destination before it allocates,
so no case allocates more than the destination's KV plus its symbol stream (the script reports the
peak resident set).

The script uses the model's default calibration and a real KV cache of held-out text; the test
(``test_fuzz_blobs.py``) runs a few thousand cases on the test calibration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import resource
import struct
import sys
import time
import zlib
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

from lmcache_kvtc import KVTCCodec
from lmcache_kvtc import blob as wire
from lmcache_kvtc.entropy import DeflateCPU
from lmcache_kvtc.errors import CodecError, LayoutError
from lmcache_kvtc.lmcache.classic import decode_record, pack_record
from lmcache_kvtc.lmcache.engine import KVTCEngine
from lmcache_kvtc.lmcache.options import SerdeOptions

#: no case may take longer than this in any door (a hang or an inflate bomb would)
CASE_SECONDS = 10.0
#: tokens per seed chunk: small, so that the cases that do decode are cheap (the format does not depend on it)
CHUNK = 64
BLOCK = 10_000
EDGE_VALUES = (0, 1, 2, 3, 4, 127, 128, 255, 256, 257, 65535, 65536, (1 << 31) - 1, 1 << 31, (1 << 32) - 1,
               1 << 32, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
SYMBOL_EDGES = (0x00, 0x01, 0x7F, 0x80, 0x81, 0xFF)


@dataclasses.dataclass(frozen=True)
class Seed:
    """A valid blob and the destination it is read back into."""

    blob: bytes
    tokens: int
    label: str


def make_seeds(codec: KVTCCodec, kv: torch.Tensor) -> list[Seed]:
    """Real blobs of ``kv [2, L, ≥512, H·D]``: LMCache-style chunks (with and without sinks, several plans, padded)
    and a standalone blob with exact sinks and window."""
    seeds = []
    for ratio in (8.0, 16.0, 32.0):
        for start in (0, CHUNK):
            chunk = kv[:, :, start : start + CHUNK].contiguous()
            budget = chunk.numel() * 2 // int(ratio)
            try:
                blob = codec.encode_within(chunk, budget=budget, start=start, window=0, flags=wire.FLAG_PADDED)
            except LayoutError:  # a small calibration's ladder may not reach this budget
                continue
            seeds.append(Seed(blob + bytes(budget - len(blob)), CHUNK, f"chunk@{start} {ratio:g}x padded"))
    whole = kv[:, :, : 2 * CHUNK].contiguous()
    plan = codec.calibration.plan_index(16.0)
    seeds.append(Seed(codec.encode(whole, plan=plan, start=0, sinks=4, window=CHUNK // 2), 2 * CHUNK, "standalone"))
    return seeds


# -- mutations: each takes (rng, seed, other seed) and returns hostile bytes ---------------------------
def _header_end(blob: bytes) -> int:
    header, _ = wire.parse(blob)
    return wire.header_size(len(header.model_id.encode()), len(header.chunks))


def _fix_header_crc(buf: bytearray, end: int) -> bytes:
    struct.pack_into("<I", buf, end - 4, zlib.crc32(buf[: end - 4]))
    return bytes(buf)


def bit_flips(rng: random.Random, seed: Seed, other: Seed) -> bytes:
    buf = bytearray(seed.blob)
    for _ in range(rng.randint(1, 8)):
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    return bytes(buf)


def truncation(rng: random.Random, seed: Seed, other: Seed) -> bytes:
    return seed.blob[: rng.randrange(len(seed.blob))]


def header_field(rng: random.Random, seed: Seed, other: Seed) -> bytes:
    """An edge value written over 1–8 bytes anywhere in the fixed header, the header CRC recomputed."""
    buf, end = bytearray(seed.blob), _header_end(seed.blob)
    width = rng.choice((1, 2, 4, 8))
    offset = rng.randrange(4, 80 - width + 1)
    value = rng.choice(EDGE_VALUES) % (1 << (8 * width))
    buf[offset : offset + width] = value.to_bytes(width, "little")
    return _fix_header_crc(buf, end)


def chunk_index(rng: random.Random, seed: Seed, other: Seed) -> bytes:
    """One chunk-index entry (offset, compressed or raw size) set to an edge value, the header CRC recomputed."""
    header, payload = wire.parse(seed.blob)
    chunks = list(header.chunks)
    i = rng.randrange(len(chunks))
    field = rng.choice(("offset", "compressed", "raw"))
    limit = 1 << (64 if field == "offset" else 32)
    value = rng.choice((*EDGE_VALUES, getattr(chunks[i], field) + rng.choice((-17, -1, 1, 16)))) % limit
    chunks[i] = dataclasses.replace(chunks[i], **{field: value})
    return dataclasses.replace(header, chunks=chunks).to_bytes() + bytes(payload)


def payload_bytes(rng: random.Random, seed: Seed, other: Seed) -> bytes:
    """Payload bytes or runs changed, the payload CRC (and so the header CRC) recomputed."""
    header, payload = wire.parse(seed.blob)
    data = bytearray(payload)
    start = rng.randrange(len(data))
    length = rng.choice((1, 2, 8, 64, 4096))
    fill = rng.choice(("random", "zero", "ones", "copy"))
    end = min(len(data), start + length)
    if fill == "random":
        data[start:end] = rng.randbytes(end - start)
    elif fill == "copy":
        source = rng.randrange(len(data))
        data[start:end] = (data[source:] + data)[: end - start]
    else:
        data[start:end] = (b"\0" if fill == "zero" else b"\xff") * (end - start)
    return dataclasses.replace(header, payload_crc=zlib.crc32(data)).to_bytes() + bytes(data)


def symbols(rng: random.Random, seed: Seed, other: Seed) -> bytes:
    """The inflated symbol stream edited (extreme or random symbols), re-deflated, index and CRCs rebuilt: a forgery
    that is valid at every level below the quantizer."""
    header, payload = wire.parse(seed.blob)
    stream = bytearray(DeflateCPU.decompress(payload, header.chunks, header.stream_size))
    for _ in range(rng.randint(1, 64)):
        start = rng.randrange(len(stream))
        run = rng.choice((1, 1, 16, 1024))
        value = rng.choice(SYMBOL_EDGES)
        stream[start : start + run] = (bytes([value]) * run if rng.random() < 0.7 else rng.randbytes(run))[
            : len(stream) - start]
    sizes = [c.raw for c in header.chunks]
    sections, position = [], 0
    for size in sizes:
        sections.append(bytes(stream[position : position + size]))
        position += size
    data, index = DeflateCPU().compress(sections)
    return dataclasses.replace(header, chunks=index, payload_size=len(data),
                               payload_crc=zlib.crc32(data)).to_bytes() + data


def splice(rng: random.Random, seed: Seed, other: Seed) -> bytes:
    """One blob's header fields with another's chunk index and payload, all CRCs valid."""
    header, _ = wire.parse(seed.blob)
    foreign, payload = wire.parse(other.blob)
    return dataclasses.replace(header, chunks=foreign.chunks, payload_size=foreign.payload_size,
                               payload_crc=foreign.payload_crc).to_bytes() + bytes(payload)


def padding(rng: random.Random, seed: Seed, other: Seed) -> bytes:
    """Bytes after the payload: zeros or junk, with the PADDED flag set or cleared (header CRC recomputed)."""
    header, payload = wire.parse(seed.blob)
    flags = header.flags ^ (wire.FLAG_PADDED if rng.random() < 0.5 else 0)
    tail = bytes(rng.choice((1, 15, 4096))) if rng.random() < 0.5 else rng.randbytes(rng.choice((1, 7, 300)))
    return dataclasses.replace(header, flags=flags).to_bytes() + bytes(payload) + tail


def behind_magic(rng: random.Random, seed: Seed, other: Seed) -> bytes:
    """Random bytes behind a valid magic (and sometimes a valid version)."""
    head = wire.MAGIC + (struct.pack("<H", wire.VERSION) if rng.random() < 0.5 else b"")
    return head + rng.randbytes(rng.choice((0, 10, 76, 200, 5000)))


STRATEGIES: dict[str, Callable[[random.Random, Seed, Seed], bytes]] = {
    f.__name__: f for f in (bit_flips, truncation, header_field, chunk_index, payload_bytes, symbols, splice,
                            padding, behind_magic)
}


def group_container(rng: random.Random, blobs: list[bytes]) -> bytes:
    """A two-group ``KVTG`` object whose header (version, count, lengths) may lie about its blobs."""
    version, count = rng.choice((1, 1, 1, 0, 2)), rng.choice((2, 2, 2, 1, 3, 65535))
    lengths = [len(b) for b in blobs]
    if rng.random() < 0.5:
        i = rng.randrange(2)
        lengths[i] = rng.choice((0, 1, lengths[i] - 1, lengths[i] + 1, (1 << 64) - 1))
    return (struct.pack("<4sHH", wire.GROUP_MAGIC, version, count) + b"".join(struct.pack("<Q", n) for n in lengths)
            + b"".join(blobs))


# -- doors -------------------------------------------------------------------------------------------
def _check_kv(kv: torch.Tensor, shape: tuple, dtype: torch.dtype) -> str | None:
    if tuple(kv.shape) != tuple(shape) or kv.dtype != dtype:
        return f"decoded {tuple(kv.shape)} {kv.dtype}, destination {tuple(shape)} {dtype}"
    if not torch.isfinite(kv).all():
        return "decoded KV is not finite"
    return None


class Doors:
    """The three readers, each given what its caller knows about the destination."""

    def __init__(self, codec: KVTCCodec, engine: KVTCEngine, layers: int, hidden: int):
        self.codec, self.engine, self.layers, self.hidden = codec, engine, layers, hidden

    def shape(self, tokens: int) -> tuple[int, int, int, int]:
        return (2, self.layers, tokens, self.hidden)

    def all(self, data: bytes, tokens: int) -> dict[str, Callable[[], str | None]]:
        shape = self.shape(tokens)
        return {
            "codec": lambda: _check_kv(self.codec.decode(data, tokens=tokens, dtype=torch.bfloat16), shape,
                                       torch.bfloat16),
            "engine": lambda: _check_kv(self.engine.decode(memoryview(data), [shape], [torch.bfloat16])[0], shape,
                                        torch.bfloat16),
            "classic": lambda: self._classic(data, shape),
        }

    def _classic(self, data: bytes, shape: tuple) -> str | None:
        from lmcache.v1.memory_management import MemoryFormat

        kv, _ = decode_record(self.engine, pack_record(data, torch.Size(shape), torch.bfloat16,
                                                       MemoryFormat.KV_2LTD), max_tokens=2 * CHUNK)
        return _check_kv(kv, shape, torch.bfloat16)

    def group(self, data: bytes, tokens: int) -> Callable[[], str | None]:
        shape = self.shape(tokens)

        def run() -> str | None:
            out = self.engine.decode(memoryview(data), [shape, shape], [torch.bfloat16, torch.bfloat16])
            return next((f for f in (_check_kv(kv, shape, torch.bfloat16) for kv in out) if f), None)

        return run


def run_case(door: Callable[[], str | None]) -> tuple[str, float, str | None]:
    """``(outcome, seconds, finding)`` of one door on one case."""
    started = time.perf_counter()
    try:
        finding = door()
        outcome = "decoded" if finding is None else "finding"
    except CodecError as exc:
        outcome, finding = f"refused:{type(exc).__name__}", None
    except Exception as exc:  # noqa: BLE001 -- anything but a CodecError is what we are looking for
        outcome, finding = "finding", f"{type(exc).__name__}: {exc}"
    elapsed = time.perf_counter() - started
    if finding is None and elapsed > CASE_SECONDS:
        outcome, finding = "finding", f"took {elapsed:.1f} s"
    return outcome, elapsed, finding


def fuzz(doors: Doors, seeds: list[Seed], cases: int, seed: int = 0, progress=None) -> dict:
    """``cases`` hostile inputs, each through every door; returns outcome counts, findings and timings.

    Runs torch single-threaded: the tensors are small, and on a busy machine intra-op threads cost ~10×.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _fuzz(doors, seeds, cases, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _fuzz(doors: Doors, seeds: list[Seed], cases: int, seed: int, progress) -> dict:
    rng = random.Random(seed)
    counts: dict[str, Counter] = {}
    findings: list[dict] = []
    slowest = 0.0
    names = [*STRATEGIES, "group_container"]
    for case in range(cases):
        strategy = names[case % len(names)]
        first, second = rng.choice(seeds), rng.choice(seeds)
        if strategy == "group_container":
            pair = [s for s in seeds if s.tokens == first.tokens]
            blobs = [rng.choice(pair).blob[: wire.extent(first.blob)], rng.choice(pair).blob]
            if rng.random() < 0.5:
                blobs[rng.randrange(2)] = STRATEGIES[rng.choice(list(STRATEGIES))](rng, first, second)
            data = group_container(rng, blobs)
            trials = {"engine": doors.group(data, first.tokens)}
        else:
            data = STRATEGIES[strategy](rng, first, second)
            trials = doors.all(data, first.tokens)
        for door, call in trials.items():
            outcome, elapsed, finding = run_case(call)
            slowest = max(slowest, elapsed)
            counts.setdefault(f"{strategy} / {door}", Counter())[outcome] += 1
            if finding:
                findings.append({"case": case, "strategy": strategy, "door": door, "seed": first.label,
                                 "finding": finding})
        if progress is not None:
            progress(case)
    return {"cases": cases, "seed": seed, "outcomes": {k: dict(v) for k, v in sorted(counts.items())},
            "findings": findings, "slowest_case_s": round(slowest, 3),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def build(calibration_path: Path, kv: torch.Tensor) -> tuple[Doors, list[Seed]]:
    from lmcache_kvtc import Calibration

    calibration = Calibration.load(calibration_path)
    codec = KVTCCodec(calibration)
    engine = KVTCEngine(SerdeOptions(calibration=str(calibration_path), fixed_size=True))
    doors = Doors(codec, engine, calibration.layers, calibration.hidden)
    return doors, make_seeds(codec, kv)


def main(argv=None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tqdm import tqdm

    from calibration import models, texts
    from calibration.recipes import default_calibration
    from lmcache_kvtc.calibrate.capture import prefill

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    model, tokenizer = models.load(args.model)
    ids = texts.token_contexts(tokenizer, texts.python_docs(), 1, 2 * CHUNK, seed=5)[0]
    kv, _ = prefill(model, ids, logits_to_keep=1)
    doors, seeds = build(default_calibration(args.model), kv)
    parts = []
    with tqdm(total=args.cases, desc="fuzzing", unit="case", mininterval=5) as bar:
        for block, begin in enumerate(range(0, args.cases, BLOCK)):  # a report after every block
            cases = min(BLOCK, args.cases - begin)
            parts.append(fuzz(doors, seeds, cases, args.seed * 1000 + block, progress=lambda _: bar.update()))
            report = merge(parts)
            if args.out:
                args.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 1 if report["findings"] else 0


def merge(parts: list[dict]) -> dict:
    """One report of several runs (blocks of one script run, each with its own seed)."""
    outcomes: dict[str, Counter] = {}
    for part in parts:
        for name, counts in part["outcomes"].items():
            outcomes.setdefault(name, Counter()).update(counts)
    return {"cases": sum(p["cases"] for p in parts), "seeds": [p["seed"] for p in parts],
            "outcomes": {k: dict(v) for k, v in sorted(outcomes.items())},
            "findings": [f for p in parts for f in p["findings"]],
            "slowest_case_s": max(p["slowest_case_s"] for p in parts),
            "peak_rss_mb": max(p["peak_rss_mb"] for p in parts)}


if __name__ == "__main__":
    raise SystemExit(main())
