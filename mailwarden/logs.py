"""Logging: logfmt lines to stderr (journald picks them up) or to syslog.

Daemon messages go through the standard ``logging`` module with a logfmt formatter. Decision lines,
one per policy request, take a leaner path (``DecisionLog``) because they are on the hot path: they
are rendered once and written in one batch per event-loop tick, or, in policyd, per ``[logging]
decision_batch`` (50 ms by default).
"""

from __future__ import annotations

import asyncio
import logging
import logging.handlers
import os
import sys
import time
from typing import Annotated, Literal, TextIO

from pydantic import Field

from mailwarden.logfmt import logfmt_pairs
from mailwarden.section import Section
from mailwarden.units import Duration

LOGGER_NAME = "mailwarden"

DECISION_BATCH_SECONDS = 0.05
"""policyd's default batch interval: one write per 50 ms instead of one per event-loop tick measured about
-2.4 to -5% server CPU per request in paired runs (bench/README.md). The price: a decision line reaches
the log up to 50 ms after its answer, and a crash that skips the flush at stop (SIGKILL, a segfault)
loses at most the last 50 ms of lines."""


class LoggingSettings(Section):
    destination: Literal["stderr", "syslog"] = "stderr"
    level: Literal["debug", "info", "warning", "error"] = "info"
    syslog_socket: str = "/dev/log"
    syslog_facility: Literal["mail", "daemon", "local0", "local1", "local2", "local3", "local4", "local5",
                             "local6", "local7"] = "mail"
    decisions: bool = True
    """One line per decision; turn off only for benchmarks of the bare protocol path."""
    decision_batch: Annotated[Duration, Field(ge=0)] = DECISION_BATCH_SECONDS
    """policyd (destination stderr): its decision lines go out together once per this interval, so a line
    reaches the log up to this long after its answer; 0 writes them at the end of each event-loop tick.
    Flushed when policyd stops. The milters and phishhook write each line as it comes (few requests)."""


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info logger=policyd msg="..." key=value``; extra key=values come from ``kv``."""

    def __init__(self, with_time: bool) -> None:
        super().__init__()
        self.with_time = with_time

    def format(self, record: logging.LogRecord) -> str:
        pairs: list[tuple[str, object]] = []
        if self.with_time:
            pairs.append(("ts", _timestamp(record.created)))
        if getattr(record, "logfmt", False):  # a decision line, rendered already
            return f"{logfmt_pairs(pairs)} level={record.levelname.lower()} {record.getMessage()}".lstrip()
        pairs += [("level", record.levelname.lower()), ("logger", record.name), ("msg", record.getMessage())]
        pairs += list(getattr(record, "kv", {}).items())
        if record.exc_info:
            pairs.append(("error", self.formatException(record.exc_info).replace("\n", " | ")))
        return logfmt_pairs(pairs)


def _timestamp(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


def setup_logging(settings: LoggingSettings, stream: TextIO | None = None,
                  batch_decisions: bool = False) -> DecisionLog:
    """Configure the ``mailwarden`` logger tree and return the decision sink that goes with it. With
    ``batch_decisions`` the sink batches by ``settings.decision_batch``: only for a caller that flushes it
    when it stops (policyd's ``serve``), else the last batch would be lost."""
    root = logging.getLogger(LOGGER_NAME)
    for old in list(root.handlers):
        root.removeHandler(old)
    root.setLevel(settings.level.upper())
    root.propagate = False
    if settings.destination == "syslog":
        syslog = logging.handlers.SysLogHandler(address=settings.syslog_socket, facility=settings.syslog_facility)
        syslog.ident = f"mailwarden[{os.getpid()}]: "  # the syslog tag, so the line can be found and filtered
        syslog.setFormatter(LogfmtFormatter(with_time=False))
        root.addHandler(syslog)
        return DecisionLog(enabled=settings.decisions, logger=logging.getLogger(f"{LOGGER_NAME}.decision"))
    out = stream or sys.stderr
    handler = logging.StreamHandler(out)
    handler.setFormatter(LogfmtFormatter(with_time=True))
    root.addHandler(handler)
    return DecisionLog(enabled=settings.decisions, stream=out,
                       batch_seconds=settings.decision_batch if batch_decisions else 0.0)


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(f"{LOGGER_NAME}.{name}")


def log_kv(logger: logging.Logger, level: int, msg: str, **kv: object) -> None:
    """Log ``msg`` with key=value context rendered by LogfmtFormatter."""
    logger.log(level, msg, extra={"kv": kv})


class Throttled:
    """A recurring warning logged at most once per ``interval`` per key: the first at once, the later ones
    folded into ``count=`` (how many happened since the previous line, this one included)."""

    def __init__(self, logger: logging.Logger, level: int, msg: str, interval: float = 10.0) -> None:
        self.logger, self.level, self.msg, self.interval = logger, level, msg, interval
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}
        self._kv: dict[str, dict[str, object]] = {}

    def hit(self, key: str = "", **kv: object) -> None:
        self._count[key] = self._count.get(key, 0) + 1
        self._kv[key] = kv
        if time.monotonic() - self._last.get(key, -self.interval) >= self.interval:
            self._emit(key)

    def flush(self) -> None:
        """Log the folded counts whose interval has passed (call it now and then: a timer, a sweeper)."""
        now = time.monotonic()
        for key, count in list(self._count.items()):
            if count and now - self._last.get(key, 0.0) >= self.interval:
                self._emit(key)

    def _emit(self, key: str) -> None:
        self._last[key] = time.monotonic()
        count, self._count[key] = self._count.get(key, 0), 0
        log_kv(self.logger, self.level, self.msg, **self._kv.get(key, {}), count=count)


class DecisionLog:
    """Writes decision lines; to a stream in one write per ``batch_seconds`` (0: per event-loop tick), or
    through a logger (syslog). Lines go out in the order emitted; ``flush`` writes whatever is pending
    (daemons call it when they stop)."""

    def __init__(self, enabled: bool = True, stream: TextIO | None = None, logger: logging.Logger | None = None,
                 batch_seconds: float = 0.0):
        self.enabled = enabled
        self._stream = stream
        self._logger = logger
        self._batch_seconds = batch_seconds
        self._pending: list[str] = []
        """Prefix, line, newline, prefix, line, newline... (joined when written)."""
        self._flush_scheduled: asyncio.Handle | None = None
        self._second = -1
        self._ts = ""
        self._millisecond = -1
        self._prefix = ""
        """``ts=... level=info `` for the current millisecond: several lines a millisecond share it."""

    def emit(self, line: str) -> None:
        if not self.enabled:
            return
        if self._logger is not None:
            self._logger.info(line, extra={"logfmt": True})
            return
        millisecond = int(time.time() * 1000)
        if millisecond != self._millisecond:
            self._millisecond = millisecond
            second = millisecond // 1000
            if second != self._second:
                self._second = second
                self._ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._prefix = f"ts={self._ts}.{millisecond % 1000:03d}Z level=info "
        self._pending += (self._prefix, line, "\n")  # no copy of the line: joined once per write
        if self._flush_scheduled is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            if self._batch_seconds > 0:
                self._flush_scheduled = loop.call_later(self._batch_seconds, self.flush)
            else:
                self._flush_scheduled = loop.call_soon(self.flush)

    def flush(self) -> None:
        if self._flush_scheduled is not None:
            self._flush_scheduled.cancel()  # called early (at stop): the timer has nothing left to do
            self._flush_scheduled = None
        if not self._pending or self._stream is None:
            return
        lines, self._pending = self._pending, []
        try:
            self._stream.write("".join(lines))
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take the daemon down; nothing else could report it
