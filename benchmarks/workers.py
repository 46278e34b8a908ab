"""Store and load throughput of the ``kvtc`` serde vs its ``max_workers``, through LMCache 0.5.6's MP StorageManager.

A real KV cache (Qwen2.5-Coder-0.5B prefill of held-out Python docs, ``--tokens`` long, 256-token chunks) is
stored into an ``fs`` tier and loaded back with L1 cleared, once per worker count and repeat, in one process,
side by side; sealed (AES-GCM, ``master_key_path``) rows use the same chunks. MB/s = bf16 bytes of the chunks /
wall seconds from the first L1 write until every chunk is in L2 (store), or of the prefetch (load). Every run's
loaded chunks must equal the one-worker run's, bit for bit.

    python -m benchmarks.workers [--workers 1,2,4] [--tokens 4096] [--repeats 3] [--sealed] [--calibration PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from calibration import models, texts, tiers
from calibration.recipes import default_calibration
from lmcache_kvtc.calibrate.capture import prefill

MODEL = "qwen2.5-coder-0.5b"


def real_chunks(tokens: int) -> list[torch.Tensor]:
    model, tokenizer = models.load(MODEL)
    ids = texts.token_contexts(tokenizer, texts.python_docs(), 1, tokens, seed=11)[0]
    with torch.no_grad():
        kv, _ = prefill(model, ids, logits_to_keep=1)
    return [kv[:, :, i : i + tiers.CHUNK_TOKENS].contiguous() for i in range(0, tokens, tiers.CHUNK_TOKENS)]


def one_run(chunks, calibration: Path, workers: int, serde: dict) -> tuple[float, float, list[torch.Tensor]]:
    with tempfile.TemporaryDirectory() as root:
        adapter = tiers.with_kvtc({"type": "fs", "base_path": root}, str(calibration), 16, max_workers=workers,
                                  **serde)
        sm = tiers.storage_manager([adapter], l1_size_gb=1.0)
        listener = tiers.StoreListener()
        sm.register_l2_listener(listener)
        keys = tiers.chunk_keys(MODEL, len(chunks))
        try:
            started = time.monotonic()
            tiers.store(sm, keys, chunks)
            if tiers.wait_stored(sm, listener, keys, timeout=600) != len(chunks):
                raise RuntimeError("not every chunk was stored")
            store_s = time.monotonic() - started
            sm.clear(force=True)
            started = time.monotonic()
            loaded, hits = tiers.load(sm, keys, chunks[0].shape, torch.bfloat16, timeout=600)
            load_s = time.monotonic() - started
        finally:
            sm.close()
    if hits != len(chunks) or len(loaded) != len(chunks):
        raise RuntimeError(f"{hits} of {len(chunks)} chunks came back")
    return store_s, load_s, loaded


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sealed", action="store_true", help="also time sealed blobs (AES-256-GCM)")
    parser.add_argument("--calibration", type=Path, help="default: the model's cached calibration (built if missing)")
    args = parser.parse_args(argv)
    tiers.register()
    torch.manual_seed(0)
    chunks = real_chunks(args.tokens)
    megabytes = sum(c.numel() * c.element_size() for c in chunks) / 1e6
    calibration = args.calibration or default_calibration(MODEL)
    variants = {"kvtc 16x": {}}
    if args.sealed:
        key = Path(tempfile.mkdtemp()) / "master.key"
        key.write_bytes(os.urandom(32))
        variants["kvtc 16x sealed"] = {"master_key_path": str(key)}
    workers = [int(w) for w in args.workers.split(",")]
    times: dict[tuple[str, int], list[tuple[float, float]]] = {}
    reference = None
    for _ in range(args.repeats):  # interleaved, so that machine noise hits every row alike
        for name, serde in variants.items():
            for w in workers:
                store_s, load_s, loaded = one_run(chunks, calibration, w, serde)
                reference = reference or loaded
                if not all(torch.equal(a, b) for a, b in zip(reference, loaded, strict=True)):
                    raise RuntimeError(f"{name} with {w} workers loaded other KV than the first run")
                times.setdefault((name, w), []).append((store_s, load_s))
    print(f"# kvtc serde throughput vs max_workers ({MODEL}, {len(chunks)} chunks of 256 tokens = "
          f"{megabytes:.1f} MB bf16, fs tier; {os.cpu_count()} CPU cores, {platform.machine()})\n")
    print("Median (min–max) MB/s of bf16 KV over", args.repeats, "repeats; loads bit-identical across rows.\n")
    print("| serde | workers | store MB/s | load MB/s |\n|---|---|---|---|")
    for (name, w), runs in times.items():
        cells = []
        for column in (0, 1):
            rates = sorted(megabytes / r[column] for r in runs)
            cells.append(f"{statistics.median(rates):.1f} ({rates[0]:.1f}–{rates[-1]:.1f})")
        print(f"| {name} | {w} | {cells[0]} | {cells[1]} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
