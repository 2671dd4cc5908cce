"""Files a daemon re-reads when they change on disk (whitelists, rules, maps, override lists).

A ``FileWatch`` remembers each path's (st_mtime_ns, st_size, st_ino) as of the last read and says whether
any differs now: one ``stat`` per path, no thread. The owner polls it from a timer it already has (or
where it already looked), and reads through a callback:

- ``read``: read now and remember the files as read; an error propagates and the files stay unread, so
  the next poll tries again (start-up, or a source whose failure is an answer of its own);
- ``reread``: read again keeping the old value on error: ``None`` comes back, one log line says why, and
  the broken files are not read again until they change.

A missing file is a state of its own, so a file that appears, disappears or is replaced (a new inode,
as ``mv`` of a new version does) counts as changed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import TypeVar

from mailwarden.logs import log_kv

T = TypeVar("T")

Stamp = tuple[int, int, int] | None
"""(st_mtime_ns, st_size, st_ino) of one path, or None when it cannot be stat()ed."""


class FileWatch:
    __slots__ = ("_seen", "paths")

    def __init__(self, paths: Iterable[str | os.PathLike[str]]) -> None:
        self.paths = tuple(paths)
        self._seen: tuple[Stamp, ...] | None = None
        """The stamps as of the last read; None before the first."""

    def stamps(self) -> tuple[Stamp, ...]:
        found: list[Stamp] = []
        for path in self.paths:
            try:
                st = os.stat(path)
            except OSError:
                found.append(None)
                continue
            found.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(found)

    def changed(self) -> bool:
        """True when a file differs from the last read (always before the first)."""
        return self.stamps() != self._seen

    def read(self, read: Callable[[], T]) -> T:
        """``read()``, and the files remembered as read; what it raises propagates, the files unread."""
        stamps = self.stamps()
        value = read()
        self._seen = stamps
        return value

    def reread(self, read: Callable[[], T], errors: type[Exception] | tuple[type[Exception], ...],
               logger: logging.Logger, message: str, **context: object) -> T | None:
        """``read()``, or None when it raised one of ``errors``: logged as ``message`` with the error (and
        ``context``), the caller keeps what it had, and the files count as read until they change again."""
        stamps = self.stamps()
        try:
            value = read()
        except errors as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            log_kv(logger, logging.ERROR, message, **context, error=why)
            self._seen = stamps
            return None
        self._seen = stamps
        return value
