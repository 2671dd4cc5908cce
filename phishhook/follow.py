"""Login events from Dovecot's and Postfix's logs, for sites whose Dovecot cannot use the auth policy
endpoint and whose Postfix runs no phish milter: ``mailwarden phish follow`` reads the journal
(``journalctl -f -o json``) or follows log files as ``tail -F`` does, and gives each login to the detector.

What is read (Debian 12: Dovecot 2.3.19 and Postfix 3.7, their default log formats):

- Dovecot's login processes (``imap-login``, ``pop3-login``, ``submission-login``, ``managesieve-login``;
  the service is the part before ``-login``), through syslog (``dovecot: imap-login: Login: ...``) or
  Dovecot's own log file (``imap-login: Info: Login: ...``), with the default ``login_log_format_elements``
  (``user=<%u> method=%m rip=%r lip=%l mpid=%e %c session=<%{session}>``).
  ``Login: user=<alice>, method=PLAIN, rip=203.0.113.5, ...`` is a successful login.
  ``Disconnected: Connection closed (auth failed, 3 attempts in 12 secs): user=<alice>, ...`` (2.3; the
  reason before the parenthesis varies) and ``Aborted login (auth failed, ...)`` or
  ``Disconnected (auth failed, ...)`` (2.2) are N failed logins, one event per attempt, all against the
  last name tried in that connection (the only one Dovecot logs). The other endings (``(user disabled)``,
  ``(auth process communication failure)``, ``(authorization failed, ...)``, ...) are not wrong passwords
  and are not counted. The ``auth:`` process's own lines (``auth_verbose``) are not read: they would
  count the same attempts twice.
- Postfix's smtpd under its syslog name (``postfix/smtpd``, ``postfix/submission/smtpd`` as Debian's
  master.cf names it, a ``postmulti`` instance's ``postfix-out/smtpd``; the service is the middle part,
  ``smtp`` without one).
  ``4F2A21234: client=host.example[203.0.113.5], sasl_method=PLAIN, sasl_username=alice`` is a successful
  login. Postfix logs it when the client starts a message, so a session that authenticates and sends
  nothing is not seen, and each message of a session is one login.
  ``warning: unknown[203.0.113.5]: SASL LOGIN authentication failed: UGFzc3dvcmQ6, sasl_username=alice``
  is a failed one. Postfix 3.7.8 and later append ``sasl_username`` (``(unavailable)`` when the SASL
  server did not name the account); a failure without a name gives no event: the brute-force signal is
  counted per login name (and address), and a LoginEvent cannot be made without one. Failures that are
  the SASL server's trouble rather than a wrong password (``Connection lost to authentication server``,
  Cyrus's ``generic failure`` ...) are not counted either.

Trust: anyone on the host can send syslog a line that looks like Dovecot's (``logger -t dovecot``), and a
forged login from far away snags the account; prefer the journal, where ``journalctl -u`` selects by the
unit, a field journald sets itself, and keep log files readable only by their writers. Fields a client
chooses (the login name) are parsed so that they cannot move the address or the count: Dovecot's address
is the last ``rip=`` of the line (after the name), its count comes from the text before the name, and the
name of a Postfix failure is the text after the first ``, sasl_username=`` (Postfix writes the name last).

Times: a line's own time stamp (RFC 3339 as Debian 12's rsyslog writes; ``Dec  2 06:19:13`` as
traditional syslog and ``journalctl`` write; ``2026-12-02 06:19:13`` as Dovecot's log file can), local
time when it names no zone; the year a traditional stamp leaves out is the one that puts it closest to
now. No stamp, or one that cannot be read: now. A stamp ahead of now counts as now (the clocks differ; a
login cannot come from the future).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, BinaryIO

import click
from pydantic import Field, ValidationError

from mailwarden.cli import EX_UNAVAILABLE, CliContext, fail, start_logging
from mailwarden.logs import get_logger, log_kv
from mailwarden.section import Section
from mailwarden.units import Duration
from phishhook.events import BadEvent, LoginEvent, normalise_address, normalise_service, normalise_user

log = get_logger("phishhook")

MAX_LINE = 8192
"""Characters (or bytes, for files) of a log line; a longer one is no login line and is skipped whole."""
MAX_JOURNAL_LINE = 65536
"""Bytes of one ``journalctl -o json`` entry (every field of the entry, not only its message)."""
MAX_ATTEMPTS = 100
"""Failed attempts one Dovecot line may count for (Dovecot disconnects long before; a larger number is
not a real line)."""
READ_BUDGET = 1 << 20
"""Bytes read from one file in one round before the other files get their turn (bounds the memory of a
round after a long pause)."""


class FollowSettings(Section):
    """``mailwarden phish follow``: where the logins are read from."""

    units: Annotated[list[str], Field(min_length=1)] = Field(default_factory=lambda: ["dovecot", "postfix@-"])
    """systemd units whose journal is read with ``--journal`` (Debian 12: ``dovecot`` and ``postfix@-``)."""
    poll: Annotated[Duration, Field(gt=0)] = 1.0
    """Seconds between two looks at the log files when nothing new was there (default 1s)."""
    state_file: str = ""
    """A small JSON file where the read position of each log file is kept, so that a restart goes on where
    the last run stopped; "" (default): start at the end of each file, as ``tail -F`` does."""


class FollowError(Exception):
    """The logs cannot be read (journalctl missing or ended): the message says what to do."""


# --- lines -------------------------------------------------------------------------------------------------

_MONTHS = {name: number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
_STAMP = (r"(?P<iso>\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:?\d\d)?)"
          r"|(?P<month>" + "|".join(_MONTHS) + r") {1,2}(?P<day>\d{1,2}) (?P<clock>\d\d:\d\d:\d\d)(?:\.\d{1,9})?")
_LINE = re.compile(
    rf"(?:(?:{_STAMP})\s+)?"                        # time stamp (missing in a file of bare messages)
    r"(?:(?P<host>[^\s:\[\]]+)\s+)?"                 # host (missing in Dovecot's own log file)
    r"(?P<ident>[^\s:\[\]]+)(?:\[\d{1,10}\])?: "     # syslog identifier and pid
    r"(?P<message>.*)")

_LOGIN_PROCESS = re.compile(r"(?P<service>[a-z0-9]{1,32})-login")
_DOVECOT_PREFIX = re.compile(r"(?P<process>[a-z0-9]{1,32}-login): ")
_AUTH_FAILED = re.compile(r"\(auth failed, (?P<attempts>\d{1,9}) attempts in \d{1,9} secs\): $")
_RIP = re.compile(r", rip=(?P<address>[0-9A-Fa-f:.]{1,64})(?=, |$)")
_METHOD = re.compile(r", method=[A-Za-z0-9_-]{0,40}$")
_SESSION = re.compile(r", session=<(?P<session>[^<>\s]{0,64})>")

_POSTFIX_SMTPD = re.compile(r"postfix[A-Za-z0-9_.-]{0,32}(?:/(?P<service>[A-Za-z0-9_.-]{1,32}))?/smtpd")
_CLIENT = re.compile(
    r"(?P<queue>[0-9A-Za-z]{1,32}): client=[^\s\[\],]*\[(?P<address>[^\]\s]{1,64})\](?::\d{1,5})?"
    r", sasl_method=(?P<method>[^,\s]{0,100}), sasl_username=(?P<user>.*?)"
    r"(?:, (?:sasl_sender|orig_queue_id|orig_client)=.*)?")
_SASL_FAILED = re.compile(
    r"warning: [^\s\[\]]*\[(?P<address>[^\]\s]{1,64})\](?::\d{1,5})?: "
    r"SASL (?P<method>\S{1,100}) authentication failed: (?P<rest>.*)")
_JOURNAL_IDENT = re.compile(r"[^\s:\[\]]{1,64}")
_SASL_USERNAME = ", sasl_username="
_NO_USERNAME = "(unavailable)"
_SERVER_TROUBLE = (
    # Postfix's Dovecot client (src/xsasl/xsasl_dovecot_server.c): the auth server, not the password.
    "Connection lost to authentication server", "Can't connect to authentication server",
    "Authentication backend error",
    # Cyrus SASL's temporary failures (src/xsasl/xsasl_cyrus_server.c: SASL_FAIL, NOMEM, TRYAGAIN, UNAVAIL).
    "generic failure", "no memory available", "transient failure", "service unavailable")


def parse_line(line: str, now: float, tz: datetime.tzinfo | None = None) -> list[LoginEvent]:
    """The logins in one syslog, journal or Dovecot log-file line: one event for a successful login, one
    per attempt for a failed one, none for anything else (other lines, junk, a line longer than
    ``MAX_LINE``, a login whose name or address cannot be an account's). ``tz``: the zone of stamps that
    name none (None: this machine's)."""
    if not isinstance(line, str) or len(line) > MAX_LINE:
        return []
    match = _LINE.fullmatch(line.rstrip("\r\n"))
    if match is None:
        return []
    return _parse_message(match["ident"], match["message"], _stamp_time(match, now, tz))


def parse_journal_entry(entry: Mapping[str, Any], now: float) -> list[LoginEvent]:
    """The logins in one ``journalctl -o json`` entry: its ``SYSLOG_IDENTIFIER`` and ``MESSAGE`` read as
    ``parse_line`` reads a line's (a field may be a string, or a list of byte values when it is not
    UTF-8), at its ``__REALTIME_TIMESTAMP`` (microseconds; now when missing or ahead of now)."""
    if not isinstance(entry, Mapping):
        return []
    ident, message = _journal_text(entry.get("SYSLOG_IDENTIFIER")), _journal_text(entry.get("MESSAGE"))
    if ident is None or message is None or not _JOURNAL_IDENT.fullmatch(ident):
        return []
    return _parse_message(ident, message, _journal_time(entry.get("__REALTIME_TIMESTAMP"), now))


def _parse_message(ident: str, message: str, at: float) -> list[LoginEvent]:
    """The one parser of a message, whichever way it came (a text line or a journal entry)."""
    if "\n" in message or "\r" in message or not _encodable(ident) or not _encodable(message):
        return []
    if ident == "dovecot":  # syslog: "dovecot: imap-login: Login: ..."
        prefix = _DOVECOT_PREFIX.match(message)
        if prefix is None:
            return []
        process, message = prefix["process"], message[prefix.end():]
    else:  # Dovecot's own log file: "imap-login: Info: Login: ..."
        process = ident
    login = _LOGIN_PROCESS.fullmatch(process)
    if login is not None:
        return _dovecot(login["service"], message.removeprefix("Info: "), at)
    smtpd = _POSTFIX_SMTPD.fullmatch(ident)
    if smtpd is not None:
        return _postfix(smtpd["service"] or "smtp", message, at)
    return []


def _encodable(text: str) -> bool:
    """False for text with lone surrogates (JSON can carry them): no login name, and Redis could not store it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _dovecot(service: str, text: str, at: float) -> list[LoginEvent]:
    start = text.find("user=<")
    if start < 0:
        return []
    reason = text[:start]
    if reason == "Login: ":
        success, attempts = True, 1
    else:
        failed = _AUTH_FAILED.search(reason)
        if failed is None:
            return []
        success, attempts = False, min(int(failed["attempts"]), MAX_ATTEMPTS)
    fields = text[start:]
    # the last one: the name before it may contain ", rip="
    rip = max(_RIP.finditer(fields), key=lambda found: found.start(), default=None)
    if rip is None:
        return []
    name = _METHOD.sub("", fields[len("user=<"):rip.start()])
    if not name.endswith(">"):
        return []
    sessions = _SESSION.findall(fields, rip.end())
    return _events(name[:-1], rip["address"], at, success, service, sessions[-1] if sessions else "", attempts)


def _postfix(service: str, text: str, at: float) -> list[LoginEvent]:
    client = _CLIENT.fullmatch(text)
    if client is not None:
        return _events(client["user"], client["address"], at, True, service, client["queue"], 1)
    failed = _SASL_FAILED.fullmatch(text)
    if failed is None:
        return []
    reason, found, user = failed["rest"].partition(_SASL_USERNAME)
    if not found or user == _NO_USERNAME or reason.startswith(_SERVER_TROUBLE):
        return []
    return _events(user, failed["address"], at, False, service, "", 1)


def _events(user: str, address: str, at: float, success: bool, service: str, session: str,
            attempts: int) -> list[LoginEvent]:
    try:
        event = LoginEvent(user=normalise_user(user), address=normalise_address(address), at=at, success=success,
                           service=normalise_service(service), via="log", session=session[:64])
    except BadEvent:
        return []
    return [event] * attempts


def _stamp_time(match: re.Match[str], now: float, tz: datetime.tzinfo | None) -> float:
    try:
        if match["iso"]:
            moment = datetime.datetime.fromisoformat(match["iso"])
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=tz) if tz is not None else moment
            return min(moment.timestamp(), now)
        if match["month"]:
            return min(_closest_year(_MONTHS[match["month"]], int(match["day"]), match["clock"], now, tz), now)
    except (ValueError, OverflowError, OSError):
        pass
    return now


def _closest_year(month: int, day: int, clock: str, now: float, tz: datetime.tzinfo | None) -> float:
    """A traditional syslog stamp (no year) in the year that puts it closest to ``now``: ``Dec 31 23:59:59``
    read just after New Year is last year's. ValueError when no year has that date."""
    hour, minute, second = (int(part) for part in clock.split(":"))
    year = datetime.datetime.fromtimestamp(now, tz).year
    candidates = []
    for candidate in (year - 1, year, year + 1):
        try:
            candidates.append(datetime.datetime(candidate, month, day, hour, minute, second, tzinfo=tz).timestamp())
        except ValueError:  # 29 February of a year without one, or 31 June
            continue
    if not candidates:
        raise ValueError("no such date")
    return min(candidates, key=lambda moment: abs(moment - now))


def _journal_text(value: object) -> str | None:
    """A journal field as text: a string, or a list of byte values (journalctl's form for a field that is
    not UTF-8); None for anything else (a field logged twice comes as a list of values: not a login line)."""
    if isinstance(value, str):
        return value if len(value) <= MAX_LINE else None
    if isinstance(value, list) and len(value) <= MAX_LINE * 4:
        try:
            raw = bytes(value)
        except (TypeError, ValueError):
            return None
        text = raw.decode("utf-8", "replace")
        return text if len(text) <= MAX_LINE else None
    return None


def _journal_time(value: object, now: float) -> float:
    if isinstance(value, str) and value.isdigit() and len(value) <= 20:
        return min(int(value) / 1e6, now)
    return now


# --- files ---------------------------------------------------------------------------------------------


class _Tail:
    """One followed file: the open file, how far it was read, and the incomplete line at its end."""

    def __init__(self, path: str, max_line: int) -> None:
        self.path = path
        self.max_line = max_line
        self.file: BinaryIO | None = None
        self.identity: tuple[int, int] | None = None
        """(st_dev, st_ino) of the open file: a different one at ``path`` means it was rotated."""
        self.position = 0
        """Bytes of the open file read so far."""
        self.line_start = 0
        """Where the line being read began (after the last newline): the position a restart goes on from."""
        self.pending = bytearray()
        self.skipping = False
        """Inside a line longer than ``max_line``: its bytes are dropped up to its newline."""
        self.complained = ""

    def open(self, start: int | None) -> bool:
        """Open ``path`` at byte ``start`` (None: at its end); False when it cannot be opened (yet)."""
        try:
            handle: BinaryIO = open(self.path, "rb", buffering=0)  # noqa: SIM115 (kept open while followed)
        except OSError as exc:
            self._complain(exc.strerror or str(exc))
            return False
        st = os.fstat(handle.fileno())
        if not stat.S_ISREG(st.st_mode):
            handle.close()
            self._complain("not a regular file")
            return False
        self.position = st.st_size if start is None else min(start, st.st_size)
        handle.seek(self.position)
        self.file, self.identity, self.line_start = handle, (st.st_dev, st.st_ino), self.position
        self.pending.clear()
        self.skipping, self.complained = False, ""
        return True

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def _complain(self, why: str) -> None:
        if why != self.complained and why != "No such file or directory":
            log_kv(log, logging.WARNING, "cannot read log file", path=self.path, error=why)
        self.complained = why

    def read(self, out: list[str], budget: int) -> bool:
        """Complete lines into ``out``, up to the end of the file (False) or ``budget`` bytes (True: more may
        be waiting); a file found truncated or replaced at the end is read again, or the new one."""
        for _ in range(3):  # this file; after a truncation or a rotation, the file again or the new one
            if self.file is None and not self.open(0):  # a file that appears after the start is new: all of it
                return False
            budget = self._read_to_end(out, budget)
            if budget <= 0:
                return True
            if not self._replaced(out):
                return False
        return True

    def _read_to_end(self, out: list[str], budget: int) -> int:
        assert self.file is not None
        while budget > 0 and (chunk := self.file.read(min(65536, budget))):
            self._take(chunk, out)
            budget -= len(chunk)
        return budget

    def _replaced(self, out: list[str]) -> bool:
        """At the end of the file: whether it shrank (read it again from its start) or another file took its
        path (the old one closed, its unfinished last line given as a line)."""
        assert self.file is not None
        if os.fstat(self.file.fileno()).st_size < self.position:
            log_kv(log, logging.INFO, "log file truncated: reading it from the start", path=self.path)
            self.file.seek(0)
            self.position = self.line_start = 0
            self.pending.clear()
            self.skipping = False
            return True
        try:
            st = os.stat(self.path)
        except OSError:  # renamed away and not yet replaced: keep reading the old file
            return False
        if (st.st_dev, st.st_ino) == self.identity:
            return False
        log_kv(log, logging.INFO, "log file rotated: reading the new one", path=self.path)
        if self.pending and not self.skipping:  # the old file's last line will not be finished
            out.append(_text(self.pending))
        self.close()
        return True

    def _take(self, chunk: bytes, out: list[str]) -> None:
        base, start = self.position, 0
        while (newline := chunk.find(b"\n", start)) >= 0:
            if not self.skipping and len(self.pending) + newline - start <= self.max_line:
                self.pending += chunk[start:newline]
                out.append(_text(self.pending))
            elif not self.skipping:
                log_kv(log, logging.DEBUG, "overlong log line skipped", path=self.path)
            self.pending.clear()
            self.skipping = False
            start = newline + 1
            self.line_start = base + start
        rest = len(chunk) - start
        if not self.skipping and len(self.pending) + rest > self.max_line:
            log_kv(log, logging.DEBUG, "overlong log line skipped", path=self.path)
            self.pending.clear()
            self.skipping = True
        elif not self.skipping:
            self.pending += chunk[start:]
        self.position = base + len(chunk)


def _text(raw: bytes | bytearray) -> str:
    return raw.decode("utf-8", "replace").removesuffix("\r")


class FileFollower:
    """Follows log files as ``tail -F`` does: from their end as they are when it is made (or from the
    position kept in ``state_file``), complete lines only; a file replaced at its path (a new inode, as
    logrotate's rename and create make) is read to its end and the new one from its start; a file that
    shrank (``copytruncate``) is read again from its start; a file missing at the start is read from its
    start when it appears. A line longer than ``max_line`` bytes is skipped without being held whole."""

    def __init__(self, paths: Iterable[str | os.PathLike[str]], *, poll: float = 1.0, state_file: str = "",
                 from_start: bool = False, sleep: Callable[[float], object] = time.sleep,
                 max_line: int = MAX_LINE, read_budget: int = READ_BUDGET) -> None:
        self.poll_interval = poll
        self.state_file = state_file
        self.sleep = sleep
        self.read_budget = read_budget
        self.tails = [_Tail(os.fspath(path), max_line) for path in paths]
        saved = self._load_state()
        for tail in self.tails:
            tail.open(0 if from_start else self._start(tail.path, saved.get(tail.path)))

    def poll(self) -> list[str]:
        """One look at every file: the complete lines that arrived since the last."""
        return self._round()[0]

    def lines(self, stop: Callable[[], bool] = lambda: False) -> Generator[str, None, None]:
        """Lines as they arrive, until ``stop()`` says so (asked before each look at the files); the
        position is saved whenever the files are read to their end, and when the generator is closed."""
        try:
            while not stop():
                got, more = self._round()
                yield from got
                if not more:
                    if got:
                        self.save_state()
                    self.sleep(self.poll_interval)
        finally:
            self.close()

    def close(self) -> None:
        self.save_state()
        for tail in self.tails:
            tail.close()

    def _round(self) -> tuple[list[str], bool]:
        out: list[str] = []
        more = False
        for tail in self.tails:
            more = tail.read(out, self.read_budget) or more
        return out, more

    # --- the state file: {"files": {path: {"device": n, "inode": n, "offset": n}}} -------------------------

    def _start(self, path: str, saved: object) -> int | None:
        """Where to start reading ``path``: its end (None), unless the state file knows it."""
        if not isinstance(saved, dict):
            return None
        numbers = (saved.get("device"), saved.get("inode"), saved.get("offset"))
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            return None
        device, inode, offset = numbers
        try:
            st = os.stat(path)
        except OSError:
            return 0
        if (device, inode) != (st.st_dev, st.st_ino):
            return 0  # rotated while we were away: the file at the path is a newer one
        assert isinstance(offset, int)
        return offset if offset <= st.st_size else 0  # shorter: truncated while we were away

    def _load_state(self) -> dict[str, object]:
        if not self.state_file:
            return {}
        try:
            with open(self.state_file, encoding="utf-8") as handle:
                data = json.load(handle)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log_kv(log, logging.WARNING, "state file unreadable: following from the end of each file",
                   path=self.state_file, error=str(exc))
            return {}
        files = data.get("files") if isinstance(data, dict) else None
        return files if isinstance(files, dict) else {}

    def save_state(self) -> None:
        if not self.state_file:
            return
        files = {tail.path: {"device": tail.identity[0], "inode": tail.identity[1], "offset": tail.line_start}
                 for tail in self.tails if tail.identity is not None}
        temporary = f"{self.state_file}.tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as handle:
                json.dump({"files": files}, handle)
            os.replace(temporary, self.state_file)
        except OSError as exc:
            log_kv(log, logging.WARNING, "cannot save the read positions", path=self.state_file,
                   error=exc.strerror or str(exc))


# --- the journal ---------------------------------------------------------------------------------------


def journal_lines(units: Sequence[str], *, journalctl: str = "journalctl") -> Generator[dict[str, Any], None, None]:
    """The journal entries of ``units`` from now on, as ``journalctl -f -o json -n 0`` prints them (one
    JSON object a line; junk and entries over ``MAX_JOURNAL_LINE`` bytes skipped). Runs until journalctl
    ends (FollowError) or the generator is closed (journalctl is stopped then)."""
    for unit in units:
        if not unit or unit.startswith("-") or any(char.isspace() or ord(char) < 32 for char in unit):
            raise FollowError(f"unit {unit!r}: not a systemd unit name")
    argv = [journalctl, "-f", "-o", "json", "-n", "0", *(f"--unit={unit}" for unit in units)]
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    except OSError as exc:
        raise FollowError(f"cannot run {journalctl}: {exc.strerror or exc} (is systemd installed?)") from None
    assert process.stdout is not None
    try:
        while line := process.stdout.readline(MAX_JOURNAL_LINE + 1):
            if not line.endswith(b"\n") and len(line) > MAX_JOURNAL_LINE:
                while (rest := process.stdout.readline(MAX_JOURNAL_LINE)) and not rest.endswith(b"\n"):
                    pass  # the rest of an overlong entry
                continue
            try:
                entry = json.loads(line)
            except (ValueError, RecursionError):
                continue
            if isinstance(entry, dict):
                yield entry
        status = process.wait()
        raise FollowError(f"journalctl ended with status {status}: may this user read the journal "
                          "(group systemd-journal or adm)?")
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        process.stdout.close()


# --- to the detector ------------------------------------------------------------------------------------


@dataclass
class Delivered:
    """What ``deliver`` did with the events it was given."""

    logins: int = 0
    failures: int = 0
    stale: int = 0
    """Older than the login history keeps (a saved position far behind): not judged."""
    errors: int = 0
    """Lost to a backend error (logged)."""
    by_error: dict[str, int] = field(default_factory=dict)


def deliver(events: Iterable[LoginEvent], login: Callable[[LoginEvent], object],
            failed_login: Callable[[LoginEvent], object], oldest: Callable[[], float],
            errors: tuple[type[Exception], ...] = (), done: Delivered | None = None) -> Delivered:
    """Give each event to ``login`` (a success) or ``failed_login``; an event older than ``oldest()`` is
    skipped, and one that raises one of ``errors`` (Redis down) is logged and lost, the rest go on.
    Counted in ``done`` as they go (so a run stopped by a signal still knows what it did)."""
    done = done if done is not None else Delivered()
    for event in events:
        if event.at < oldest():
            done.stale += 1
            continue
        try:
            (login if event.success else failed_login)(event)
        except errors as exc:
            done.errors += 1
            name = type(exc).__name__
            done.by_error[name] = done.by_error.get(name, 0) + 1
            log_kv(log, logging.ERROR, "login from the logs lost", user=event.user, address=event.address,
                   success=event.success, error=f"{name}: {exc}")
            continue
        if event.success:
            done.logins += 1
        else:
            done.failures += 1
    return done


def events_from_lines(lines: Iterable[str], now: Callable[[], float],
                      tz: datetime.tzinfo | None = None) -> Iterator[LoginEvent]:
    for line in lines:
        yield from parse_line(line, now(), tz)


def events_from_journal(entries: Iterable[Mapping[str, Any]], now: Callable[[], float]) -> Iterator[LoginEvent]:
    for entry in entries:
        yield from parse_journal_entry(entry, now())


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """SIGTERM ends the command as Ctrl-C does: generators closed (journalctl stopped, positions saved)."""

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command("follow")
@click.argument("files", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--journal", is_flag=True, help="Read the systemd journal (journalctl -f) instead of FILEs.")
@click.option("--unit", "units", multiple=True, metavar="UNIT",
              help="A unit whose journal to read (repeatable; default dovecot and postfix@-).")
@click.option("--state", "state_file", metavar="FILE", default="",
              help="Keep the read position of each FILE here, to go on from it after a restart.")
@click.option("--poll", default="1s", show_default=True, help="Time between two looks at FILEs.")
@click.pass_obj
def follow_command(ctx: CliContext, files: tuple[str, ...], journal: bool, units: tuple[str, ...],
                   state_file: str, poll: str) -> None:
    """Give the logins in Dovecot's and Postfix's logs to the detector until SIGTERM: for sites whose
    Dovecot does not use the auth policy endpoint, or whose Postfix runs no phish milter."""
    if journal == bool(files):
        fail("give log FILEs or --journal, one of the two", 2)
    if not journal and units:
        fail("--unit goes with --journal", 2)
    if journal and state_file:
        fail("--state goes with FILEs (the journal is read from now on)", 2)
    try:
        settings = FollowSettings.model_validate({"poll": poll, "state_file": state_file,
                                                  **({"units": list(units)} if units else {})})
    except ValidationError as exc:
        fail("; ".join(f"--{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()), 2)

    import redis

    from phishhook.cli import detector_for
    from quarantine.store import StoreError

    start_logging(ctx.load())
    with detector_for(ctx) as detector:
        now = detector.now
        done = Delivered()
        try:
            with _stop_on_sigterm():
                if journal:
                    source: Generator[Any, None, None] = journal_lines(settings.units)
                    events = events_from_journal(source, now)
                else:
                    source = FileFollower(files, poll=settings.poll, state_file=settings.state_file).lines()
                    events = events_from_lines(source, now)
                log_kv(log, logging.INFO, "following logins in the logs",
                       source=",".join(settings.units) if journal else ",".join(files))
                with contextlib.closing(source):
                    deliver(events, detector.login, detector.failed_login,
                            lambda: now() - detector.settings.history.ttl, (redis.RedisError, StoreError), done)
        except FollowError as exc:
            fail(str(exc), EX_UNAVAILABLE)
        finally:
            log_kv(log, logging.INFO, "stopped following", logins=done.logins, failures=done.failures,
                   stale=done.stale, errors=done.errors)
