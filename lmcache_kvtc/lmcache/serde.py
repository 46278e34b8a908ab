"""The ``kvtc`` serde for LMCache 0.5.6's multiprocess L2 path.

LMCache hands a serializer one L1 object per chunk (``[2, L, T, H·D]``, fused ``[1, L, T, NH·2·HS]``
or several kernel groups) plus its ``ObjectKey`` — never the chunk's token positions. So each group
is coded at an *estimated* base position (:mod:`.position`), stored in the blob with
``FLAG_START_ESTIMATED``; decode re-applies exactly what was stored.

0.5.6's ``fs``/``resp`` adapters only load objects of exactly ``estimate_serialized_size`` bytes,
so with ``fixed_size`` (the default) every blob is zero-padded to that size, which depends only on
the layout and the kwargs (``KVTCCodec.max_blob_size``). Anything the serde cannot code raises,
which LMCache turns into a failed store (a cache miss); a blob that fails validation on load
turns the load into a miss. Never wrong KV.

Adapter JSON kwargs (everything in ``"serde"`` except ``"type"``)::

    calibration   file or directory of calibrations (required; see .calibrations)
    ratio         target compression ratio, one of the calibration's plans (default 16)
    device        torch device for coding (default "cpu")
    fixed_size    pad blobs to the estimate (default true; false only for adapters that keep sizes)
    max_workers   serde thread pool size (default 1)
    sinks         tokens kept exact at sequence position 0 (default 4)
    max_position  positions searched for a chunk's base (default 131072)
    chunk_size    base positions are multiples of this (default: the object's token count)
"""

from __future__ import annotations

import contextlib
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields

import torch
from lmcache.logging import init_logger
from lmcache.v1.distributed.api import MemoryLayoutDesc, ObjectKey
from lmcache.v1.distributed.serde import (
    AsyncSerdeProcessor,
    Deserializer,
    Serializer,
    get_registered_serde_types,
    register_serde_factory,
)
from lmcache.v1.memory_management import MemoryObj

from .. import blob as wire
from ..calibration import Calibration
from ..codec import KVTCCodec
from ..errors import CodecError, CorruptBlobError, LayoutError
from .calibrations import CalibrationSet
from .layouts import GroupLayout, UnsupportedLayoutError, classify, from_split, to_split
from .position import PositionEstimator

log = init_logger(__name__)

SERDE_TYPE = "kvtc"
#: container for multi-group objects: magic, version, group count, then one u64 length per blob
GROUP_MAGIC = b"KVTG"
_GROUP_HEADER = struct.Struct("<4sHH")
_GROUP_LENGTH = struct.Struct("<Q")
#: a nominal buffer for objects kvtc refuses: serialize fails anyway, so do not reserve real space
_REFUSED_ESTIMATE = 4096
_BLOB_EXTENT = struct.Struct("<8xI52xQ")  # header_size at offset 8, payload_size at offset 64


@dataclass(frozen=True)
class SerdeOptions:
    """The adapter JSON's serde kwargs, validated (unknown keys are errors, not silently ignored)."""

    calibration: str
    ratio: float = 16.0
    device: str = "cpu"
    fixed_size: bool = True
    max_workers: int = 1
    sinks: int = 4
    max_position: int = 131072
    chunk_size: int = 0

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, object]) -> SerdeOptions:
        known = {f.name: f for f in fields(cls)}
        unknown = set(kwargs) - set(known)
        if unknown:
            raise ValueError(f"kvtc serde: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
        if not isinstance(kwargs.get("calibration"), str) or not kwargs["calibration"]:
            raise ValueError("kvtc serde: 'calibration' (a calibration file or directory) is required")
        values: dict[str, object] = {}
        for name, value in kwargs.items():
            kind = {"float": float, "int": int, "bool": bool, "str": str}[str(known[name].type)]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
                raise ValueError(f"kvtc serde: {name} must be {kind.__name__}, got {value!r}")
            values[name] = value
        options = cls(**values)
        if options.max_workers < 1 or options.sinks < 0 or options.max_position < 1 or options.chunk_size < 0:
            raise ValueError(f"kvtc serde: out-of-range option in {kwargs}")
        return options


@dataclass(frozen=True)
class EncodeEvent:
    """What one group of one stored object became (for reports and tests; see :func:`observe`)."""

    key: ObjectKey
    group: int
    start: int
    candidates: int
    blob_bytes: int
    raw_bytes: int


_observers: list[Callable[[EncodeEvent], None]] = []


@contextlib.contextmanager
def observe() -> Iterator[list[EncodeEvent]]:
    """Collect an :class:`EncodeEvent` for every group any kvtc serializer encodes inside the block."""
    events: list[EncodeEvent] = []
    _observers.append(events.append)
    try:
        yield events
    finally:
        _observers.remove(events.append)


class KVTCEngine:
    """Calibrations, codecs and position estimators shared by a serializer/deserializer pair."""

    def __init__(self, options: SerdeOptions):
        self.options = options
        self.calibrations = CalibrationSet.from_path(options.calibration)
        for calibration in self.calibrations.all():
            calibration.plan_index(options.ratio)  # fail at startup, not per chunk, on a missing plan
        self._codecs: dict[bytes, KVTCCodec] = {}
        self._estimators: dict[bytes, PositionEstimator] = {}
        self._lock = threading.Lock()
        self._refused: set[tuple] = set()

    def codec(self, calibration: Calibration) -> KVTCCodec:
        with self._lock:
            fp = calibration.fingerprint
            if fp not in self._codecs:
                self._codecs[fp] = KVTCCodec(calibration, device=self.options.device, ratio=self.options.ratio)
            return self._codecs[fp]

    def estimator(self, calibration: Calibration) -> PositionEstimator:
        with self._lock:
            fp = calibration.fingerprint
            if fp not in self._estimators:
                self._estimators[fp] = PositionEstimator(
                    calibration.rope, calibration.streams["keys"].mean, calibration.kv_heads,
                    max_position=self.options.max_position,
                )
            return self._estimators[fp]

    def head_dims(self) -> set[int]:
        return {c.head_dim for c in self.calibrations.all()}

    def group_layouts(self, shapes, dtypes) -> list[GroupLayout]:
        """Layout of each kernel group; fused shapes are recognized with the calibrations' head_dim."""
        layouts = []
        for shape, dtype in zip(shapes, dtypes, strict=True):
            errors = []
            for head_dim in sorted(self.head_dims()) or [None]:
                try:
                    layouts.append(classify(shape, dtype, head_dim))
                    break
                except UnsupportedLayoutError as exc:
                    errors.append(exc)
            else:
                raise errors[0]
        return layouts

    def group_bound(self, layout: GroupLayout) -> int:
        """Largest blob any fitting calibration can produce for this group (sinks included)."""
        fitting = self.calibrations.fitting(layout.layers, layout.hidden)
        if not fitting:
            raise UnsupportedLayoutError(
                f"no kvtc calibration in {self.calibrations.origin} fits {layout.layers} layers × "
                f"{layout.hidden} K/V width"
            )
        head = min(self.options.sinks, layout.tokens)
        return max(
            self.codec(c).max_blob_size(layout.tokens, exact_head=h, dtype=layout.dtype)
            for c in fitting
            for h in {0, head}
        )

    def estimate(self, shapes, dtypes) -> int:
        layouts = self.group_layouts(shapes, dtypes)
        bounds = [self.group_bound(layout) for layout in layouts]
        if len(bounds) == 1:
            return bounds[0]
        return _GROUP_HEADER.size + _GROUP_LENGTH.size * len(bounds) + sum(bounds)

    def refuse_once(self, tag: tuple, exc: Exception) -> None:
        """One clear log line per kind of refused object (each refusal is also a failed store)."""
        if tag not in self._refused:
            self._refused.add(tag)
            log.error("kvtc: cannot code LMCache object %s: %s -- the store fails (cache miss); "
                      "nothing is written", tag, exc)


class KVTCSerializer(Serializer):
    def __init__(self, engine: KVTCEngine):
        self.engine = engine

    def estimate_serialized_size(self, layout_desc: MemoryLayoutDesc) -> int:
        try:
            return self.engine.estimate(layout_desc.shapes, layout_desc.dtypes)
        except (CodecError, ValueError) as exc:
            self.engine.refuse_once(_describe(layout_desc.shapes, layout_desc.dtypes), exc)
            return _REFUSED_ESTIMATE

    def serialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey | None = None) -> int:
        shapes, dtypes = src.get_shapes(), src.get_dtypes()
        try:
            blob = self._encode(src, shapes, dtypes, key)
        except (CodecError, ValueError) as exc:
            self.engine.refuse_once(_describe(shapes, dtypes), exc)
            raise
        out = _byte_view(dst)
        capacity = self.engine.estimate(shapes, dtypes)
        if len(blob) > min(capacity, out.numel()):
            raise LayoutError(f"kvtc blob of {len(blob)} bytes exceeds its {capacity}-byte estimate")
        out[: len(blob)].copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        if not self.engine.options.fixed_size:
            return len(blob)
        out[len(blob) : capacity].zero_()
        return capacity

    def _encode(self, src: MemoryObj, shapes, dtypes, key: ObjectKey | None) -> bytes:
        engine, options = self.engine, self.engine.options
        layouts = engine.group_layouts(shapes, dtypes)
        blobs = []
        for i, layout in enumerate(layouts):
            calibration = engine.calibrations.select(
                key.model_name if key else "", key.kv_rank if key else 0, key.object_group_id if key else 0,
                i, layout.layers, layout.hidden,
            )
            tensor = src.get_tensor(i)
            if tensor is None:
                raise LayoutError("source object was invalidated before it could be serialized")
            kv = to_split(tensor, layout, calibration.head_dim)
            stride = options.chunk_size or layout.tokens
            guess = engine.estimator(calibration).estimate(kv[0], stride)
            flags = wire.FLAG_START_ESTIMATED | (wire.FLAG_PADDED if options.fixed_size and len(layouts) == 1 else 0)
            blob = engine.codec(calibration).encode(kv, start=guess.start, sinks=options.sinks, window=0, flags=flags)
            blobs.append(blob)
            raw = tensor.numel() * tensor.element_size()
            event = EncodeEvent(key, i, guess.start, guess.candidates, len(blob), raw)
            for callback in list(_observers):
                callback(event)
        if len(blobs) == 1:
            return blobs[0]
        header = _GROUP_HEADER.pack(GROUP_MAGIC, 1, len(blobs)) + b"".join(_GROUP_LENGTH.pack(len(b)) for b in blobs)
        return header + b"".join(blobs)


class KVTCDeserializer(Deserializer):
    def __init__(self, engine: KVTCEngine):
        self.engine = engine

    def deserialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey | None = None) -> None:
        shapes, dtypes = dst.get_shapes(), dst.get_dtypes()
        try:
            layouts = self.engine.group_layouts(shapes, dtypes)
            data = _byte_view(src).numpy()
            blobs = _split_groups(memoryview(data), len(layouts))
            decoded = [self._decode(b, layout) for b, layout in zip(blobs, layouts, strict=True)]
        except CodecError as exc:
            log.error("kvtc: stored object %s failed validation: %s -- reporting a cache miss",
                      key.chunk_hash.hex()[:16] if key else "?", exc)
            raise
        for i, tensor in enumerate(decoded):  # write only after every group decoded cleanly
            target = dst.get_tensor(i)
            if target is None:
                raise LayoutError("destination object was invalidated before it could be filled")
            target.copy_(tensor)

    def _decode(self, blob: memoryview, layout: GroupLayout) -> torch.Tensor:
        header, _ = wire.parse(blob)
        calibration = self.engine.calibrations.by_fingerprint(header.fingerprint)
        kv = self.engine.codec(calibration).decode(blob)
        expected = (2, layout.layers, layout.tokens, layout.hidden)
        if tuple(kv.shape) != expected or kv.dtype != layout.dtype:
            raise CorruptBlobError(
                f"blob holds {tuple(kv.shape)} {kv.dtype}; the destination expects {expected} {layout.dtype}"
            )
        return from_split(kv.cpu(), layout, calibration.head_dim)


def _byte_view(obj: MemoryObj) -> torch.Tensor:
    """The object's logical bytes as a flat uint8 tensor (a view, no copy)."""
    tensor = obj.get_tensor(0) if len(obj.get_shapes()) == 1 else None
    if tensor is None or tensor.dtype != torch.uint8:
        raw = obj.raw_tensor
        if raw is None:
            raise LayoutError("byte buffer was invalidated")
        return raw.view(torch.uint8).view(-1)[: obj.get_size()]
    return tensor.reshape(-1)


def _split_groups(data: memoryview, groups: int) -> list[memoryview]:
    """The blob(s) inside a stored object, each cut to its declared extent (zero padding dropped)."""
    if groups == 1:
        return [data[: _extent(data)]]
    if len(data) < _GROUP_HEADER.size or bytes(data[:4]) != GROUP_MAGIC:
        raise CorruptBlobError("multi-group kvtc object without its group header")
    _, version, count = _GROUP_HEADER.unpack_from(data)
    if version != 1 or count != groups:
        raise CorruptBlobError(f"group header declares {count} groups (version {version}); expected {groups}")
    offset = _GROUP_HEADER.size + _GROUP_LENGTH.size * count
    out = []
    for i in range(count):
        (length,) = _GROUP_LENGTH.unpack_from(data, _GROUP_HEADER.size + _GROUP_LENGTH.size * i)
        if offset + length > len(data):
            raise CorruptBlobError(f"group {i} extends past the stored object")
        out.append(data[offset : offset + length])
        offset += length
    return out


def _extent(data: memoryview) -> int:
    """Bytes of header + payload a blob declares; padding (or an adapter's slack) after it is ignored.

    ``wire.parse`` then checks both CRCs over exactly these bytes.
    """
    if len(data) < _BLOB_EXTENT.size or bytes(data[:4]) != wire.MAGIC:
        return len(data)  # let wire.parse produce the precise error
    header_size, payload_size = _BLOB_EXTENT.unpack_from(data)
    return min(len(data), header_size + payload_size)


def _describe(shapes, dtypes) -> tuple:
    return tuple((tuple(int(s) for s in shape), str(dtype).removeprefix("torch.")) for shape, dtype in
                 zip(shapes, dtypes, strict=False))


def make_serde(kwargs: dict[str, object]) -> AsyncSerdeProcessor:
    """Factory LMCache calls with the adapter JSON's serde kwargs."""
    options = SerdeOptions.from_kwargs(dict(kwargs))
    engine = KVTCEngine(options)
    log.info("kvtc serde: %d calibration(s) from %s, ratio %s, device %s, fixed_size %s, %d worker(s)",
             len(engine.calibrations.entries), options.calibration, options.ratio, options.device,
             options.fixed_size, options.max_workers)
    return AsyncSerdeProcessor(KVTCSerializer(engine), KVTCDeserializer(engine), max_workers=options.max_workers)


def register() -> None:
    """Register ``kvtc`` with LMCache's serde registry; safe to call any number of times."""
    if SERDE_TYPE not in get_registered_serde_types():
        try:
            register_serde_factory(SERDE_TYPE, make_serde)
        except ValueError:  # registered concurrently between the check and the call
            pass
