"""Our spamd client: SpamAssassin's daemon asked through aiospamc, with a synchronous API for pymilter's threads.

pymilter runs its callbacks in libmilter's worker threads, synchronously; aiospamc is asyncio. A
``SpamdClient`` owns one event loop in a background thread (started on first use, and again after a fork), and
every call hands a coroutine to it and waits for the answer, bounded by the call's ``timeout``; many threads
may call at once, the loop runs their requests side by side. Calls:

- ``check(message, user)``: spamd's REPORT verb (one scan), as ``user``: spamd loads that user's preferences and
  Bayes database (``-x --virtual-config-dir``, or its real users). Returns a ``SpamReport``: the score and
  the threshold from spamd's ``Spam:`` header, and the rules hit with their scores, read from the report's
  summary table (``_SUMMARY_``, the same in every language SpamAssassin ships except French). When a site's
  report template has no such table, the rule names are asked with SYMBOLS (a second scan; no scores then).
- ``tell(message, user, "spam"|"ham")``: TELL with ``Message-class`` and ``Set: local``, which trains that
  user's Bayes database (spamd must run with ``--allow-tell``). True when spamd learned it, False when it
  had already learned this message as that class.
- ``ping()``: PING, PONG.

A message larger than ``max_size`` is sent in part: its first ``max_size`` bytes, cut at the last line end
(the header and the start of the body), and the report says ``partial``: spamd itself has no size limit, but
scanning time grows with size (spamc passes anything above 500 KB unscanned). SpamAssassin 4 reads only
the first 50 KB of each text part anyway (``body_part_scan_size``; ``rawbody_part_scan_size`` 500 KB), so
body rules never see text far into one long part, whatever is sent.

Every failure is one exception, ``SpamdError``, with a ``reason`` the milter picks its fail mode and metric by:
``unreachable`` (no connection: refused, no such socket, a name that does not resolve), ``timeout`` (no
complete answer within ``timeout``: a hung or overloaded spamd, or spamd's own child timeout),
``protocol`` (an answer we cannot read, or the connection dropped mid-answer) and ``refused`` (spamd answered
with an error status: TELL not allowed, a bad request, a configuration error).

aiospamc (1.2) in brief, as used here: ``Client(connection_manager).request(Request(...))`` sends one request
on a new connection, half-closes it, reads to the end, parses, and raises for a non-zero status
(``ResponseException`` subclasses); a refused connect is ``AIOSpamcConnectionFailed``; its ``Timeout(total=)``
raises a bare ``asyncio.TimeoutError`` (we bound each call ourselves, its own bound is a backstop). It closes
the connection only after a complete answer, so ours close a connection a timeout cut short (``_Tracking``).
A response is read whole into memory (REPORT answers are a few KB). It logs through loguru, disabled for its
package at import. It sends the ``User`` header as ASCII (``check`` refuses other names before sending). It
has no type hints (mypy: ignore_missing_imports). Its frontend functions (``aiospamc.check`` ...) build a
client per call and take no per-call headers beyond ``user``; the classes underneath are used instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypeVar

from aiospamc.client import Client
from aiospamc.connections import ConnectionManager, TcpConnectionManager, Timeout, UnixConnectionManager
from aiospamc.exceptions import AIOSpamcConnectionFailed, BadResponse, ClientTimeoutException
from aiospamc.header_values import ActionOption, MessageClassOption
from aiospamc.requests import Request
from aiospamc.responses import ResponseException, ServerTimeoutException
from pydantic import field_validator

from mailwarden.section import Section
from mailwarden.units import Duration, Size

T = TypeVar("T")

DEFAULT_PORT = 783
MIN_SIZE = 16 << 10
"""Below this, not even a typical header fits: a smaller ``max_size`` is a mistake."""
LOOP_GRACE = 1.0
"""Seconds a caller waits beyond ``timeout`` for the loop to report the timeout itself (it always should)."""


class SpamdSettings(Section):
    """How the milter reaches spamd (a part of the SpamAssassin milter's section)."""

    address: str = f"127.0.0.1:{DEFAULT_PORT}"
    """``HOST:PORT`` (``[IPv6]:PORT`` for an IPv6 address; ``inet:HOST:PORT`` as Postfix writes it is taken too)
    or ``unix:/PATH``. Debian's spamd listens on 127.0.0.1:783 (``--listen`` in /etc/default/spamd)."""
    timeout: Duration = 30
    """For one request: connect, send, and spamd's whole answer. spamd itself gives up on a message after
    ``--timeout-child`` (300 s)."""
    max_size: Size = 1 << 20
    """A larger message is sent in part: its first ``max_size`` bytes (header and the start of the body)."""

    @field_validator("address")
    @classmethod
    def _address(cls, address: str) -> str:
        spamd_address(address)
        return address

    @field_validator("timeout")
    @classmethod
    def _timeout(cls, timeout: float) -> float:
        if timeout <= 0:
            raise ValueError("timeout must be above 0")
        return timeout

    @field_validator("max_size")
    @classmethod
    def _max_size(cls, size: int) -> int:
        if size < MIN_SIZE:
            raise ValueError(f"max_size below {MIN_SIZE >> 10}KB leaves no room for a message's header")
        return size


Address = str | tuple[str, int]
"""A unix socket path, or (host, port)."""

_ADDRESS = re.compile(r"^(?:unix:(?P<path>/\S+)"
                      r"|(?:inet:)?(?:\[(?P<ipv6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*)):(?P<port>\d{1,5}))$")


def spamd_address(address: str) -> Address:
    """The socket path of ``unix:/PATH``, or ``(host, port)`` of ``HOST:PORT``, ``[IPv6]:PORT``, ``inet:HOST:PORT``."""
    match = _ADDRESS.match(address)
    if match is None:
        raise ValueError(f"{address!r}: expected HOST:PORT, [IPv6]:PORT or unix:/PATH")
    if match["path"]:
        return match["path"]
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"{address!r}: port {port} out of range 1-65535")
    return match["ipv6"] or match["host"], port


def describe(address: Address) -> str:
    return f"unix:{address}" if isinstance(address, str) else f"{address[0]}:{address[1]}"


class Failure(StrEnum):
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    PROTOCOL = "protocol"
    REFUSED = "refused"


class SpamdError(Exception):
    """spamd gave no usable answer: ``reason`` says which kind of failure, ``str()`` the details for the log."""

    def __init__(self, reason: Failure, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class RuleHit:
    name: str
    score: float | None
    """The rule's score for this user; None when spamd's report had no summary table (SYMBOLS gave the name)."""
    description: str = ""


@dataclass(frozen=True)
class SpamReport:
    """spamd's verdict on one message for one user."""

    score: float
    threshold: float
    """The user's ``required_score``."""
    is_spam: bool
    """spamd's own verdict: score at or above the threshold."""
    rules: tuple[RuleHit, ...]
    """In the order spamd's report lists them."""
    partial: bool
    """The message was larger than ``max_size``: only its first part was scanned."""
    bytes_scanned: int

    @property
    def rule_names(self) -> tuple[str, ...]:
        return tuple(rule.name for rule in self.rules)


Kind = Literal["spam", "ham"]


def message_head(message: bytes | BinaryIO, max_size: int) -> tuple[bytes, bool]:
    """At most ``max_size`` bytes of the message (a file is read from where it stands), cut at the last line end
    when the message is longer; and whether it was longer."""
    if isinstance(message, bytes | bytearray | memoryview):
        data = bytes(message[:max_size + 1])
    else:
        data = message.read(max_size + 1)
    if len(data) <= max_size:
        return data, False
    head = data[:max_size]
    line_end = head.rfind(b"\n")
    return (head[:line_end + 1] if line_end > 0 else head), True


_USER = re.compile(r"^[!-~]{1,255}$")


def check_user(user: str) -> str:
    """spamd's user name: printable ASCII without spaces (aiospamc sends it as ASCII in a header line), no
    ``/`` or ``\\`` and not starting with a dot (spamd builds a directory name from it)."""
    if not _USER.match(user) or "/" in user or "\\" in user or user.startswith("."):
        raise ValueError(f"{user!r} cannot be a spamd user name: printable ASCII, no spaces, '/' or '\\', "
                         "not starting with '.'")
    return user


_SEPARATOR = re.compile(r"^-{4} -{10,} -{10,}\s*$")
_SUMMARY_LINE = re.compile(r"^(?P<score> {0,3}-?\d+(?:\.\d)?) (?P<name>[A-Za-z_][A-Za-z0-9_]*)(?: +(?P<desc>.*?))?\s*$")
_CONTINUATION = " " * 28


def parse_summary(report: str) -> tuple[RuleHit, ...] | None:
    """The rules of the summary table (SpamAssassin's ``_SUMMARY_``) after the report's last ``---- ----``
    line; None when the report has no such line (a site's own template). Each rule line is the score, right
    aligned in 4 characters (``%4.1f``, ``%4.0f`` from 10 on), the name, and the description, whose wrapped
    rest follows on lines indented by 28 spaces; rule messages (``[score: 0.9999]``) are left out. The
    content preview stands before the table in every shipped template, so a message cannot add rules."""
    lines = report.splitlines()
    starts = [number for number, line in enumerate(lines) if _SEPARATOR.match(line)]
    if not starts:
        return None
    rules: list[RuleHit] = []
    for line in lines[starts[-1] + 1:]:
        match = _SUMMARY_LINE.match(line)
        if match and len(match["score"]) >= 4:
            rules.append(RuleHit(match["name"], float(match["score"]), match["desc"] or ""))
        elif rules and line.startswith(_CONTINUATION) and not line.strip().startswith("["):
            last = rules[-1]
            rules[-1] = RuleHit(last.name, last.score, f"{last.description} {line.strip()}".strip())
    return tuple(rules)


def _why(exc: BaseException) -> str:
    """An OSError in words ("Connection refused", "No such file or directory", "Name or service not known")."""
    if isinstance(exc, socket.gaierror):
        return str(exc.strerror)
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno)
    return str(exc)


class _Tracking(ConnectionManager):
    """Remembers the connection it opened: aiospamc closes it only after a complete answer, so a request cut
    short by our timeout would leave the socket registered in the loop until spamd closed it."""

    writer: asyncio.StreamWriter | None = None

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, self.writer = await super().open()
        return reader, self.writer


class _Tcp(_Tracking, TcpConnectionManager):
    pass


class _Unix(_Tracking, UnixConnectionManager):
    pass


class SpamdClient:
    """spamd at ``settings.address``; thread-safe. ``close()`` stops the loop thread (a daemon thread: it does
    not hold up the process's exit either)."""

    def __init__(self, settings: SpamdSettings) -> None:
        self.settings = settings
        self.address = spamd_address(settings.address)
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._pid = 0

    def check(self, message: bytes | BinaryIO, user: str, timeout: float | None = None) -> SpamReport:
        """Score the message (its first ``max_size`` bytes) as ``user``. Raises SpamdError."""
        check_user(user)
        data, partial = message_head(message, self.settings.max_size)
        return self._run(lambda seconds: self._check(data, partial, user, seconds), timeout)

    def tell(self, message: bytes | BinaryIO, user: str, kind: Kind, timeout: float | None = None) -> bool:
        """Train ``user``'s Bayes database with the message as ``kind``; False when it was already learned so.
        Raises SpamdError."""
        check_user(user)
        if kind not in ("spam", "ham"):
            raise ValueError(f"{kind!r}: a message is told as 'spam' or 'ham'")
        data, _ = message_head(message, self.settings.max_size)
        return self._run(lambda seconds: self._tell(data, user, kind, seconds), timeout)

    def ping(self, timeout: float | None = None) -> float:
        """Seconds spamd took to answer PING with PONG. Raises SpamdError."""
        return self._run(self._ping, timeout)

    def close(self) -> None:
        with self._lock:
            loop, thread, pid = self._loop, self._thread, self._pid
            self._loop = self._thread = None
        if loop is not None and thread is not None and pid == os.getpid():
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)
            if not thread.is_alive():
                loop.close()

    def __enter__(self) -> SpamdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- in the loop ---

    async def _check(self, data: bytes, partial: bool, user: str, seconds: float) -> SpamReport:
        response = await self._request("REPORT", data, seconds, user=user)
        spam = response.headers.spam
        if spam is None:
            raise SpamdError(Failure.PROTOCOL, f"{describe(self.address)}: REPORT answer without a Spam header")
        rules = parse_summary(response.body.decode("utf-8", "replace"))
        if rules is None:  # the site's report template has no summary table: ask for the names
            symbols = await self._request("SYMBOLS", data, seconds, user=user)
            names = symbols.body.decode("utf-8", "replace").split(",")
            rules = tuple(RuleHit(name.strip(), None) for name in names if name.strip())
        return SpamReport(score=float(spam.score), threshold=float(spam.threshold), is_spam=bool(spam.value),
                          rules=rules, partial=partial, bytes_scanned=len(data))

    async def _tell(self, data: bytes, user: str, kind: Kind, seconds: float) -> bool:
        response = await self._request("TELL", data, seconds, user=user, message_class=MessageClassOption(kind),
                                       set_=ActionOption(local=True))
        did_set = response.headers.did_set
        return bool(did_set and did_set.local)

    async def _ping(self, seconds: float) -> float:
        started = time.monotonic()
        response = await self._request("PING", b"", seconds)
        if response.message != "PONG":
            raise SpamdError(Failure.PROTOCOL, f"{describe(self.address)}: PING answered {response.message[:100]!r}")
        return time.monotonic() - started

    async def _request(self, verb: str, body: bytes, seconds: float, **headers: object) -> Any:
        """One request on a connection of its own (``headers``: aiospamc's ``Headers`` properties, e.g. ``user``);
        aiospamc's exceptions made SpamdError. Our own bound (``_bounded``) comes first: aiospamc's total
        timeout is a backstop."""
        request = Request(verb, body=body)
        for name, value in headers.items():
            setattr(request.headers, name, value)
        where = describe(self.address)
        timeout = Timeout(total=seconds + LOOP_GRACE)
        manager = (_Unix(Path(self.address), timeout) if isinstance(self.address, str)
                   else _Tcp(self.address[0], self.address[1], timeout=timeout))
        try:
            return await Client(manager).request(request)
        except AIOSpamcConnectionFailed as exc:
            raise SpamdError(Failure.UNREACHABLE, f"cannot connect to {where}: {_why(exc.__cause__ or exc)}") from None
        except (ClientTimeoutException, ServerTimeoutException, TimeoutError):
            raise SpamdError(Failure.TIMEOUT, f"{where}: no answer to {verb} within {seconds:.1f}s") from None
        except BadResponse as exc:
            answer = exc.args[0] if exc.args and isinstance(exc.args[0], bytes) else b""
            raise SpamdError(Failure.PROTOCOL, f"{where}: unreadable answer to {verb}: {answer[:200]!r}") from None
        except ResponseException as exc:
            raise SpamdError(Failure.REFUSED, f"{where}: {verb} answered {exc.code} {exc}") from None
        except OSError as exc:  # the connection dropped while sending or reading (TimeoutError is caught above)
            raise SpamdError(Failure.PROTOCOL, f"{where}: {verb} failed: {exc.strerror or exc}") from None
        finally:
            if manager.writer is not None and not manager.writer.is_closing():
                manager.writer.close()

    # --- the loop thread ---

    def _run(self, call: Callable[[float], Coroutine[Any, Any, T]], timeout: float | None) -> T:
        """``call(seconds)`` run in the loop, bounded by ``timeout`` (the settings' when None)."""
        seconds = self.settings.timeout if timeout is None else timeout
        future = asyncio.run_coroutine_threadsafe(self._bounded(call(seconds), seconds), self._running_loop())
        try:
            return future.result(seconds + LOOP_GRACE)
        except concurrent.futures.TimeoutError:
            future.cancel()  # the loop is stuck (it should have timed out by itself): do not wait for it
            raise SpamdError(Failure.TIMEOUT, f"{describe(self.address)}: no answer within {seconds:.1f}s") from None

    async def _bounded(self, coro: Coroutine[Any, Any, T], seconds: float) -> T:
        try:
            async with asyncio.timeout(seconds):
                return await coro
        except TimeoutError:
            raise SpamdError(Failure.TIMEOUT, f"{describe(self.address)}: no answer within {seconds:.1f}s") from None

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._pid != os.getpid():  # first use, or a forked child (no thread there)
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(target=self._loop.run_forever, name="spamd-client", daemon=True)
                self._thread.start()
                self._pid = os.getpid()
            return self._loop
