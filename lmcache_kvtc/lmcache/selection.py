"""Choosing the calibration that codes an LMCache object.

The serde's ``calibration`` kwarg names a file (one calibration for everything whose layout fits)
or a directory. In a directory, an optional ``index.json`` maps objects to files::

    {"calibrations": [
        {"file": "llama8b-tp2-r0.safetensors", "model_name": "meta-llama/Llama-3.1-8B",
         "tp_size": 2, "tp_rank": 0},
        {"file": "gemma3-local.safetensors", "model_name": "google/gemma-3-1b-it", "object_group_id": 1,
         "kernel_group": 0}
    ]}

Every field but ``file`` is optional and narrows the match; the most specific matching entry wins.
Without an index every ``*.safetensors`` file is an entry whose ``model_name`` is its model id
(compared case-insensitively, also against the last path component of ``ObjectKey.model_name``).
A calibration must also fit the object's layout (layers, K/V width); if no named entry matches,
a single layout-compatible calibration is used with a one-time warning.

``estimate_serialized_size`` sees no key, so sizes use every calibration that fits the layout.
Every file is loaded and verified when the set is built (where the serde's configuration is checked), so a
missing or corrupt calibration stops the server at start, never at its first store.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from lmcache.logging import init_logger
from lmcache.v1.distributed.api import ObjectKey

from ..calibration import Calibration
from ..errors import CalibrationError, CalibrationMismatchError

log = init_logger(__name__)

INDEX_FILE = "index.json"
_SELECTOR_FIELDS = ("model_name", "tp_size", "tp_rank", "object_group_id", "kernel_group")


def decode_kv_rank(kv_rank: int) -> tuple[int, int]:
    """``(world_size, global_rank)`` from the ``kv_rank`` LMCache packs with ``ObjectKey.ComputeKVRank``
    (``world_size << 24 | global_rank << 16 | local_world_size << 8 | local_rank``; 0.5.6 unpacks only the
    world size itself)."""
    return ObjectKey.WorldSizeFromKVRank(kv_rank), (kv_rank >> 16) & 0xFF


def _norm(name: str) -> str:
    return name.strip().lower()


@dataclass(frozen=True)
class Entry:
    """One selectable calibration: a file plus the object properties it is meant for (None = any)."""

    file: Path
    model_name: str | None = None
    tp_size: int | None = None
    tp_rank: int | None = None
    object_group_id: int | None = None
    kernel_group: int | None = None

    @property
    def specificity(self) -> int:
        return sum(getattr(self, f) is not None for f in _SELECTOR_FIELDS)

    def matches(self, model_name: str, kv_rank: int, object_group_id: int, kernel_group: int) -> bool:
        world, rank = decode_kv_rank(kv_rank)
        if self.model_name is not None:
            wanted = _norm(self.model_name)
            if wanted not in (_norm(model_name), _norm(model_name).rsplit("/", 1)[-1]):
                return False
        return all(
            want is None or want == have
            for want, have in (
                (self.tp_size, world),
                (self.tp_rank, rank),
                (self.object_group_id, object_group_id),
                (self.kernel_group, kernel_group),
            )
        )


class CalibrationSet:
    """The calibrations of one serde, loaded and verified up front, looked up per object or by blob fingerprint."""

    def __init__(self, entries: list[Entry], origin: str, loaded: dict[Path, Calibration] | None = None):
        if not entries:
            raise CalibrationError(f"{origin}: no calibration files found")
        self.origin = origin
        self.entries = sorted(entries, key=lambda e: -e.specificity)
        loaded = dict(loaded or {})
        for entry in self.entries:
            if entry.file not in loaded:
                loaded[entry.file] = Calibration.load(entry.file)  # raises CalibrationError naming the file
        self._by_file = loaded
        self._warned: set[tuple] = set()

    @classmethod
    def from_path(cls, path: str | Path) -> CalibrationSet:
        path = Path(path)
        if path.is_file():
            return cls([Entry(path)], str(path))
        if not path.is_dir():
            raise CalibrationError(f"kvtc calibration path {path} is neither a file nor a directory")
        index = path / INDEX_FILE
        if index.is_file():
            return cls(_read_index(index), str(path))
        loaded = {f: Calibration.load(f) for f in sorted(path.glob("*.safetensors"))}
        return cls([Entry(f, model_name=c.model_id) for f, c in loaded.items()], str(path), loaded)

    def calibration_for(self, entry: Entry) -> Calibration:
        return self._by_file[entry.file]

    def all(self) -> list[Calibration]:
        return [self.calibration_for(e) for e in self.entries]

    def fitting(self, layers: int, hidden: int) -> list[Calibration]:
        """Calibrations that can code a ``[2, layers, T, hidden]`` group (for size estimates)."""
        return [c for c in self.all() if c.layers == layers and c.hidden == hidden]

    def select(self, model_name: str, kv_rank: int, object_group_id: int, kernel_group: int,
               layers: int, hidden: int) -> Calibration:
        """The calibration for one kernel group of one object; raises ``CalibrationError`` if none fits."""
        fits = []
        for entry in self.entries:
            calibration = self.calibration_for(entry)
            if calibration.layers != layers or calibration.hidden != hidden:
                continue
            if entry.matches(model_name, kv_rank, object_group_id, kernel_group):
                return calibration
            fits.append(calibration)
        if len({c.fingerprint for c in fits}) == 1:
            self._warn_once(("fallback", model_name), "kvtc: no calibration in %s is named for model %r; using %s "
                            "(%s), the only one that fits its layout", self.origin, model_name,
                            fits[0].model_id, fits[0].fingerprint.hex())
            return fits[0]
        raise CalibrationError(
            f"kvtc: no calibration in {self.origin} for model {model_name!r} (kv_rank {kv_rank:#x}, "
            f"object group {object_group_id}, kernel group {kernel_group}) with {layers} layers × {hidden} K/V width"
        )

    def by_fingerprint(self, fingerprint: bytes) -> Calibration:
        for calibration in self.all():
            if calibration.fingerprint == fingerprint:
                return calibration
        raise CalibrationMismatchError(
            f"blob was made with calibration {fingerprint.hex()}, which is not in {self.origin}"
        )

    def _warn_once(self, tag: tuple, message: str, *args) -> None:
        if tag not in self._warned:
            self._warned.add(tag)
            log.warning(message, *args)


def _read_index(index: Path) -> list[Entry]:
    try:
        spec = json.loads(index.read_text())
        items = spec["calibrations"]
        if not isinstance(items, list):
            raise TypeError("'calibrations' must be a list")
        entries = []
        for item in items:
            unknown = set(item) - {"file", *_SELECTOR_FIELDS}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}")
            for name in _SELECTOR_FIELDS:
                expected = str if name == "model_name" else int
                if name in item and (not isinstance(item[name], expected) or isinstance(item[name], bool)):
                    raise TypeError(f"{name} must be {expected.__name__}, got {item[name]!r}")
            file = index.parent / str(item["file"])
            if not file.is_file():
                raise ValueError(f"{file} does not exist")
            entries.append(Entry(file, **{k: item[k] for k in _SELECTOR_FIELDS if k in item}))
        return entries
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CalibrationError(f"{index}: invalid calibration index: {exc}") from exc
