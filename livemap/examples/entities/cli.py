"""The command line: ``python -m livemap.examples.entities``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sqlite3
import sys
import traceback
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path

import anyio

from .database import EntityDBError
from .pipeline import DEFAULT_DB, DEFAULT_INTERVAL, DEFAULT_SHARDS, Pipeline, Summary
from .sample import BUNDLED_COUNT, BUNDLED_EVENTS, write_events

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m livemap.examples.entities",
        description=(
            "Index the entities of a JSONL event stream into SQLite with livemap: "
            "one row per live entity, updated and deleted as events arrive."
        ),
    )
    parser.add_argument(
        "--input",
        metavar="PATH",
        action="append",
        help="JSONL event file; repeat for several (default: the bundled sample, "
        f"{BUNDLED_COUNT} events)",
    )
    parser.add_argument(
        "--db",
        metavar="PATH",
        default=DEFAULT_DB,
        help=f"SQLite database to maintain (default: ./{DEFAULT_DB}; "
        "':memory:' for a throwaway one)",
    )
    parser.add_argument(
        "--live",
        action="store_true",
        help="after catching up, keep following the input files as lines are appended; "
        "Ctrl+C stops",
    )
    parser.add_argument(
        "--interval",
        metavar="SECONDS",
        type=float,
        default=DEFAULT_INTERVAL,
        help="how often progress is shown and --live polls the files "
        f"(default: {DEFAULT_INTERVAL})",
    )
    parser.add_argument(
        "--shards",
        metavar="N",
        type=int,
        default=DEFAULT_SHARDS,
        help=f"producer components per input file (default: {DEFAULT_SHARDS})",
    )
    parser.add_argument(
        "--backend",
        choices=("asyncio", "trio"),
        default="asyncio",
        help="event loop to run on (default: asyncio)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="print no progress or summary, only problems"
    )
    parser.add_argument(
        "--generate",
        nargs=2,
        metavar=("N", "PATH"),
        help="write N sample events to PATH ('-' for stdout) and exit",
    )
    parser.add_argument("--seed", type=int, default=42, help="seed for --generate (default: 42)")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="show the traceback of an error, and log more",
    )
    return parser


async def _stop_on_signal(stop: anyio.Event) -> None:
    """Turn the first Ctrl+C (or SIGTERM) into a clean stop.  The handlers are
    removed once it arrives, so a second Ctrl+C interrupts for good."""
    try:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for _ in signals:
                break
    except (NotImplementedError, RuntimeError, ValueError):
        return  # no signal handling here (not the main thread, or Windows): Ctrl+C raises
    stop.set()


async def _run_cli(pipeline: Pipeline, *, live: bool, quiet: bool) -> Summary:
    stop = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_stop_on_signal, stop)
        summary = await pipeline.run(live=live, stop=stop, quiet=quiet)
        tg.cancel_scope.cancel()
    return summary


class _Failed(Exception):
    """An ordinary error (a path that cannot be used): one line, exit status 1."""


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status: 0 when done, 1 after an
    error (one line on stderr, and its traceback with ``--debug``), 2 for a
    usage error, 130 when interrupted before the end of a catch-up, or by a
    second Ctrl+C."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    if args.debug:
        logging.getLogger("livemap").setLevel(logging.DEBUG)
    try:
        return _main(parser, args)
    except KeyboardInterrupt:  # a second Ctrl+C while cleaning up: give up quietly
        return 130
    except Exception as exc:
        ordinary = _ordinary(exc)
        if ordinary is None:
            raise  # a bug: the traceback is the report
        if args.debug:
            traceback.print_exception(exc)
        print(f"error: {ordinary}", file=sys.stderr)
        return 1


def _ordinary(exc: BaseException) -> BaseException | None:
    """The error to report in one line, if ``exc`` is one that needs no
    traceback: a path that cannot be used, an I/O or SQLite error (also when
    an exception group wraps it alone)."""
    inner = getattr(exc, "exceptions", None)
    while isinstance(inner, tuple) and len(inner) == 1 and isinstance(inner[0], BaseException):
        exc = inner[0]
        inner = getattr(exc, "exceptions", None)
    if isinstance(exc, (_Failed, EntityDBError, OSError, sqlite3.Error)):
        return exc
    return None


def _generate(path: str, count: int, *, seed: int, quiet: bool) -> int:
    try:
        write_events(path, count, seed=seed)
    except BrokenPipeError:  # stdout closed early (``| head``): stop quietly
        with suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        raise _Failed(f"cannot write {path}: {exc.strerror or exc}") from exc
    if not quiet and path != "-":
        print(f"wrote {count} events to {path}")
    return 0


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.generate is not None:
        count, path = args.generate
        if not count.isdigit():
            parser.error(f"--generate: N must be a count, got {count!r}")
        return _generate(path, int(count), seed=args.seed, quiet=args.quiet)
    inputs = [Path(p) for p in args.input] if args.input else [BUNDLED_EVENTS]
    for path in inputs:
        if not path.is_file():
            parser.error(f"no such input file: {path}")
        try:
            path.open("rb").close()
        except OSError as exc:
            raise _Failed(f"cannot read {path}: {exc.strerror or exc}") from exc
    if args.shards < 1 or args.interval <= 0:
        parser.error("--shards must be >= 1 and --interval positive")
    pipeline = Pipeline(inputs, args.db, shards=args.shards, interval=args.interval)
    try:
        summary = anyio.run(
            lambda: _run_cli(pipeline, live=args.live, quiet=args.quiet), backend=args.backend
        )
    except KeyboardInterrupt:  # a second Ctrl+C, or one where signals can't be caught
        if not args.quiet and pipeline.last_summary is None:
            print()
            print(pipeline.summary(live=args.live, interrupted=True).format(), end="")
        return 130
    finally:
        with suppress(sqlite3.Error):
            pipeline.close()
    if summary.interrupted and not args.live:
        return 130
    for problem in summary.problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if summary.problems else 0
