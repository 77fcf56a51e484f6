"""The status line: progress shown while the pipeline works, kept apart from
log lines."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

__all__ = ["StatusLine"]


class StatusLine:
    """A one-line status.

    On a terminal it is one line rewritten in place (cut to the terminal's
    width, so it never wraps); otherwise each new text is a plain line of its
    own.  While it is on a terminal, nothing else may write on its line: a
    log record first clears it (see :meth:`keep_logs_apart`), and the next
    :meth:`show` draws it again below the record.
    """

    def __init__(self, out: TextIO, *, enabled: bool = True) -> None:
        self.out = out
        self.enabled = enabled
        self.tty = enabled and out.isatty()
        self.last = ""  # the last text shown, "" before the first
        self.drawn = False  # on a terminal: whether it is on the screen now

    def show(self, text: str) -> None:
        """Show ``text`` (nothing happens if it is what is shown already)."""
        if not self.enabled or (text == self.last and (self.drawn or not self.tty)):
            return
        self.last = text
        if self.tty:
            self.out.write(f"\r{self._fit(text)}\x1b[K")
            self.drawn = True
        else:
            self.out.write(f"{text}\n")
        self.out.flush()

    def clear(self) -> None:
        """Take the status off the terminal line, leaving the cursor at its start."""
        if self.drawn:
            self.out.write("\r\x1b[K")
            self.out.flush()
            self.drawn = False

    def finish(self) -> None:
        """End the status: on a terminal, leave its last text on a line of its own."""
        if self.tty and self.last:
            if not self.drawn:
                self.show(self.last)
            self.out.write("\n")
            self.out.flush()
            self.drawn = False

    @contextmanager
    def keep_logs_apart(self) -> Iterator[None]:
        """For the block, every handler of the root logger clears the status
        line before it writes a record, so a log line starts a line of its
        own (the handlers' own streams stay as they are)."""
        clear_first = _ClearFirst(self)
        handlers = list(logging.getLogger().handlers)
        for handler in handlers:
            handler.addFilter(clear_first)
        try:
            yield
        finally:
            for handler in handlers:
                handler.removeFilter(clear_first)

    def _fit(self, text: str) -> str:
        try:
            width = os.get_terminal_size(self.out.fileno()).columns
        except (AttributeError, OSError, ValueError):  # not a real terminal: no width to keep
            return text
        return text[: width - 1] if width > 1 else text  # 0: the terminal did not say


class _ClearFirst(logging.Filter):
    """A handler filter that lets every record through, clearing the status
    line first."""

    def __init__(self, status: StatusLine) -> None:
        super().__init__()
        self.status = status

    def filter(self, record: logging.LogRecord) -> bool:
        self.status.clear()
        return True
