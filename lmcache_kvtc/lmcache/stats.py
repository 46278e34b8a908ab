"""What one kvtc serde has done, where LMCache users read a server's state.

Every count goes three ways: OpenTelemetry instruments on the meter LMCache's MP server exports at its
``/metrics`` endpoint (Prometheus names ``kvtc_objects_stored_total``, ``kvtc_plans_chosen_total``,
``kvtc_objects_refused_total``, ``kvtc_objects_loaded_total``, ``kvtc_loads_failed_total``,
``kvtc_stored_bytes_total``, ``kvtc_raw_bytes_total``, ``kvtc_encode_seconds`` and ``kvtc_decode_seconds``
histograms, each labelled with the serde's ``calibration``; without a configured meter provider they cost
nothing), one summary line in the server log at most every ``log_interval`` seconds, and
:meth:`SerdeStats.snapshot` for code that holds the engine. An object is one LMCache object (a chunk); its
kernel groups each get a plan.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from lmcache.logging import init_logger
from opentelemetry import metrics

log = init_logger(__name__)

METER_NAME = "lmcache_kvtc"
#: histogram buckets of encode/decode seconds per object (a 256-token chunk codes in ~10-200 ms on a CPU)
SECONDS_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


@dataclass
class _Totals:
    stored: int = 0  # objects
    stored_bytes: int = 0
    raw_bytes: int = 0
    encode_seconds: float = 0.0
    loaded: int = 0
    decode_seconds: float = 0.0
    plans: Counter = field(default_factory=Counter)  # plan ratio -> kernel groups coded with it
    refused: Counter = field(default_factory=Counter)  # reason (error class) -> refused stores
    failed_loads: Counter = field(default_factory=Counter)  # reason -> loads that failed validation


class SerdeStats:
    """Thread-safe counters of stores, refusals, chosen plans, loads and coding time."""

    def __init__(self, meter: metrics.Meter | None = None, log_interval: float = 60.0,
                 labels: dict[str, str] | None = None):
        meter = meter or metrics.get_meter(METER_NAME)
        self._labels = dict(labels or {})  # on every data point: several kvtc serdes in one server stay apart
        self._stored = meter.create_counter("kvtc_objects_stored", unit="{object}",
                                            description="objects kvtc coded for L2")
        self._plans = meter.create_counter("kvtc_plans_chosen", unit="{group}",
                                           description="kernel groups coded, by the plan ratio rate control chose")
        self._stored_bytes = meter.create_counter("kvtc_stored_bytes", unit="By",
                                                  description="bytes of kvtc blobs coded (before padding)")
        self._raw_bytes = meter.create_counter("kvtc_raw_bytes", unit="By",
                                               description="bytes of the KV tensors those blobs code")
        self._refused = meter.create_counter("kvtc_objects_refused", unit="{object}",
                                             description="objects kvtc refused to store (a miss), by reason")
        self._loaded = meter.create_counter("kvtc_objects_loaded", unit="{object}",
                                            description="objects kvtc decoded from L2")
        self._failed = meter.create_counter("kvtc_loads_failed", unit="{object}",
                                            description="stored objects that failed validation (a miss), by reason")
        seconds = dict(unit="s", explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)
        self._encode = meter.create_histogram("kvtc_encode_seconds", description="encode time per object", **seconds)
        self._decode = meter.create_histogram("kvtc_decode_seconds", description="decode time per object", **seconds)
        self._totals = _Totals()
        self._lock = threading.Lock()
        self._log_interval = log_interval
        self._last_log = time.monotonic()

    def stored(self, plan_ratios: list[float], blob_bytes: int, raw_bytes: int, seconds: float) -> None:
        """One object coded: the plan ratio of each of its kernel groups, its blob size, its KV size."""
        self._stored.add(1, self._labels)
        for ratio in plan_ratios:
            self._plans.add(1, {**self._labels, "plan_ratio": f"{ratio:g}"})
        self._stored_bytes.add(blob_bytes, self._labels)
        self._raw_bytes.add(raw_bytes, self._labels)
        self._encode.record(seconds, self._labels)
        with self._lock:
            t = self._totals
            t.stored += 1
            t.stored_bytes += blob_bytes
            t.raw_bytes += raw_bytes
            t.encode_seconds += seconds
            t.plans.update(f"{r:g}" for r in plan_ratios)
        self._maybe_log()

    def refused(self, reason: str) -> None:
        """A store refused (a miss): ``reason`` is the error's class name."""
        self._count_reason(self._refused, self._totals.refused, reason)

    def loaded(self, seconds: float) -> None:
        self._loaded.add(1, self._labels)
        self._decode.record(seconds, self._labels)
        with self._lock:
            self._totals.loaded += 1
            self._totals.decode_seconds += seconds
        self._maybe_log()

    def load_failed(self, reason: str) -> None:
        """A stored object that failed validation (a miss): ``reason`` is the error's class name."""
        self._count_reason(self._failed, self._totals.failed_loads, reason)

    def _count_reason(self, instrument: metrics.Counter, totals: Counter, reason: str) -> None:
        instrument.add(1, {**self._labels, "reason": reason})
        with self._lock:
            totals[reason] += 1
        self._maybe_log()

    def snapshot(self) -> dict:
        """The totals so far, as plain numbers and dicts."""
        with self._lock:
            t = self._totals
            return {"stored": t.stored, "stored_bytes": t.stored_bytes, "raw_bytes": t.raw_bytes,
                    "encode_seconds": t.encode_seconds, "loaded": t.loaded, "decode_seconds": t.decode_seconds,
                    "plans": dict(t.plans), "refused": dict(t.refused), "failed_loads": dict(t.failed_loads)}

    def summary(self) -> str:
        s = self.snapshot()
        ratio = s["raw_bytes"] / s["stored_bytes"] if s["stored_bytes"] else 0.0
        encode_ms = 1e3 * s["encode_seconds"] / s["stored"] if s["stored"] else 0.0
        decode_ms = 1e3 * s["decode_seconds"] / s["loaded"] if s["loaded"] else 0.0
        plans = ", ".join(f"{r}x: {n}" for r, n in sorted(s["plans"].items(), key=lambda kv: float(kv[0])))
        return (f"kvtc serde: {s['stored']} objects stored ({ratio:.1f}x of their KV bytes before padding; "
                f"groups by plan {plans or 'none'}; {encode_ms:.0f} ms each), {sum(s['refused'].values())} refused "
                f"{s['refused'] or ''}, {s['loaded']} loaded ({decode_ms:.0f} ms each), "
                f"{sum(s['failed_loads'].values())} failed validation {s['failed_loads'] or ''}")

    def _maybe_log(self) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last_log < self._log_interval:
                return
            self._last_log = now
        log.info("%s", self.summary())
