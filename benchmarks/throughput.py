"""Encode/decode throughput of KVTC on bf16 KV chunks, against LMCache's fp8 serde and a plain copy.

GB/s = bytes of the bf16 input tensor / seconds (the same numerator for encode and decode,
for every method), median over ``--repeats`` timed runs after one warm-up; the spread is
min–max. Every method runs in the same process on the same tensors.

* Chunks are LMCache chunks ``[2, L, 256, H·D]`` encoded as the serde does (``start = 256·i``,
  4 sinks at position 0, no recent window). ``--mode loop`` codes a batch of B chunks as B
  blobs (what the serde stores); ``--mode concat`` codes them as one tensor of ``256·B``
  tokens (one blob; the batched upper bound).
* Calibrations are SYNTHETIC (no real 8B model is available offline): a random orthonormal
  basis (block-diagonal QR) of rank ``min(p, --rank)``, KV drawn from a decaying spectrum in
  that basis, and one plan that keeps every component with the step of the spectrum's quarter
  point (what a calibrated plan looks like near 16×). For the 8B shape p = 32·1024 = 32768; the
  default rank is 4096. The stored ratio that results is printed.
* "copy": device-to-host copy into pinned memory (encode column) and host-to-device
  (decode column); on ``--device cpu`` it is a host memcpy. "fp8": LMCache 0.5.6's
  ``Fp8QuantizationSerializer``/``Deserializer`` with both buffers on ``--device``.

    python -m benchmarks.throughput --device cuda --shapes 8b,qwen0.5b,qwen1.5b,gemma --batches 1,4,16,64
    python -m benchmarks.throughput --device cpu --shapes qwen0.5b --batches 1,4 --repeats 3   # small CPU run
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmcache_kvtc.calibrate.fitting import assemble
from lmcache_kvtc.calibration import STREAMS, Calibration, Plan, StreamBasis, StreamPlan
from lmcache_kvtc.codec import KVTCCodec
from lmcache_kvtc.quantizer import wide_count
from lmcache_kvtc.rope import RopeTable

from .baselines import _memory_obj

CHUNK = 256
#: name -> (layers, kv_heads, head_dim)
SHAPES = {"8b": (32, 8, 128), "qwen0.5b": (24, 2, 64), "qwen1.5b": (28, 2, 128), "gemma": (18, 1, 256)}


def synthetic_calibration(layers: int, heads: int, head_dim: int, rank: int, ratio: float,
                          seed: int = 0) -> tuple[Calibration, torch.Tensor]:
    """Calibration with a random orthonormal rank-``rank`` basis and one plan; also the spectrum."""
    g = torch.Generator().manual_seed(seed)
    p = layers * heads * head_dim
    rank = min(rank, p) - min(rank, p) % 64
    pieces = 8 if rank % (8 * 64) == 0 and p % 8 == 0 else 1
    basis = torch.zeros(p, rank)
    rows, cols = p // pieces, rank // pieces
    for i in range(pieces):  # block-diagonal: cheap to orthonormalise, dense to the codec all the same
        q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=g))
        basis[i * rows : (i + 1) * rows, i * cols : (i + 1) * cols] = q
    spectrum = (torch.arange(1, rank + 1, dtype=torch.float64) ** -1.2) * 50.0
    eigenvalues = torch.cat((spectrum, torch.zeros(p - rank, dtype=torch.float64)))
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    rope = RopeTable(inv_freq=inv.repeat(layers, 1), attention_scaling=torch.ones(layers), head_dim=head_dim)
    streams = {s: StreamBasis(torch.full((p,), 0.5), basis, eigenvalues) for s in STREAMS}
    step = float(spectrum[rank // 4].sqrt())
    quantizer = StreamPlan(step=step, rank=rank, wide=wide_count(spectrum.sqrt(), step, rank), expected_error=0.0,
                           expected_bits=16 * p / ratio / 2)
    plan = Plan(ratio=ratio, streams={s: quantizer for s in STREAMS})
    calibration = assemble(model_id=f"synthetic-{layers}x{heads}x{head_dim}", kv_heads=heads, head_dim=head_dim,
                           rope=rope, streams=streams, plans=[plan], info={"synthetic": True})
    return calibration, spectrum.float()


def synthetic_kv(calibration: Calibration, spectrum: torch.Tensor, tokens: int, device: torch.device,
                 seed: int = 1) -> torch.Tensor:
    """bf16 ``[2, L, tokens, H·D]`` drawn from the calibration's spectrum, keys rotated at positions 0…tokens-1."""
    g = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(2, calibration.layers, tokens, calibration.hidden, dtype=torch.bfloat16, device=device)
    scale = spectrum.sqrt().to(device)
    for i, s in enumerate(STREAMS):
        mean, basis = (t.to(device) for t in (calibration.streams[s].mean, calibration.streams[s].basis))
        z = torch.randn(tokens, basis.shape[1], generator=g, device=device) * scale[: basis.shape[1]]
        x = (z @ basis.T + mean + 0.01 * torch.randn(tokens, basis.shape[0], generator=g, device=device))
        x = x.reshape(tokens, calibration.layers, calibration.hidden).transpose(0, 1)
        if s == "keys":
            x = calibration.rope.rotate(x, torch.arange(tokens, device=device), torch.bfloat16)
        out[i] = x.to(torch.bfloat16)
    return out


def _time(fn: Callable[[], object], device: torch.device, repeats: int) -> list[float]:
    fn()  # warm-up (allocations, cuBLAS/nvCOMP handles)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return times


def _rates(nbytes: int, times: list[float]) -> tuple[float, float, float]:
    rates = [nbytes / t / 1e9 for t in times]
    return statistics.median(rates), min(rates), max(rates)


def _methods(codec: KVTCCodec, plan: int, items: list[tuple[torch.Tensor, int]], device: torch.device) -> dict:
    """method -> (encode fn, decode fn, stored ratio), all over the same chunks ``(kv, start)``."""
    blobs = [codec.encode(t, plan=plan, start=s, sinks=4, window=0) for t, s in items]
    nbytes = sum(t.numel() * t.element_size() for t, _ in items)
    copies = [(t, torch.empty(t.shape, dtype=t.dtype, pin_memory=device.type == "cuda"), torch.empty_like(t))
              for t, _ in items]
    methods = {
        f"KVTC {codec.calibration.plans[plan].ratio:g}x": (
            lambda: [codec.encode(t, plan=plan, start=s, sinks=4, window=0) for t, s in items],
                                   lambda: [codec.decode(b) for b in blobs], nbytes / sum(len(b) for b in blobs)),
        "copy (D2H / H2D)": (lambda: [h.copy_(t, non_blocking=True) for t, h, _ in copies],
                             lambda: [b.copy_(h, non_blocking=True) for _, h, b in copies], 1.0),
    }
    try:  # a GPU machine may have torch and nvCOMP but not LMCache (and its compiled ops) installed
        from lmcache.v1.distributed.api import ObjectKey
        from lmcache.v1.distributed.serde.fp8 import Fp8QuantizationDeserializer, Fp8QuantizationSerializer
    except ImportError as error:
        print(f"LMCache fp8 row left out: {error}", flush=True)
        return methods
    key = ObjectKey(bytes(32), "benchmark", 0)
    serializer, deserializer = Fp8QuantizationSerializer(), Fp8QuantizationDeserializer()
    fp8 = [(_memory_obj(t), _memory_obj(torch.empty(t.numel(), dtype=torch.uint8, device=device)),
            _memory_obj(torch.empty_like(t))) for t, _ in items]
    methods["LMCache fp8"] = (lambda: [serializer.serialize(a, b, key) for a, b, _ in fp8],
                              lambda: [deserializer.deserialize(b, c, key) for _, b, c in fp8], 2.0)
    return methods


def run_shape(name: str, batches: list[int], device: torch.device, mode: str, repeats: int, rank: int,
              ratio: float, coder) -> tuple[list[dict], str]:
    layers, heads, head_dim = SHAPES[name]
    calibration, spectrum = synthetic_calibration(layers, heads, head_dim, rank, ratio)
    plan = calibration.plan_index(ratio)
    rung = calibration.plans[plan]
    note = (f"{name}: [2, {layers}, {CHUNK}, {heads * head_dim}], p = {calibration.features}, synthetic basis of "
            f"rank {min(rank, calibration.features)}; the plan keeps {rung.rank('keys')} components "
            f"(step {rung.streams['keys'].step:.3g})")
    codec = KVTCCodec(calibration, device=device, coder=coder)
    kv = synthetic_kv(calibration, spectrum, CHUNK * max(batches), device)
    rows = []
    for batch in batches:
        if mode == "loop":
            items = [(kv[:, :, i * CHUNK : (i + 1) * CHUNK].contiguous(), i * CHUNK) for i in range(batch)]
        else:
            items = [(kv[:, :, : batch * CHUNK].contiguous(), 0)]
        nbytes = sum(t.numel() * t.element_size() for t, _ in items)
        for method, (encode, decode, stored_ratio) in _methods(codec, plan, items, device).items():
            enc, dec = _rates(nbytes, _time(encode, device, repeats)), _rates(nbytes, _time(decode, device, repeats))
            rows.append({"shape": name, "batch": batch, "method": method, "encode": enc, "decode": dec,
                         "ratio": stored_ratio, "mib": nbytes / 2**20})
            print(f"{name:9} B={batch:<3} {method:18} enc {enc[0]:8.3f} GB/s  dec {dec[0]:8.3f} GB/s", flush=True)
    return rows, note


def prefill_comparison(device: torch.device, contexts: list[int], repeats: int, coder) -> list[str]:
    """Load-and-decode (blobs in host memory -> KV on ``device``) vs recomputing the prefill, real Qwen 0.5B."""
    from calibration import models
    from calibration.recipes import default_calibration_path
    from lmcache_kvtc.calibrate.capture import prefill

    model_name = "qwen2.5-coder-0.5b"
    path = default_calibration_path(model_name)
    if not path.exists() or not models.is_prepared(model_name):
        return [f"load-and-decode vs prefill: skipped ({path} or the model is absent; build it with "
                f"`python -m calibration.recipes --default {model_name}`)"]
    calibration = Calibration.load(path)
    codec, plan = KVTCCodec(calibration, device=device, coder=coder), calibration.plan_index(16.0)
    model, _ = models.load(model_name)
    model = model.to(device)
    lines = ["| context | prefill s (median) | load+decode s (median) | speed-up |", "|---|---|---|---|"]
    for tokens in contexts:
        ids = torch.randint(100, 20000, (tokens,), generator=torch.Generator().manual_seed(tokens))
        kv, _ = prefill(model, ids, logits_to_keep=1)
        blobs = [codec.encode(kv[:, :, i : i + CHUNK].contiguous(), plan=plan, start=i, sinks=4, window=0)
                 for i in range(0, tokens, CHUNK)]
        t_prefill = statistics.median(_time(lambda ids=ids: prefill(model, ids, logits_to_keep=1), device, repeats))
        t_decode = statistics.median(_time(lambda blobs=blobs: [codec.decode(b) for b in blobs], device, repeats))
        lines.append(f"| {tokens} | {t_prefill:.3f} | {t_decode:.3f} | {t_prefill / t_decode:.1f}x |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", default="8b,qwen0.5b,qwen1.5b,gemma")
    parser.add_argument("--batches", default="1,4,16,64")
    parser.add_argument("--mode", choices=("loop", "concat"), default="loop")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rank", type=int, default=4096, help="synthetic basis rank cap (p is 32768 for 8b)")
    parser.add_argument("--ratio", type=float, default=16.0)
    parser.add_argument("--coder", choices=("auto", "cpu"), default="auto", help="auto: select_coder(device)")
    parser.add_argument("--prefill", default="", help="contexts for load-and-decode vs prefill, e.g. 2048,8192")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write")
    args = parser.parse_args(argv)

    from lmcache_kvtc.entropy import DeflateCPU
    from lmcache_kvtc.entropy_gpu import select_coder

    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # the codec's exactness across devices assumes fp32 matmuls
    coder = select_coder(device) if args.coder == "auto" else DeflateCPU()
    batches = [int(b) for b in args.batches.split(",")]
    started = time.time()
    rows, notes = [], []
    for name in args.shapes.split(","):
        shape_rows, note = run_shape(name, batches, device, args.mode, args.repeats, args.rank, args.ratio, coder)
        rows += shape_rows
        notes.append(note)
    env = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    lines = [
        f"# KVTC throughput ({env}; entropy coder {type(coder).__name__}; mode {args.mode}; "
        f"{args.repeats} repeats; {time.time() - started:.0f} s)", "",
        "GB/s = bf16 input bytes / s; median [min–max]. Synthetic calibrations:", "",
        *[f"- {n}" for n in notes], "",
        "| shape | batch | MiB | method | encode GB/s | decode GB/s | stored ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        enc, dec = r["encode"], r["decode"]
        lines.append(f"| {r['shape']} | {r['batch']} | {r['mib']:.1f} | {r['method']} | "
                     f"{enc[0]:.3f} [{enc[1]:.3f}–{enc[2]:.3f}] | {dec[0]:.3f} [{dec[1]:.3f}–{dec[2]:.3f}] | "
                     f"{r['ratio']:.2f} |")
    if args.prefill:
        lines += ["", *prefill_comparison(device, [int(c) for c in args.prefill.split(",")], args.repeats, coder)]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
