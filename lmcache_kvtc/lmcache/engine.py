"""Everything the kvtc serde does between LMCache's objects and KVTC blobs, free of LMCache's plumbing.

Per kernel group: pick the calibration (:mod:`.selection`), map the layout to ``[2, L, T, H·D]``
(:mod:`.layouts`), estimate the chunk's base position (:mod:`.position`) and code it with
``start=estimate, sinks, window=0`` and ``FLAG_START_ESTIMATED``, rate-controlled to its byte budget (see
:meth:`KVTCEngine.budgets`). Several groups go into a small length-prefixed container. Decoding validates
every group completely before anything is returned.
Shared by the MP serde (:mod:`.serde`) and the classic storage plugin (:mod:`.classic`). What it did is counted in
:class:`~.stats.SerdeStats` (logs, LMCache's metrics endpoint); a caller that wants every group's facts passes an
``observer``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from lmcache.logging import init_logger
from lmcache.v1.distributed.api import ObjectKey

from .. import blob as wire
from ..calibration import Calibration
from ..codec import KVTCCodec
from ..defaults import CHUNK_TOKENS
from ..errors import CodecError, CorruptBlobError, LayoutError
from . import vllm_cpu
from .layouts import GroupLayout, UnsupportedLayoutError, classify, from_split, to_split
from .options import SerdeOptions
from .position import PositionEstimator
from .selection import CalibrationSet
from .stats import SerdeStats

log = init_logger(__name__)


@dataclass(frozen=True)
class EncodeEvent:
    """What one group of one stored object became (given to the engine's ``observer``)."""

    key: ObjectKey | None
    group: int
    start: int
    candidates: int
    blob_bytes: int
    raw_bytes: int
    plan_ratio: float  # the rung rate control chose


Observer = Callable[[EncodeEvent], None]


class KVTCEngine:
    """Calibrations, codecs and position estimators shared by a serializer/deserializer pair.

    ``observer`` (optional) is called with an :class:`EncodeEvent` for every kernel group encoded; ``stats``
    counts stores, refusals, plans, loads and coding time for the server's logs and metrics.
    """

    def __init__(self, options: SerdeOptions, observer: Observer | None = None, stats: SerdeStats | None = None):
        self.options = options
        self.observer = observer
        self.stats = stats or SerdeStats(labels={"calibration": options.calibration})
        self.calibrations = CalibrationSet.from_path(options.calibration)
        self._codecs: dict[bytes, KVTCCodec] = {}
        self._estimators: dict[bytes, PositionEstimator] = {}
        self._lock = threading.Lock()
        self._refused: set[tuple] = set()
        self._budgets: dict[tuple, list[int]] = {}
        if options.paged_block_size:  # importing vLLM takes ~10 s: do it before the first chunk arrives
            threading.Thread(target=self._derive_paged_mappings, name="kvtc-vllm-cpu-layout", daemon=True).start()

    def _derive_paged_mappings(self) -> None:
        """Derive vLLM-CPU's mapping for LMCache's default 256-token chunks of every calibration (bf16)."""
        for calibration in self.calibrations.all():
            try:
                vllm_cpu.mapping(self.options.paged_block_size, self.options.chunk_size or CHUNK_TOKENS,
                                 calibration.kv_heads, calibration.head_dim, torch.bfloat16)
            except UnsupportedLayoutError as exc:  # remembered: every such chunk will be refused with it
                log.error("kvtc: vLLM-CPU objects will be refused: %s", exc)

    def codec(self, calibration: Calibration) -> KVTCCodec:
        with self._lock:
            fp = calibration.fingerprint
            if fp not in self._codecs:
                self._codecs[fp] = KVTCCodec(calibration, device=self.options.device)
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
                    layouts.append(classify(shape, dtype, head_dim, self.options.paged_block_size,
                                            fp8=self.options.fp8 is not None))
                    break
                except UnsupportedLayoutError as exc:
                    errors.append(exc)
            else:
                raise errors[0]
        return layouts

    def group_floor(self, layout: GroupLayout) -> int:
        """The smallest budget this group gets: what every fitting calibration's coarsest plan typically needs
        (``KVTCCodec.typical_size``; a chunk whose exact sinks do not fit gives them up). Only tiny objects or
        extreme ratios reach it."""
        fitting = self.calibrations.fitting(layout.layers, layout.hidden)
        if not fitting:
            raise UnsupportedLayoutError(
                f"no kvtc calibration in {self.calibrations.origin} fits {layout.layers} layers × "
                f"{layout.hidden} K/V width"
            )
        return max(min(self.codec(c).typical_size(layout.tokens, p, dtype=layout.coded_dtype)
                       for p in range(len(c.plans)))
                   for c in fitting)

    def budgets(self, shapes, dtypes) -> list[int]:
        """Bytes each kernel group may take: together ``floor(bf16 bytes / ratio)`` including the container
        header, split in proportion to the groups' sizes (an fp8 cache's object gets what its bf16 twin gets).
        A group whose share is below what its coarsest plan may need gets that instead (tiny objects or extreme
        ratios only). A function of layout and options only.
        """
        signature = describe_layout(shapes, dtypes)
        if signature not in self._budgets:
            layouts = self.group_layouts(shapes, dtypes)
            raw = [2 * g.layers * g.tokens * g.hidden * g.coded_dtype.itemsize for g in layouts]
            total = int(sum(raw) // self.options.ratio) - wire.group_header_size(len(layouts))
            self._budgets[signature] = [max(total * r // sum(raw), self.group_floor(g))
                                        for r, g in zip(raw, layouts, strict=True)]
        return self._budgets[signature]

    def estimate(self, shapes, dtypes) -> int:
        """The fixed blob size of an object layout: its budgets plus the container header, if any."""
        budgets = self.budgets(shapes, dtypes)
        return wire.group_header_size(len(budgets)) + sum(budgets)

    def encode(self, tensors: list[torch.Tensor], key: ObjectKey | None) -> bytes:
        """One object's kernel groups as one blob (or a group container); raises ``CodecError`` if unsupported."""
        started = time.perf_counter()
        try:
            blob, events = self._encode(tensors, key)
        except (CodecError, ValueError) as exc:
            self.stats.refused(type(exc).__name__)
            self.refuse_once(describe_layout([t.shape for t in tensors], [t.dtype for t in tensors]), exc)
            raise
        self.stats.stored([e.plan_ratio for e in events], len(blob), sum(e.raw_bytes for e in events),
                          time.perf_counter() - started)
        if self.observer is not None:
            for event in events:
                self.observer(event)
        return blob

    def _encode(self, tensors: list[torch.Tensor], key: ObjectKey | None) -> tuple[bytes, list[EncodeEvent]]:
        """The object's blob and what each of its groups became."""
        options = self.options
        shapes, dtypes = [t.shape for t in tensors], [t.dtype for t in tensors]
        layouts, budgets = self.group_layouts(shapes, dtypes), self.budgets(shapes, dtypes)
        blobs, events = [], []
        for i, (tensor, layout, budget) in enumerate(zip(tensors, layouts, budgets, strict=True)):
            calibration = self.calibrations.select(
                key.model_name if key else "", key.kv_rank if key else 0, key.object_group_id if key else 0,
                i, layout.layers, layout.hidden,
            )
            kv = to_split(tensor, layout, calibration.head_dim)
            if layout.dtype == torch.uint8:
                kv = options.fp8.dequantize(kv)
            guess = self.estimator(calibration).estimate(kv[0], options.chunk_size or layout.tokens)
            flags = wire.FLAG_START_ESTIMATED | (wire.FLAG_PADDED if options.fixed_size and len(layouts) == 1 else 0)
            codec = self.codec(calibration)
            try:
                blob = codec.encode_within(kv, budget=budget, start=guess.start, sinks=options.sinks, window=0,
                                           flags=flags)
            except LayoutError:
                if guess.start >= options.sinks:
                    raise
                # exact sinks do not fit this budget (extreme ratios): code them like every other token
                blob = codec.encode_within(kv, budget=budget, start=guess.start, sinks=0, window=0, flags=flags)
            blobs.append(blob)
            plan_ratio = calibration.plans[wire.parse(blob)[0].plan].ratio  # re-reading the header: ~0.1 ms
            raw = tensor.numel() * tensor.element_size()
            events.append(EncodeEvent(key, i, guess.start, guess.candidates, len(blob), raw, plan_ratio))
        return wire.pack_groups(blobs), events

    def decode(self, data: memoryview, shapes, dtypes) -> list[torch.Tensor]:
        """Every kernel group of a stored object, fully validated against the expected layout, on CPU.
        A failure raises ``CodecError``; the caller counts it (``stats.load_failed``) with what failed before."""
        started = time.perf_counter()
        layouts = self.group_layouts(shapes, dtypes)
        blobs = wire.split_groups(data, len(layouts))
        decoded = [self._decode_group(b, layout) for b, layout in zip(blobs, layouts, strict=True)]
        self.stats.loaded(time.perf_counter() - started)
        return decoded

    def _decode_group(self, blob: memoryview, layout: GroupLayout) -> torch.Tensor:
        header, _ = wire.parse(blob)
        calibration = self.calibrations.by_fingerprint(header.fingerprint)
        kv = self.codec(calibration).decode(blob, tokens=layout.tokens, dtype=layout.coded_dtype)
        expected = (2, layout.layers, layout.tokens, layout.hidden)
        if tuple(kv.shape) != expected:  # tokens and dtype were checked before decoding
            raise CorruptBlobError(
                f"blob holds {tuple(kv.shape)} {kv.dtype}; the destination expects {expected} {layout.dtype}"
            )
        kv = kv.cpu()
        if layout.dtype == torch.uint8:
            kv = self.options.fp8.quantize(kv)
        return from_split(kv, layout, calibration.head_dim)

    def refuse_once(self, tag: tuple, exc: Exception) -> None:
        """One clear log line per kind of refused object (each refusal is also a failed store)."""
        if tag not in self._refused:
            self._refused.add(tag)
            log.error("kvtc: cannot code LMCache object %s: %s -- the store fails (cache miss); "
                      "nothing is written", tag, exc)


def describe_layout(shapes, dtypes) -> tuple:
    """A hashable, loggable summary of an object's kernel-group shapes and dtypes."""
    return tuple((tuple(int(s) for s in shape), str(dtype).removeprefix("torch.")) for shape, dtype in
                 zip(shapes, dtypes, strict=False))
