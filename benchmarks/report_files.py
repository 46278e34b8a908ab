"""Where a benchmark's report goes: ``OUT.json`` (every row), ``OUT.md`` (the tables) and ``OUT.png`` (a plot)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path


def write(out: Path | None, report: dict, title: str, tables: str,
          plot: Callable[[dict, Path], None] | None = None, caption: str = "") -> None:
    """Write the three files (names like "…-0.5b-…" have no suffix to replace: append); nothing if ``out`` is None.
    The markdown gives the command that made it; the plot is drawn only if ``plot`` is given."""
    if out is None:
        return
    paths = {ext: out.parent / f"{out.name}.{ext}" for ext in ("json", "md", "png")}
    out.parent.mkdir(parents=True, exist_ok=True)
    paths["json"].write_text(json.dumps(report, indent=1))
    image = f"![{caption}]({paths['png'].name})\n" if plot else ""
    paths["md"].write_text(f"# {title}\n\n`{report['command']}`\n\n{tables}\n\n{image}")
    if plot:
        plot(report, paths["png"])
