"""Rebuild an L2 adapter whose backend went away and came back.

LMCache 0.5.6's ``resp`` adapter opens its Redis connections once (native client, no reconnect):
after a Redis restart every store fails and every lookup misses until the server process
restarts. This wrapper keeps its own event fds and task ids, forwards the inner adapter's
events, and when the backend is down (a store failed, or a health probe says so) it answers
at once — stores fail, lookups and loads miss — and rebuilds the inner adapter once the backend
is reachable again. Tasks of a discarded inner adapter are reported failed, never half-done.
"""

from __future__ import annotations

import select
import threading
import time
from collections.abc import Callable

from lmcache.lmcache_native import Bitmap
from lmcache.logging import init_logger
from lmcache.v1.distributed.internal_api import L2StoreResult
from lmcache.v1.distributed.l2_adapters.base import L2AdapterInterface
from lmcache.v1.platform import consume_fd, create_event_notifier

log = init_logger(__name__)

STORE, LOOKUP, LOAD = "store", "lookup", "load"


class ReconnectingAdapter(L2AdapterInterface):
    """Delegates to ``build()``'s adapter; replaces it when the backend recovers from an outage.

    ``retry_seconds <= 0`` turns the wrapper into a plain pass-through (never marks the backend down).
    """

    def __init__(self, build: Callable[[], L2AdapterInterface], probe: Callable[[], bool] | None = None,
                 retry_seconds: float = 2.0, name: str = "l2") -> None:
        super().__init__()
        self._build, self._probe, self._retry, self._name = build, probe, retry_seconds, name
        self._notifiers = {kind: create_event_notifier() for kind in (STORE, LOOKUP, LOAD)}
        self._wake = create_event_notifier()
        self._lock = threading.RLock()
        self._inner = build()
        self._generation = 0
        self._next_id = 0
        self._tasks: dict[int, tuple[int, str, int, int]] = {}  # id -> (generation, kind, inner id, keys)
        self._inner_ids: dict[tuple[int, str, int], int] = {}
        self._failed_stores: dict[int, L2StoreResult] = {}
        self._failed_bitmaps: dict[int, Bitmap] = {}
        self._healthy = True
        self._last_attempt = 0.0
        self._listeners: list = []
        self._identity: tuple[str, bool] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"kvtc-reconnect-{name}")
        self._thread.start()

    # -- event fds: ours, stable across rebuilds ---------------------------------------
    def get_store_event_fd(self) -> int:
        return self._notifiers[STORE].fileno()

    def get_lookup_and_lock_event_fd(self) -> int:
        return self._notifiers[LOOKUP].fileno()

    def get_load_event_fd(self) -> int:
        return self._notifiers[LOAD].fileno()

    # -- tasks ----------------------------------------------------------------------------
    def _submit(self, kind: str, n_keys: int, call: Callable[[L2AdapterInterface], int]) -> int:
        with self._lock:
            task_id, self._next_id = self._next_id, self._next_id + 1
            if self._healthy:
                inner_id = call(self._inner)
                self._tasks[task_id] = (self._generation, kind, inner_id, n_keys)
                self._inner_ids[(self._generation, kind, inner_id)] = task_id
                return task_id
            self._fail(task_id, kind, n_keys)
        self._notifiers[kind].notify()
        return task_id

    def _fail(self, task_id: int, kind: str, n_keys: int) -> None:
        if kind == STORE:
            self._failed_stores[task_id] = L2StoreResult(False, 0)
        else:
            self._failed_bitmaps[task_id] = Bitmap(n_keys)

    def submit_store_task(self, keys, objects) -> int:
        return self._submit(STORE, len(keys), lambda a: a.submit_store_task(keys, objects))

    def pop_completed_store_tasks(self) -> dict[int, L2StoreResult]:
        with self._lock:
            out, self._failed_stores = self._failed_stores, {}
            for inner_id, result in self._inner.pop_completed_store_tasks().items():
                task_id = self._inner_ids.pop((self._generation, STORE, inner_id), None)
                if task_id is None:
                    continue
                self._tasks.pop(task_id, None)
                out[task_id] = result
                if not result.is_successful() and self._healthy and self._retry > 0:
                    self._mark_down("a store failed")
            return out

    def submit_lookup_and_lock_task(self, keys, group_layout_descs) -> int:
        return self._submit(LOOKUP, len(keys), lambda a: a.submit_lookup_and_lock_task(keys, group_layout_descs))

    def query_lookup_and_lock_result(self, task_id: int):
        return self._query(task_id, lambda a, i: a.query_lookup_and_lock_result(i))

    def submit_unlock(self, keys) -> None:
        with self._lock:
            self._inner.submit_unlock(keys)

    def submit_load_task(self, keys, objects) -> int:
        return self._submit(LOAD, len(keys), lambda a: a.submit_load_task(keys, objects))

    def query_load_result(self, task_id: int):
        return self._query(task_id, lambda a, i: a.query_load_result(i))

    def _query(self, task_id: int, call):
        with self._lock:
            if task_id in self._failed_bitmaps:
                return self._failed_bitmaps.pop(task_id)
            entry = self._tasks.get(task_id)
            if entry is None or entry[0] != self._generation:
                return None
            generation, kind, inner_id, _ = entry
            result = call(self._inner, inner_id)
            if result is not None:
                self._tasks.pop(task_id, None)
                self._inner_ids.pop((generation, kind, inner_id), None)
            return result

    # -- health ---------------------------------------------------------------------------
    def _mark_down(self, why: str) -> None:
        self._healthy = False
        self._last_attempt = time.monotonic()
        log.warning("kvtc: L2 backend %s is unavailable (%s): stores fail and loads miss until it is back",
                    self._name, why)

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                inner = self._inner
                fds = {inner.get_store_event_fd(): STORE, inner.get_lookup_and_lock_event_fd(): LOOKUP,
                       inner.get_load_event_fd(): LOAD}
            poller = select.poll()
            for fd in (*fds, self._wake.fileno()):
                poller.register(fd, select.POLLIN)
            while not self._stop.is_set():
                events = poller.poll(int(min(self._retry, 0.5) * 1000) if self._retry > 0 else 500)
                for fd, _ in events:
                    consume_fd(fd)
                    if fd in fds:
                        self._notifiers[fds[fd]].notify()
                if self._check_health():
                    break  # inner was rebuilt: poll its fds

    def _check_health(self) -> bool:
        """Probe the backend; rebuild the inner adapter when it is reachable after an outage."""
        now = time.monotonic()
        if self._retry <= 0 or now - self._last_attempt < self._retry:
            return False
        self._last_attempt = now
        ok = self._probe() if self._probe is not None else not self._healthy
        if self._healthy:
            if not ok and self._probe is not None:
                with self._lock:
                    self._mark_down("health probe failed")
            return False
        return ok and self._rebuild()

    def _rebuild(self) -> bool:
        try:
            new = self._build()
        except Exception as exc:  # the backend refuses connections: stay down, retry later
            log.info("kvtc: L2 backend %s still unavailable: %s", self._name, exc)
            return False
        for listener in self._listeners:
            new.register_listener(listener)
        if self._identity is not None:
            new.set_backend_identity(*self._identity)
        with self._lock:
            old, self._inner = self._inner, new
            self._generation += 1
            stale = list(self._tasks.items())
            self._tasks.clear()
            self._inner_ids.clear()
            self._healthy = True
        try:
            old.close()
        except Exception:
            log.exception("kvtc: closing the old %s adapter failed", self._name)
        with self._lock:
            for task_id, (_, kind, _, n_keys) in stale:
                self._fail(task_id, kind, n_keys)
        for kind in {kind for _, (_, kind, _, _) in stale}:
            self._notifiers[kind].notify()
        log.warning("kvtc: L2 backend %s is back; adapter rebuilt", self._name)
        return True

    # -- everything else: delegate to the current inner adapter -------------------------
    def register_listener(self, listener) -> None:
        self._listeners.append(listener)
        self._inner.register_listener(listener)

    def set_backend_identity(self, name: str, shared: bool = False) -> None:
        self._identity = (name, shared)
        self._inner.set_backend_identity(name, shared)

    @property
    def supports_global_eviction(self) -> bool:
        return self._inner.supports_global_eviction

    def delete(self, keys) -> None:
        if self._healthy:
            self._inner.delete(keys)

    def list_l2_keys(self, model_name=None, page_size: int = 500, cursor=None):
        return self._inner.list_l2_keys(model_name, page_size, cursor)

    def get_usage(self):
        return self._inner.get_usage()

    def report_status(self) -> dict:
        status = dict(self._inner.report_status())
        status["is_healthy"] = bool(status.get("is_healthy", True)) and self._healthy
        status["kvtc_reconnect"] = {"backend_up": self._healthy, "rebuilds": self._generation}
        return status

    # -- LMCache 0.5.7 adds these to the interface (0.5.6 never calls them) ----------------
    def get_memory_tags(self):
        """Where the inner adapter keeps its bytes (abstract in 0.5.7)."""
        return self._inner.get_memory_tags()

    def submit_touch(self, keys) -> None:
        """Pass an access mark to the inner adapter's eviction (0.5.6's adapters have none)."""
        touch = getattr(self._inner, "submit_touch", None)
        if touch is not None and self._healthy:
            touch(keys)

    def close(self) -> None:
        self._stop.set()
        self._wake.notify()
        self._thread.join(timeout=5)
        self._inner.close()
        for notifier in (*self._notifiers.values(), self._wake):
            notifier.close()
