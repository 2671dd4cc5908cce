"""ClamAV: the message streamed to clamd (INSTREAM) at end of data, and clamd's answer made a verdict.

What clamd says falls in one of four classes, each with its own fate in ``[milters.clamav]``:

- a signature name (``Win.Test.EICAR_HDB-1``, a local ``….UNOFFICIAL``): ``virus``, rejected by default;
- ``Heuristics.*`` and ``PUA.*`` (an encrypted archive, a phishing heuristic, a packer): ``heuristic``,
  tagged by default, since these are guesses that hit legitimate mail too;
- ``Heuristics.Limits.Exceeded.*`` (clamd's MaxFileSize, MaxScanSize ...: only with ``AlertExceedsMax yes``
  in clamd.conf; without it clamd answers OK for what it skipped, so set it), and a
  message larger than ``stream_max_length``, of which only the first ``stream_max_length`` bytes are sent
  (clamd's own StreamMaxLength closes a longer stream): ``limits``, tagged by default and never passed as
  clean. A signature found in the part that was sent still makes it a virus;
- no answer (clamd down, reloading, hung, an ERROR reply): retried once after ``retry_pause``, then the
  fail mode: ``on_error_inbound`` (tempfail by default: the sender retries, nothing goes through
  unscanned) or ``on_error_submission`` for authenticated clients (accept by default, tagged Unscanned:
  a user's own mail is not held up by a scanner outage). Each failure is logged (throttled) with the
  clamd address and the error, and counted (``mailwarden_milter_scanner_errors_total{check="clamav"}``).

Headers on delivered mail (the milter base strips incoming copies of both, ``owned_headers``)::

    X-Virus-Scanned: ClamAV 1.4.6/27481 via mailwarden      (clamd's VERSION without the date; cached)
    X-Virus-Status: Clean
    X-Virus-Status: Infected                                 (a virus tagged or accepted by config)
    X-Virus-Status: Infected (heuristic)
    X-Virus-Status: Unscanned (scan limits exceeded)         (clamd's limits heuristics)
    X-Virus-Status: Unscanned (larger than the scanner's limit)
    X-Virus-Status: Unscanned (scanner unavailable)          (fail mode accept; no X-Virus-Scanned then)

Delivered mail never carries the signature name (it may be forwarded outside); the quarantined copy does
(``held_headers``: ``X-Virus-Status: Infected (Win.Test.EICAR_HDB-1)``), the verdict's ``reason`` does (log,
quarantine record), the SMTP reply never does (``REJECT_VIRUS``).

Time: each attempt may take ``scan_timeout + timeout_per_mb * MB sent``: the stream is cut when that time
is up, and each wait on clamd's socket is bounded by it. Worst case for one message: two attempts and the
pause; keep it below Postfix's ``milter_content_timeout`` (300 s; 111 s with the defaults and 25 MB).

Threads: ``check`` runs in several libmilter worker threads at once. Each call opens its own connection
(milters/clamd_client.py: 64 KB chunks, the connect bounded too); the cached version string is replaced
whole, never mutated. When clamd closes a stream that exceeds its StreamMaxLength, its refusal is read
when it can be (limits), else the broken connection counts as a failure with a hint in the log: set
``stream_max_length`` no higher than clamd's StreamMaxLength.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import ClassVar, Literal

from pydantic import field_validator

from mailwarden.logs import Throttled, get_logger
from mailwarden.units import Duration, Size
from milters import clamd_client
from milters.check import Message
from milters.metrics import SCANNER_ERRORS
from milters.settings import ErrorFate, MilterSettings
from milters.spool import Spool
from milters.verdict import REJECT_CONTENT, REJECT_VIRUS, TEMPFAIL_SCANNER, Fate, Reply, Verdict

FindingFate = Literal["reject", "quarantine", "tag", "accept"]


class ClamavSettings(MilterSettings):
    """``[milters.clamav]``: the ClamAV milter process (``mailwarden milter clamav``) and its scan."""

    listen: str = "inet:127.0.0.1:10030"
    checks: list[str] = ["banned", "clamav"]
    clamd: str = "unix:/run/clamav/clamd.ctl"
    """clamd's address: ``unix:/PATH`` (Debian's clamav-daemon: /run/clamav/clamd.ctl) or ``inet:HOST:PORT``
    (IPv4 or a host name: the clamd client speaks IPv4 only)."""
    stream_max_length: Size = 25 << 20
    """At most this much of a message is sent to clamd; a longer one is scanned in part and classed
    ``limits``. Must not exceed clamd's StreamMaxLength: 25M in Debian's clamd.conf (debconf), 100M when
    clamd.conf does not set it (ClamAV 1.4's built-in default)."""
    scan_timeout: Duration = 30
    """Time for one scan of an empty message; ``timeout_per_mb`` is added per MB sent."""
    timeout_per_mb: Duration = 1
    pass_descriptor: bool = True
    """With clamd on a unix socket, a message spooled to disk (above ``[milters] spool_memory``) is handed
    to clamd as an open file (FILDES) instead of streamed: clamd reads it itself, whole (no
    stream_max_length; clamd's MaxScanSize and friends apply), without a copy through the socket."""
    retry_pause: Duration = 1
    """After a failed attempt (clamd reloading its signatures, restarting), wait this long and try once more."""
    virus: FindingFate = "reject"
    heuristic: FindingFate = "tag"
    """Heuristics.* and PUA.* findings."""
    limits: FindingFate = "tag"
    """clamd's Heuristics.Limits.Exceeded.* findings, and messages larger than stream_max_length."""
    on_error_inbound: ErrorFate = "tempfail"
    """When clamd cannot answer (after the retry) for mail from unauthenticated clients."""
    on_error_submission: ErrorFate = "accept"
    """The same for SASL-authenticated clients; accepted mail is tagged ``Unscanned (scanner unavailable)``."""

    @field_validator("clamd")
    @classmethod
    def _clamd(cls, address: str) -> str:
        clamd_address(address)
        return address

    @field_validator("stream_max_length")
    @classmethod
    def _stream_max_length(cls, size: int) -> int:
        if size < 1024:
            raise ValueError("stream_max_length below 1KB leaves nothing to scan")
        return size


_ADDRESS = re.compile(r"^(?:unix:(?P<path>/\S+)|inet:(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*):(?P<port>\d{1,5}))$")


def clamd_address(address: str) -> str | tuple[str, int]:
    """The socket path of ``unix:/PATH``, or ``(host, port)`` of ``inet:HOST:PORT``."""
    match = _ADDRESS.match(address)
    if match is None:
        if address.startswith("inet:["):
            raise ValueError(f"{address!r}: the clamd client speaks IPv4 only; use an IPv4 address, a host name "
                             "or a unix socket")
        raise ValueError(f"{address!r}: expected unix:/PATH or inet:HOST:PORT")
    if match["path"]:
        return match["path"]
    port = int(match["port"])
    if not 0 < port < 65536:
        raise ValueError(f"{address!r}: port {port} out of range 1-65535")
    return match["host"], port


class Finding(StrEnum):
    CLEAN = "clean"
    VIRUS = "virus"
    HEURISTIC = "heuristic"
    LIMITS = "limits"


def classify(name: str) -> Finding:
    """The class of a name clamd reported as FOUND."""
    if name == "Heuristics.Limits.Exceeded" or name.startswith("Heuristics.Limits."):
        return Finding.LIMITS
    if name.startswith(("Heuristics.", "PUA.")):
        return Finding.HEURISTIC
    return Finding.VIRUS


X_VIRUS_SCANNED = "X-Virus-Scanned"
X_VIRUS_STATUS = "X-Virus-Status"
CLEAN = "Clean"
INFECTED = "Infected"
INFECTED_HEURISTIC = "Infected (heuristic)"
UNSCANNED_LIMITS = "Unscanned (scan limits exceeded)"
UNSCANNED_TOO_LARGE = "Unscanned (larger than the scanner's limit)"
UNSCANNED_UNAVAILABLE = "Unscanned (scanner unavailable)"
VERSION_REFRESH = 600.0
"""Seconds between two VERSION requests (and after any failure: clamd may have been upgraded)."""
MB = 1 << 20

log = get_logger("milters.clamav")


class ScanFailed(Exception):
    """clamd gave no usable answer; the message says why, for the log."""


@dataclass(frozen=True)
class Scan:
    """One answer of clamd: the class and the name it reported (empty when clean)."""

    finding: Finding
    name: str = ""
    clamd_limit: bool = False
    """clamd refused the stream as longer than its StreamMaxLength (BufferTooLongError)."""


class ClamavCheck:
    """The ``clamav`` milter check (milters.check.MessageCheck)."""

    name = "clamav"
    owned_headers: ClassVar[tuple[str, ...]] = (X_VIRUS_SCANNED, X_VIRUS_STATUS)

    def __init__(self, settings: ClamavSettings, *, now: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.settings = settings
        self._address = clamd_address(settings.clamd)
        self._now = now
        self._sleep = sleep
        self._version: tuple[float, str] | None = None
        """(when fetched, clamd's VERSION without the date); replaced whole, so threads need no lock."""
        self._log_lock = threading.Lock()
        self._failures = Throttled(log, logging.WARNING, "clamd scan failed", interval=60)
        self._too_long = Throttled(log, logging.WARNING, "clamd refused a stream as longer than its StreamMaxLength: "
                                   "set stream_max_length no higher than clamd's StreamMaxLength", interval=600)

    def check(self, message: Message) -> Verdict:
        size = message.spool.size
        whole = self._by_descriptor(message.spool)
        send = size if whole else min(size, self.settings.stream_max_length)
        budget = self.settings.scan_timeout + self.settings.timeout_per_mb * send / MB
        error = ""
        for attempt in (1, 2):
            if attempt == 2:
                self._sleep(self.settings.retry_pause)
            try:
                scan = self.scan(message.spool, send, budget)
            except ScanFailed as exc:
                error = str(exc)
                SCANNER_ERRORS.labels(self.name).inc()
                self._refresh_version()  # clamd may come back upgraded
                fail_mode = self._fail_mode(message) if attempt == 2 else "retry"
                with self._log_lock:
                    self._failures.hit(self.settings.clamd, clamd=self.settings.clamd, error=error, attempt=attempt,
                                       then=fail_mode, queue_id=message.queue_id, size=size)
                continue
            if scan.clamd_limit:
                with self._log_lock:
                    self._too_long.hit(self.settings.clamd, clamd=self.settings.clamd, size=size,
                                       stream_max_length=self.settings.stream_max_length)
            return self._verdict(scan, truncated=size > send, sent=send)
        return self._unscanned(message, error)

    def scan(self, spool: Spool, send: int, budget: float) -> Scan:
        """One INSTREAM of the first ``send`` bytes of ``spool``, within ``budget`` seconds (connect, every
        send and the wait for the answer); or, for a spool on disk and clamd on a unix socket, the file
        handed over whole (FILDES, ``pass_descriptor``)."""
        if self._by_descriptor(spool):
            assert isinstance(self._address, str)
            try:
                status, name = clamd_client.fildes(self._address, spool.fileno(), self._now() + budget, self._now)
            except clamd_client.ClamdError as exc:
                raise ScanFailed(f"{exc} (file handed over)") from None
            return Scan(Finding.CLEAN) if status == "OK" else Scan(classify(name), name)
        sent = 0

        def chunks() -> Iterator[bytes]:
            nonlocal sent
            reader = spool.reader()
            while sent < send and (data := reader.read(min(clamd_client.CHUNK, send - sent))):
                sent += len(data)
                yield data

        try:
            status, name = clamd_client.instream(self._address, chunks(), self._now() + budget, self._now)
        except clamd_client.StreamTooLong:
            return Scan(Finding.LIMITS, clamd_limit=True)
        except clamd_client.ClamdError as exc:
            hint = (" (is stream_max_length above clamd's StreamMaxLength?)"
                    if "closed the connection while" in str(exc) else "")
            raise ScanFailed(f"{exc} ({sent} of {send} bytes sent){hint}") from None
        if status == "OK":
            return Scan(Finding.CLEAN)
        return Scan(classify(name), name)

    def _by_descriptor(self, spool: Spool) -> bool:
        """Whether clamd gets the spool's file rather than a stream: it is on disk, clamd on a unix socket."""
        return self.settings.pass_descriptor and isinstance(self._address, str) and spool.on_disk

    def scanned_by(self) -> str:
        """``X-Virus-Scanned``: clamd's version (engine/database, without the date), fetched at most once per
        VERSION_REFRESH."""
        cached = self._version
        if cached is not None and self._now() - cached[0] < VERSION_REFRESH:
            return cached[1]
        try:
            answer = clamd_client.command(self._address, "VERSION", min(self.settings.scan_timeout, 5.0))
            version = "/".join(answer.split("/")[:2])
        except clamd_client.ClamdError:
            version = cached[1] if cached else "ClamAV"
        version = re.sub(r"[^\x20-\x7e]", "", version).strip() or "ClamAV"
        self._version = (self._now(), version)
        return version

    def _refresh_version(self) -> None:
        """Ask VERSION again after the next answer, keeping the old string in case that fails."""
        cached = self._version
        if cached is not None:
            self._version = (float("-inf"), cached[1])

    def close(self) -> None:
        with self._log_lock:
            self._failures.flush()
            self._too_long.flush()

    def _fail_mode(self, message: Message) -> ErrorFate:
        return self.settings.on_error_submission if message.authenticated else self.settings.on_error_inbound

    def _verdict(self, scan: Scan, truncated: bool, sent: int) -> Verdict:
        scanned = None if scan.clamd_limit else (X_VIRUS_SCANNED, f"{self.scanned_by()} via mailwarden")
        if scan.finding is Finding.VIRUS:
            return self._finding(Fate(self.settings.virus), "virus", scan.name, INFECTED,
                                 f"{INFECTED} ({scan.name})", REJECT_VIRUS, scanned)
        if truncated or scan.clamd_limit:
            reason = (f"larger than the scanner's limit; first {sent} bytes scanned" if truncated
                      else "larger than clamd's StreamMaxLength; not scanned")
            found = f"; {scan.name}" if scan.name else ""
            limits = self._finding(Fate(self.settings.limits), "limits", reason + found, UNSCANNED_TOO_LARGE,
                                   f"Unscanned ({reason})", REJECT_CONTENT, scanned)
            if scan.finding is not Finding.HEURISTIC:
                return limits
            heuristic = self._heuristic(scan, scanned)
            return heuristic if heuristic.severity > limits.severity else limits
        if scan.finding is Finding.HEURISTIC:
            return self._heuristic(scan, scanned)
        if scan.finding is Finding.LIMITS:
            return self._finding(Fate(self.settings.limits), "limits", scan.name, UNSCANNED_LIMITS,
                                 f"Unscanned ({scan.name})", REJECT_CONTENT, scanned)
        assert scanned is not None
        return Verdict(Fate.ACCEPT, self.name, "clean", headers=(scanned, (X_VIRUS_STATUS, CLEAN)))

    def _heuristic(self, scan: Scan, scanned: tuple[str, str] | None) -> Verdict:
        return self._finding(Fate(self.settings.heuristic), "heuristic", scan.name, INFECTED_HEURISTIC,
                             f"{INFECTED} ({scan.name})", REJECT_VIRUS, scanned)

    def _finding(self, fate: Fate, kind: str, reason: str, status: str, held_status: str, reply: Reply,
                 scanned: tuple[str, str] | None) -> Verdict:
        """``scanned`` (X-Virus-Scanned) is None when clamd read nothing of the message."""
        first = (scanned,) if scanned else ()
        return Verdict(fate, self.name, reason, kind=kind, headers=(*first, (X_VIRUS_STATUS, status)),
                       held_headers=(*first, (X_VIRUS_STATUS, held_status)), reply=reply)

    def _unscanned(self, message: Message, error: str) -> Verdict:
        reason = f"scanner unavailable: {error}"
        if self._fail_mode(message) == "tempfail":
            return Verdict(Fate.TEMPFAIL, self.name, reason, kind="unscanned", reply=TEMPFAIL_SCANNER)
        return Verdict(Fate.ACCEPT, self.name, reason, kind="unscanned",
                       headers=((X_VIRUS_STATUS, UNSCANNED_UNAVAILABLE),))
