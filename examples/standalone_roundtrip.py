"""Standalone blob round trip with the public API: real KV cache -> blob file -> KV cache.

    .venv/bin/python -m examples.standalone_roundtrip [--ratio 12] [--calibration FILE]   # from the checkout

Uses the offline Qwen2.5-Coder-0.5B and its default calibration (built on first use).
`python -m calibration.roundtrip` (the main job) is the same with a full quality report.
"""

import argparse
from pathlib import Path

import torch

from calibration import models, texts
from calibration.recipes import default_calibration
from lmcache_kvtc import Calibration, CodecError, KVTCCodec
from lmcache_kvtc.calibrate.capture import prefill
from lmcache_kvtc.defaults import RATIO

parser = argparse.ArgumentParser()
parser.add_argument("--ratio", type=float, default=RATIO)
parser.add_argument("--calibration", type=Path)
args = parser.parse_args()

model, tokenizer = models.load("qwen2.5-coder-0.5b")
ids = texts.token_contexts(tokenizer, texts.python_docs(), 1, 1024)[0]
kv, _ = prefill(model, ids, logits_to_keep=1)  # LMCache layout [2, L, T, H*D], bf16

calibration = Calibration.load(args.calibration or default_calibration())
codec = KVTCCodec(calibration)
plan = calibration.plan_index(args.ratio)  # the rung of the calibration's ladder that coded to this ratio
path = Path("out/standalone.kvtc")
path.parent.mkdir(exist_ok=True)
path.write_bytes(codec.encode(kv, plan=plan, start=0))  # 4 sink + 128 recent tokens stored exactly
# or rate-controlled: the finest rung whose blob fits a byte budget (what the LMCache serde does)
within = codec.encode_within(kv, budget=int(kv.numel() * 2 / args.ratio), start=0)

restored = codec.decode(path.read_bytes())
error = (restored.float() - kv.float()).norm() / kv.float().norm()
print(f"{kv.numel() * 2:,} bf16 bytes -> {path.stat().st_size:,} blob bytes "
      f"({kv.numel() * 2 / path.stat().st_size:.1f}x), relative error {error:.4f}, "
      f"sinks/window exact: {torch.equal(restored[:, :, -128:], kv[:, :, -128:])}; within a 1/{args.ratio:g} "
      f"budget: {len(within):,} bytes")

damaged = bytearray(path.read_bytes())
damaged[100] ^= 1
try:
    codec.decode(bytes(damaged))
except CodecError as exc:
    print(f"a damaged blob is refused: {type(exc).__name__}: {exc}")
