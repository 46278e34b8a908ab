"""Where the classic storage plugin keeps its records: CPU RAM, a local directory or Redis.

Each store holds opaque records under string names, within a byte limit, least recently used out
first. Stores never raise on I/O: a failed write is a record not kept (logged), a failed read is a
miss, so a full disk or a Redis outage costs cache hits, never a request. The disk and Redis stores
survive the process and may be shared: their LRU order is rebuilt from the directory (mtime) or from
Redis (SCAN), and a record another process wrote is found on lookup. Each process enforces the byte
limit on what it knows of.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from lmcache.logging import init_logger

log = init_logger(__name__)


class BlobStore:
    """A byte-limited LRU of records; subclasses say where the bytes live."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._sizes: OrderedDict[str, int] = OrderedDict()  # name → record size, oldest first
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def _key(self, name: str) -> str:
        """How a backend names a record (the index uses the same names)."""
        return name

    # -- the backend: raise OSError (disk) or redis.RedisError (Redis); the LRU logic here catches them --
    def _read(self, name: str) -> bytes | None:
        raise NotImplementedError

    def _write(self, name: str, data: bytes) -> None:
        raise NotImplementedError

    def _delete(self, name: str) -> None:
        raise NotImplementedError

    def _failures(self) -> tuple[type[BaseException], ...]:
        return (OSError,)

    def put(self, name: str, data: bytes) -> bool:
        """Keep ``data`` under ``name``, evicting the oldest records to stay within the limit."""
        if len(data) > self.max_bytes:
            return False
        name = self._key(name)
        with self._lock:
            try:
                self._forget(name)
                while self._sizes and self.used_bytes() + len(data) > self.max_bytes:
                    self._forget(next(iter(self._sizes)))
                self._write(name, data)
            except self._failures() as exc:
                self._warn("write", exc)
                return False
            self._sizes[name] = len(data)
            return True

    def get(self, name: str) -> bytes | None:
        name = self._key(name)
        with self._lock:
            if name not in self._sizes:
                return None
            try:
                data = self._read(name)
            except self._failures() as exc:
                self._warn("read", exc)
                return None
            if data is None:  # gone behind our back (another process, an operator)
                self._sizes.pop(name, None)
                return None
            self._sizes.move_to_end(name)
            return data

    def _probe(self, name: str) -> int | None:
        """The size of a record another process may have written, or None (RAM: never)."""
        return None

    def contains(self, name: str) -> bool:
        name = self._key(name)
        with self._lock:
            if name in self._sizes:
                return True
            try:
                size = self._probe(name)
            except self._failures() as exc:
                self._warn("lookup", exc)
                return False
            if size:
                self._sizes[name] = size
            return bool(size)

    def remove(self, name: str) -> bool:
        name = self._key(name)
        with self._lock:
            present = name in self._sizes
            try:
                self._forget(name)
            except self._failures() as exc:
                self._warn("delete", exc)
            return present

    def used_bytes(self) -> int:
        return sum(self._sizes.values())

    def close(self) -> None:
        pass

    def _forget(self, name: str) -> None:
        if self._sizes.pop(name, None) is not None:
            self._delete(name)

    def _warn(self, action: str, exc: BaseException) -> None:
        if action not in self._warned:  # one line per kind of failure, not one per chunk
            self._warned.add(action)
            log.error("kvtc %s: %s failed (%s) -- treated as a cache miss from now on where it fails", self,
                      action, exc)


class MemoryStore(BlobStore):
    """Records in this process's RAM (the classic plugin's default)."""

    def __init__(self, max_bytes: int):
        super().__init__(max_bytes)
        self._data: dict[str, bytes] = {}

    def __str__(self) -> str:
        return "RAM store"

    def _read(self, name):
        return self._data.get(name)

    def _write(self, name, data):
        self._data[name] = data

    def _delete(self, name):
        self._data.pop(name, None)

    def close(self) -> None:
        with self._lock:
            self._data.clear()
            self._sizes.clear()


def _file_name(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest() + ".kvtc"


class DiskStore(BlobStore):
    """One file per record in ``path`` (written to a temporary name, then renamed: never half a record)."""

    def __init__(self, path: str, max_bytes: int):
        super().__init__(max_bytes)
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        files = sorted(self.path.glob("*.kvtc"), key=lambda p: p.stat().st_mtime)
        for file in files:  # names are hashes: the index maps hashes, callers' names hash the same way
            self._sizes[file.name] = file.stat().st_size
        while self._sizes and self.used_bytes() > self.max_bytes:
            self._forget(next(iter(self._sizes)))

    def __str__(self) -> str:
        return f"disk store {self.path}"

    def _key(self, name):
        return _file_name(name)

    def _probe(self, name):
        file = self.path / name
        return file.stat().st_size if file.exists() else None

    def _read(self, name):
        try:
            data = (self.path / name).read_bytes()
        except FileNotFoundError:
            return None
        try:
            os.utime(self.path / name)  # LRU order survives a restart
        except OSError:
            pass
        return data

    def _write(self, name, data):
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.replace(tmp, self.path / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _delete(self, name):
        (self.path / name).unlink(missing_ok=True)


class RedisStore(BlobStore):
    """Records as Redis strings under ``prefix`` (redis-py; short timeouts, so an outage is a quick miss)."""

    def __init__(self, url: str, max_bytes: int, prefix: str = "kvtc:"):
        import redis

        super().__init__(max_bytes)
        self.url, self.prefix = url, prefix
        self._redis_errors = (redis.RedisError, OSError)
        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        try:
            for key in self.client.scan_iter(match=prefix + "*", count=1000):
                self._sizes[key.decode()[len(prefix):]] = int(self.client.strlen(key))
        except self._redis_errors as exc:
            self._warn("scan", exc)

    def __str__(self) -> str:
        return f"Redis store {self.url}"

    def _failures(self):
        return self._redis_errors

    def _probe(self, name):
        return int(self.client.strlen(self.prefix + name)) or None

    def _read(self, name):
        return self.client.get(self.prefix + name)

    def _write(self, name, data):
        self.client.set(self.prefix + name, data)

    def _delete(self, name):
        self.client.delete(self.prefix + name)

    def close(self) -> None:
        self.client.close()
