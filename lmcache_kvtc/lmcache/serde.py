"""The ``kvtc`` serde for LMCache 0.5.6's multiprocess L2 path.

LMCache hands a serializer one L1 object per chunk (``[2, L, T, H·D]``, fused ``[1, L, T, NH·2·HS]``
or several kernel groups) plus its ``ObjectKey`` — never the chunk's token positions. So each group
is coded at an *estimated* base position (:mod:`.position`), stored in the blob with
``FLAG_START_ESTIMATED``; decode re-applies exactly what was stored.

0.5.6's ``fs``/``resp`` adapters only load objects of exactly ``estimate_serialized_size`` bytes,
so with ``fixed_size`` (the default) every blob is zero-padded to that size, which depends only on
the layout and the kwargs (the ratio's byte budget). Anything the serde cannot code raises,
which LMCache turns into a failed store (a cache miss); a blob that fails validation on load
turns the load into a miss. Never wrong KV. With ``master_key_path`` every stored object is sealed with
AES-GCM per ``cache_salt`` and bound to its key (:mod:`.sealing`).

Adapter JSON kwargs: everything in ``"serde"`` except ``"type"`` (see :mod:`.options`).
"""

from __future__ import annotations

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

from ..errors import CodecError, LayoutError
from .engine import EncodeEvent, KVTCEngine, Observer, describe_layout
from .options import SerdeOptions
from .sealing import OVERHEAD, Sealer

log = init_logger(__name__)

SERDE_TYPE = "kvtc"
#: a nominal buffer for objects kvtc refuses: serialize fails anyway, so do not reserve real space
_REFUSED_ESTIMATE = 4096

__all__ = ["SERDE_TYPE", "EncodeEvent", "KVTCDeserializer", "KVTCEngine", "KVTCSerializer", "SerdeOptions",
           "make_serde", "register"]


class KVTCSerializer(Serializer):
    def __init__(self, engine: KVTCEngine, sealer: Sealer | None = None):
        self.engine, self.sealer = engine, sealer

    def estimate_serialized_size(self, layout_desc: MemoryLayoutDesc) -> int:
        try:
            return self.engine.estimate(layout_desc.shapes, layout_desc.dtypes) + (OVERHEAD if self.sealer else 0)
        except (CodecError, ValueError) as exc:
            self.engine.refuse_once(describe_layout(layout_desc.shapes, layout_desc.dtypes), exc)
            return _REFUSED_ESTIMATE

    def serialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey | None = None) -> int:
        shapes, dtypes = src.get_shapes(), src.get_dtypes()
        tensors = [src.get_tensor(i) for i in range(len(shapes))]
        if any(t is None for t in tensors):
            raise LayoutError("source object was invalidated before it could be serialized")
        blob = self.engine.encode(tensors, key)
        capacity = self.engine.estimate(shapes, dtypes)
        if len(blob) > capacity:
            raise LayoutError(f"kvtc blob of {len(blob)} bytes exceeds its {capacity}-byte estimate")
        if self.engine.options.fixed_size:
            blob += bytes(capacity - len(blob))
        if self.sealer:
            blob = self.sealer.seal(blob, key)
        out = _byte_view(dst)
        if len(blob) > out.numel():
            raise LayoutError(f"kvtc object of {len(blob)} bytes exceeds its {out.numel()}-byte buffer")
        out[: len(blob)].copy_(torch.frombuffer(bytearray(blob), dtype=torch.uint8))
        return len(blob)


class KVTCDeserializer(Deserializer):
    def __init__(self, engine: KVTCEngine, sealer: Sealer | None = None):
        self.engine, self.sealer = engine, sealer

    def deserialize(self, src: MemoryObj, dst: MemoryObj, key: ObjectKey | None = None) -> None:
        try:
            stored = memoryview(_byte_view(src).numpy())
            data = memoryview(self.sealer.open(stored, key)) if self.sealer else stored
            decoded = self.engine.decode(data, dst.get_shapes(), dst.get_dtypes())
        except CodecError as exc:
            self.engine.stats.load_failed(type(exc).__name__)
            log.error("kvtc: stored object %s failed validation: %s -- reporting a cache miss",
                      key.chunk_hash.hex()[:16] if key else "?", exc)
            raise
        for i, tensor in enumerate(decoded):  # write only after every group decoded cleanly
            target = dst.get_tensor(i)
            if target is None:
                raise LayoutError("destination object was invalidated before it could be filled")
            target.copy_(tensor)


def _byte_view(obj: MemoryObj) -> torch.Tensor:
    """The object's logical bytes as a flat uint8 tensor (a view, no copy)."""
    tensor = obj.get_tensor(0) if len(obj.get_shapes()) == 1 else None
    if tensor is None or tensor.dtype != torch.uint8:
        raw = obj.raw_tensor
        if raw is None:
            raise LayoutError("byte buffer was invalidated")
        return raw.view(torch.uint8).view(-1)[: obj.get_size()]
    return tensor.reshape(-1)


class KVTCSerdeProcessor(AsyncSerdeProcessor):
    """LMCache's thread-pool processor, letting go of the kvtc engine (calibrations, codecs) once closed.

    LMCache 0.5.6 keeps closed StorageManagers reachable (process-wide gauges and callbacks), and with them every
    serde they held: a process that builds many (a benchmark, a test session) grew ~110 MB per StorageManager with
    the 0.5B's calibration, 21 GB over a 1.5B benchmark run.
    """

    def close(self) -> None:
        super().close()  # its pool refuses new tasks from here on
        self._serializer = self._deserializer = None


def make_serde(kwargs: dict[str, object]) -> AsyncSerdeProcessor:
    """Factory LMCache calls with the adapter JSON's serde kwargs.

    Code that builds LMCache's config itself (not JSON) may add ``"observer"``: a callable given an
    :class:`EncodeEvent` for every group this serde encodes (the checkout's reports use it).
    """
    kwargs = dict(kwargs)
    observer: Observer | None = kwargs.pop("observer", None)
    if observer is not None and not callable(observer):
        raise ValueError(f"kvtc serde: observer must be callable, got {observer!r}")
    options = SerdeOptions.from_kwargs(kwargs)
    engine = KVTCEngine(options, observer)
    sealer = Sealer.from_master_key_file(options.master_key_path, options.aes_bits) if options.master_key_path else None
    log.info("kvtc serde: %d calibration(s) from %s, ratio %s, device %s, fixed_size %s, %d worker(s), %s",
             len(engine.calibrations.entries), options.calibration, options.ratio, options.device,
             options.fixed_size, options.max_workers,
             f"sealed (AES-{options.aes_bits}-GCM per cache_salt)" if sealer else "not sealed")
    return KVTCSerdeProcessor(KVTCSerializer(engine, sealer), KVTCDeserializer(engine, sealer),
                              max_workers=options.max_workers)


def register() -> None:
    """Register ``kvtc`` with LMCache's serde registry; safe to call any number of times."""
    if SERDE_TYPE not in get_registered_serde_types():
        try:
            register_serde_factory(SERDE_TYPE, make_serde)
        except ValueError:  # registered concurrently between the check and the call
            pass
