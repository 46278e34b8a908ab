"""Standalone blob round trip with the public API: real KV cache -> blob file -> KV cache.

    .venv/bin/python examples/standalone_roundtrip.py [--ratio 16] [--calibration FILE]

Uses the offline Qwen2.5-Coder-0.5B and its default calibration (built on first use).
`kvtc roundtrip` is the same with a full quality report.
"""

import argparse
from pathlib import Path

import torch

from calibration import models, texts
from calibration.calibrate import default_calibration
from lmcache_kvtc import Calibration, CodecError, KVTCCodec
from lmcache_kvtc.calibrate.capture import prefill

parser = argparse.ArgumentParser()
parser.add_argument("--ratio", type=float, default=16)
parser.add_argument("--calibration", type=Path)
args = parser.parse_args()

model, tokenizer = models.load("qwen2.5-coder-0.5b")
ids = texts.token_contexts(tokenizer, texts.python_docs(), 1, 1024)[0]
kv, _ = prefill(model, ids, logits_to_keep=1)  # LMCache layout [2, L, T, H*D], bf16

codec = KVTCCodec(Calibration.load(args.calibration or default_calibration()), ratio=args.ratio)
path = Path("out/standalone.kvtc")
path.parent.mkdir(exist_ok=True)
path.write_bytes(codec.encode(kv, start=0))  # 4 sink + 128 recent tokens stored exactly

restored = codec.decode(path.read_bytes())
error = (restored.float() - kv.float()).norm() / kv.float().norm()
print(f"{kv.numel() * 2:,} bf16 bytes -> {path.stat().st_size:,} blob bytes "
      f"({kv.numel() * 2 / path.stat().st_size:.1f}x), relative error {error:.4f}, "
      f"sinks/window exact: {torch.equal(restored[:, :, -128:], kv[:, :, -128:])}")

damaged = bytearray(path.read_bytes())
damaged[100] ^= 1
try:
    codec.decode(bytes(damaged))
except CodecError as exc:
    print(f"a damaged blob is refused: {type(exc).__name__}: {exc}")
