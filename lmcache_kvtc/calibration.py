"""The calibration: what KVTC learns once per model and reuses for every cache.

Per stream (keys, values): the mean, the PCA basis trimmed to the rank any plan uses, and
the full eigen-spectrum (for reports); the model's RoPE table; and a ladder of quantizer
plans, one per target ratio. Stored as safetensors with one JSON metadata
entry; no pickle. The fingerprint hashes all of it, so a blob can prove which
calibration made it.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import CalibrationError
from .rope import RopeTable

FORMAT = "lmcache-kvtc-calibration"
#: 2: one quantizer step per stream and plan (version 1 held per-token min/max blocks: recalibrate)
FORMAT_VERSION = 2
STREAMS = ("keys", "values")


@dataclass
class StreamBasis:
    """PCA of one stream: ``c = ((x - mean) / scale) @ basis``; ``x ≈ (c @ basis.T) · scale + mean``.

    ``scale`` (optional, per feature) evens out layers of very different magnitude so that each
    layer's *relative* error counts alike (Gemma 3's first layers carry 10× the value energy
    of its global-attention layers); ``None`` means 1.
    """

    mean: torch.Tensor  # [p] float32
    basis: torch.Tensor  # [p, rank] float32, columns by decreasing variance
    eigenvalues: torch.Tensor  # [p] float64, the full spectrum (variance per component, scaled space)
    scale: torch.Tensor | None = None  # [p] float32, > 0

    def to(self, device: torch.device | str) -> StreamBasis:
        scale = None if self.scale is None else self.scale.to(device)
        return StreamBasis(self.mean.to(device), self.basis.to(device), self.eigenvalues, scale)

    def project(self, x: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        """``[N, p]`` features -> ``[N, rank]`` coefficients (fp32)."""
        centered = x.float() - self.mean
        if self.scale is not None:
            centered = centered / self.scale
        return centered @ self.basis[:, :rank]

    def reconstruct(self, coefficients: torch.Tensor) -> torch.Tensor:
        """``[N, r]`` coefficients -> ``[N, p]`` features (fp32)."""
        x = coefficients @ self.basis[:, : coefficients.shape[1]].T
        return (x if self.scale is None else x * self.scale) + self.mean


@dataclass(frozen=True)
class StreamPlan:
    """How one stream is quantized at one rung: step, components kept, how many of them are int16."""

    step: float
    rank: int
    wide: int
    expected_error: float  # relative squared error on held-out calibration tokens
    expected_bits: float  # entropy-coded bits per token on the same tokens


@dataclass(frozen=True)
class Plan:
    """One rung of the ladder: a target ratio and each stream's quantizer."""

    ratio: float
    streams: dict[str, StreamPlan]

    def rank(self, stream: str) -> int:
        return self.streams[stream].rank

    def bits_per_token(self, stream: str) -> float:
        return self.streams[stream].expected_bits

    @property
    def expected_error(self) -> dict[str, float]:
        return {s: p.expected_error for s, p in self.streams.items()}


@dataclass
class Calibration:
    model_id: str
    layers: int
    kv_heads: int
    head_dim: int
    rope: RopeTable
    streams: dict[str, StreamBasis]
    plans: list[Plan]
    info: dict = field(default_factory=dict)

    @property
    def hidden(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def features(self) -> int:
        """p = layers × kv_heads × head_dim: the length of one token's vector per stream."""
        return self.layers * self.hidden

    @property
    def ratios(self) -> list[float]:
        return [plan.ratio for plan in self.plans]

    def plan_index(self, ratio: float) -> int:
        for i, plan in enumerate(self.plans):
            if abs(plan.ratio - ratio) < 1e-6:
                return i
        raise CalibrationError(f"no plan for ratio {ratio}; this calibration has {self.ratios}")

    # -- serialization -----------------------------------------------------------------
    def _tensors(self) -> dict[str, torch.Tensor]:
        tensors = {
            "rope.inv_freq": self.rope.inv_freq.float().contiguous(),
            "rope.attention_scaling": self.rope.attention_scaling.float().contiguous(),
        }
        for name, stream in self.streams.items():
            tensors[f"{name}.mean"] = stream.mean.float().contiguous()
            basis = stream.basis.float().contiguous()
            half = basis.half()  # fitted bases are fp16 values (:func:`...calibrate.fitting.assemble`): stored so
            tensors[f"{name}.basis"] = half if torch.equal(half.float(), basis) else basis
            tensors[f"{name}.eigenvalues"] = stream.eigenvalues.double().contiguous()
            if stream.scale is not None:
                tensors[f"{name}.scale"] = stream.scale.float().contiguous()
        return tensors

    def _metadata(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model_id": self.model_id,
            "layers": self.layers,
            "kv_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rope": {"head_dim": self.rope.head_dim, "interleaved": self.rope.interleaved},
            "plans": [
                {"ratio": plan.ratio, "streams": {s: vars(plan.streams[s]) for s in STREAMS}}
                for plan in self.plans
            ],
            "info": self.info,
        }

    @property
    def fingerprint(self) -> bytes:
        """16-byte content hash (metadata + every tensor byte); cached after the first call."""
        cached = self.__dict__.get("_fingerprint")
        if cached is None:
            digest = hashlib.sha256(json.dumps(self._metadata(), sort_keys=True).encode())
            for name, tensor in sorted(self._tensors().items()):
                digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                digest.update(tensor.numpy().tobytes())
            cached = self.__dict__["_fingerprint"] = digest.digest()[:16]
        return cached

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        save_file(self._tensors(), str(tmp), metadata={"kvtc": json.dumps(self._metadata())})
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        path = Path(path)
        if not path.is_file():
            raise CalibrationError(f"calibration file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["kvtc"])
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except CalibrationError:
            raise
        except Exception as exc:  # safetensors/JSON raise many types; all mean "not a calibration"
            raise CalibrationError(f"{path} is not a KVTC calibration file: {exc}") from exc
        return cls._from_parts(meta, tensors, str(path))

    @classmethod
    def _from_parts(cls, meta: dict, tensors: dict[str, torch.Tensor], origin: str) -> Calibration:
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            found = f"{meta.get('format')!r} v{meta.get('version')}"
            raise CalibrationError(f"{origin}: unsupported calibration format {found}; this code reads "
                                   f"{FORMAT!r} v{FORMAT_VERSION} (calibrate the model again)")
        basis_dtypes = {tensors[f"{s}.basis"].dtype for s in STREAMS if f"{s}.basis" in tensors}
        if not basis_dtypes <= {torch.float16, torch.float32}:
            raise CalibrationError(f"{origin}: basis stored as {basis_dtypes}; fp16 or fp32 expected")
        try:
            rope = RopeTable(
                inv_freq=tensors["rope.inv_freq"],
                attention_scaling=tensors["rope.attention_scaling"],
                head_dim=int(meta["rope"]["head_dim"]),
                interleaved=bool(meta["rope"]["interleaved"]),
            )
            streams = {
                s: StreamBasis(tensors[f"{s}.mean"], tensors[f"{s}.basis"].float(), tensors[f"{s}.eigenvalues"],
                               tensors.get(f"{s}.scale"))
                for s in STREAMS
            }
            plans = [
                Plan(ratio=float(p["ratio"]), streams={s: _stream_plan(p["streams"][s]) for s in STREAMS})
                for p in meta["plans"]
            ]
            calibration = cls(
                model_id=str(meta["model_id"]),
                layers=int(meta["layers"]),
                kv_heads=int(meta["kv_heads"]),
                head_dim=int(meta["head_dim"]),
                rope=rope,
                streams=streams,
                plans=plans,
                info=dict(meta.get("info", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"{origin}: incomplete calibration: {exc!r}") from exc
        calibration.validate(origin)
        return calibration

    def validate(self, origin: str = "calibration") -> None:
        """Check every shape and plan so the codec can trust them."""
        p = self.features

        def fail(why: str):
            raise CalibrationError(f"{origin}: {why}")

        if self.rope.layers != self.layers or self.rope.head_dim != self.head_dim:
            fail("RoPE table does not match the layer count / head_dim")
        if self.rope.rotary_dim > self.head_dim or self.rope.attention_scaling.shape != (self.layers,):
            fail("RoPE table has the wrong shape")
        for name, stream in self.streams.items():
            rank = stream.basis.shape[1] if stream.basis.dim() == 2 else -1
            if stream.mean.shape != (p,) or stream.basis.shape != (p, rank) or stream.eigenvalues.shape != (p,):
                fail(f"{name} basis/mean/eigenvalues do not have p = {p} features")
            if not (torch.isfinite(stream.mean).all() and torch.isfinite(stream.basis).all()):
                fail(f"{name} basis has non-finite values")
            if stream.scale is not None and (
                stream.scale.shape != (p,) or not (torch.isfinite(stream.scale).all() and (stream.scale > 0).all())
            ):
                fail(f"{name} scale must be {p} positive finite values")
        if not self.plans:
            fail("no plans")
        for plan in self.plans:
            for name in STREAMS:
                q = plan.streams[name]
                if not (math.isfinite(q.step) and q.step > 0 and 0 <= q.wide <= q.rank):
                    fail(f"plan {plan.ratio}: invalid {name} quantizer {q}")
                if q.rank > self.streams[name].basis.shape[1]:
                    fail(f"plan {plan.ratio}: uses {q.rank} {name} components, the basis has "
                         f"{self.streams[name].basis.shape[1]}")


def _stream_plan(entry: dict) -> StreamPlan:
    return StreamPlan(step=float(entry["step"]), rank=int(entry["rank"]), wide=int(entry["wide"]),
                      expected_error=float(entry["expected_error"]), expected_bits=float(entry["expected_bits"]))
