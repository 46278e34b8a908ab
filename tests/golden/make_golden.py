"""Writes the golden files next to this script: a synthetic calibration, KV inputs, the blobs today's code makes
of them, and what those blobs decode to. ``tests/test_golden_blobs.py`` decodes the committed blobs with the
committed calibration, so any change that would stop old blobs or calibrations from decoding the same shows up.

Rerun only on purpose (a new wire or calibration format version), and commit what it writes:

    .venv/bin/python tests/golden/make_golden.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from synthetic import synthetic_calibration, tensor_digest  # noqa: E402

from lmcache_kvtc import KVTCCodec  # noqa: E402
from lmcache_kvtc.lmcache.engine import KVTCEngine  # noqa: E402
from lmcache_kvtc.lmcache.options import SerdeOptions  # noqa: E402

#: serde-engine cases: name -> the LMCache MP kernel-group shapes of one stored object
ENGINE_CASES = {
    "engine-split": [(2, 2, 256, 64)],  # one kernel group: a bare kvtc blob, zero-padded to its fixed size
    "engine-two-groups": [(2, 2, 256, 64), (1, 2, 256, 128)],  # split + fused: a KVTG group container
}


def to_fused(kv: torch.Tensor, heads: int = 2) -> torch.Tensor:
    """``[2, L, T, H·D]`` -> ``[1, L, T, H·2·D]`` (per head ``[K | V]``)."""
    _, layers, tokens, hidden = kv.shape
    per_head = kv.reshape(2, layers, tokens, heads, hidden // heads)
    return torch.cat([per_head[0], per_head[1]], dim=-1).reshape(1, layers, tokens, 2 * hidden)


def main() -> None:
    calibration, make = synthetic_calibration()
    calibration_path = HERE / "synthetic.safetensors"
    calibration.save(calibration_path)
    tensors, manifest = {}, {"calibration": calibration_path.name, "fingerprint": calibration.fingerprint.hex(),
                             "blobs": {}}

    kv = make(300, 10)
    blob = KVTCCodec(calibration).encode(kv, plan=calibration.plan_index(16), start=10, sinks=4, window=16)
    (HERE / "codec.kvtc").write_bytes(blob)
    tensors["codec.input.0"] = kv
    manifest["blobs"]["codec"] = {"file": "codec.kvtc", "start": 10, "sinks": 4, "window": 16, "ratio": 16,
                                  "decoded_sha256": [tensor_digest(KVTCCodec(calibration).decode(blob))]}

    engine = KVTCEngine(SerdeOptions(str(calibration_path), ratio=16))
    for name, shapes in ENGINE_CASES.items():
        chunk = make(256, 512)
        objects = [chunk if len(shape) == 4 and shape[0] == 2 else to_fused(chunk) for shape in shapes]
        blob = engine.encode(objects, None)
        blob += bytes(engine.estimate([o.shape for o in objects], [o.dtype for o in objects]) - len(blob))
        (HERE / f"{name}.kvtc").write_bytes(blob)
        decoded = engine.decode(memoryview(blob), [o.shape for o in objects], [o.dtype for o in objects])
        tensors.update({f"{name}.input.{i}": obj for i, obj in enumerate(objects)})
        manifest["blobs"][name] = {"file": f"{name}.kvtc", "shapes": shapes, "ratio": 16,
                                   "decoded_sha256": [tensor_digest(out) for out in decoded]}

    save_file({k: v.contiguous() for k, v in tensors.items()}, HERE / "tensors.safetensors")
    (HERE / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(f"wrote golden files to {HERE} (calibration {manifest['fingerprint']})")


if __name__ == "__main__":
    main()
