"""``python -m livemap``: the version, the core in use, and where to start."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib import metadata

import livemap_core
from livemap._version import __version__

EXAMPLE = "python -m livemap.examples.entities"


def _project_url(label: str) -> str | None:
    """A ``Project-URL`` of the installed distribution, if it is installed."""
    try:
        urls = metadata.metadata("livemap").get_all("Project-URL") or []
    except metadata.PackageNotFoundError:
        return None
    for entry in urls:
        name, _, url = str(entry).partition(",")
        if name.strip().lower() == label.lower():
            return url.strip()
    return None


def _core() -> str:
    if livemap_core.IMPLEMENTATION == "cython":
        return "compiled (livemap_core._core)"
    why = "LIVEMAP_NO_EXTENSIONS is set" if livemap_core.NO_EXTENSIONS else "not built"
    return f"pure Python (the compiled core is {why})"


def _summary() -> str:
    lines = [
        f"livemap {__version__}: a live, owned, in-memory keyed map between the producing",
        "and consuming halves of an async pipeline, with a small declarative component",
        "runtime on anyio (asyncio and trio).",
        "",
        "Try the example pipeline (JSONL events in, a SQLite index out):",
        "",
        f"    {EXAMPLE}",
        f"    {EXAMPLE} --help",
        "",
        f"core:   {_core()}",
        f"python: {sys.version.split()[0]} ({sys.implementation.name})",
    ]
    docs = _project_url("Documentation")
    if docs:
        lines.append(f"docs:   {docs}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m livemap",
        description="Show livemap's version and where to start.",
        epilog=f"The example pipeline: {EXAMPLE} --help",
    )
    parser.add_argument("--version", action="version", version=f"livemap {__version__}")
    parser.parse_args(argv)
    print(_summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
