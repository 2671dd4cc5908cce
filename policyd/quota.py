"""Over-quota rejection at the border.

Sources: Dovecot's quota-status service (the standard way: we speak the same policy protocol to it, as
Postfix would, with the recipient's mailbox and the message size), and a file of over-quota users that a
site's own job writes (re-read when it changes). A full mailbox gets 452 4.2.2 (the sender retries; the
user may make room) or, if so configured, 552 5.2.2. The recipient is judged by the mailbox recipient
verification resolved it to (an alias by its target), when that check ran first.

When quota-status cannot be reached or answers nonsense, the check fails with BackendError("quota"): its
fail mode applies (DUNNO by default: a quota service outage must not stop mail).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from mailwarden.backend import BackendError
from mailwarden.decision import Action
from mailwarden.filewatch import FileWatch
from mailwarden.inline import bounded
from mailwarden.logs import get_logger, log_kv
from mailwarden.redis_pipe import PipelinedRedis
from mailwarden.section import Section
from mailwarden.units import Duration
from policyd import keys
from policyd.check import Check
from policyd.notify import compose, send_later
from policyd.request import PolicyRequest
from policyd.settings_types import check_template, listen_entry
from policyd.verdict import DEFER_MAILBOX_FULL, DUNNO, OK, PERMIT, REJECT_MAILBOX_FULL, Verdict, defer, reject
from policyd.whitelist import IPNetwork


class QuotaNotifySettings(Section):
    """At most one notice per interval to a user whose mail is being refused for a full mailbox."""

    relay: str | None = None
    """HOST:PORT of the SMTP server to send through, e.g. "127.0.0.1:25"; unset: no notices. The notice
    itself skips the quota check (sender = ``sender``, from a trusted network), so it can reach the full
    mailbox within the store's own grace (Dovecot's quota_grace)."""
    sender: str = "postmaster@localhost"
    interval: Duration = 86400
    subject: str = "Your mailbox is full: mail to you is being refused"
    text: str = (
        "Your mailbox {mailbox} is full. Mail sent to you is being refused (the senders are told to try\n"
        "again later) until you delete or archive some messages.\n"
    )
    """Subject and text are templates; placeholder: {mailbox}."""

    @field_validator("subject")
    @classmethod
    def _subject(cls, text: str) -> str:
        return check_template(text, {"mailbox"})

    @field_validator("text")
    @classmethod
    def _text(cls, text: str) -> str:
        return check_template(text, {"mailbox"}, one_line=False)

    @field_validator("relay")
    @classmethod
    def _relay(cls, relay: str | None) -> str | None:
        return relay if relay is None else listen_entry(relay)


class QuotaSettings(Section):
    """Over-quota rejection at the border: a recipient whose mailbox is full gets a temporary 452 4.2.2
    (or a permanent 552 5.2.2) at RCPT, instead of a bounce from the back end later."""

    sources: list[Literal["dovecot", "file"]] = ["dovecot"]
    dovecot: str = "127.0.0.1:12340"
    """Dovecot's quota-status service (``service quota-status { executable = quota-status -p postfix }``):
    HOST:PORT or unix:/path. Set its quota_status_success and quota_status_nouser to DUNNO."""
    file: Path | None = None
    """Over-quota users, one per line: ``address`` (over quota), or ``address used_bytes limit_bytes``
    (judged with the message size and the grace). Re-read when it changes."""
    grace_percent: Annotated[float, Field(ge=0, le=100)] = 0
    """For the file source: mail is still taken until usage passes the limit by this much."""
    permanent: bool = False
    """Answer 552 5.2.2 (the sender gives up) instead of 452 4.2.2 (the sender retries for days)."""
    timeout: Duration = 1.0
    text: str = "Mailbox is full"
    notify: QuotaNotifySettings = Field(default_factory=lambda: QuotaNotifySettings())

    @field_validator("dovecot")
    @classmethod
    def _address(cls, entry: str) -> str:
        return listen_entry(entry)

    def missing(self) -> str | None:
        if "file" in self.sources and self.file is None:
            return "quota.sources names file: set [policyd.quota] file"
        return None


log = get_logger("policyd.quota")

_NOT_FULL = (DUNNO, OK, PERMIT)
_NO_SUCH_USER = re.compile(r"5\.1\.1|unknown user|no such user|user unknown", re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Usage:
    used: int | None
    limit: int | None


class QuotaFile:
    """``address`` or ``address used_bytes limit_bytes`` per line; re-read when the file changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.watch = FileWatch([path])
        self.users: dict[str, Usage] = {}

    def refresh(self) -> None:
        """Re-read the file if it changed; one that cannot be read fails the check (its fail mode answers)."""
        if not self.watch.changed():
            return
        try:
            self.users = self.watch.read(self._read)
        except OSError as exc:
            raise BackendError(f"over-quota file {self.path}: {exc.strerror}", backend="quota") from None
        log_kv(log, logging.INFO, "over-quota file loaded", file=str(self.path), users=len(self.users))

    def _read(self) -> dict[str, Usage]:
        users: dict[str, Usage] = {}
        for number, raw in enumerate(self.path.read_text(errors="replace").splitlines(), start=1):
            fields = raw.split("#", 1)[0].split()
            if not fields:
                continue
            try:
                usage = Usage(int(fields[1]), int(fields[2])) if len(fields) >= 3 else Usage(None, None)
            except ValueError:
                log_kv(log, logging.WARNING, "over-quota file line ignored", file=str(self.path), line=number)
                continue
            users[fields[0].lower()] = usage
        return users

    def over(self, mailbox: str, size: int, grace_percent: float) -> bool:
        self.refresh()
        usage = self.users.get(mailbox)
        if usage is None:
            return False
        if usage.used is None or usage.limit is None:
            return True
        allowed = usage.limit * (1 + grace_percent / 100)
        return usage.used + size > allowed


class QuotaStatusClient:
    """Persistent connections to Dovecot's quota-status, reused one request at a time (as Postfix does):
    a new TCP connection per recipient cost quota-status more than the answer itself."""

    def __init__(self, address: str, timeout: float, keep: int = 8) -> None:
        self.address = address
        self.timeout = timeout
        self.keep = keep
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.address.startswith("unix:"):
            return await asyncio.open_unix_connection(self.address[5:])
        host, _, port = self.address.rpartition(":")
        return await asyncio.open_connection(host.strip("[]"), int(port))

    async def ask(self, mailbox: str, size: int) -> str:
        """The ``action=`` value quota-status gives for ``mailbox`` and a message of ``size`` bytes."""
        request = (f"request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n"
                   f"recipient={mailbox}\nsize={size}\n\n").encode()
        for attempt in range(2):  # a reused connection may have been closed by Dovecot meanwhile
            reused = bool(self.idle)
            try:
                answer = await bounded(self._exchange(request), self.timeout)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
                if reused and attempt == 0 and not isinstance(exc, TimeoutError):
                    continue
                raise BackendError(f"quota-status at {self.address}: {type(exc).__name__} {exc}".strip(),
                                   backend="quota") from None
            for line in answer.decode(errors="replace").splitlines():
                if line.startswith("action="):
                    return line[len("action="):].strip()
            raise BackendError(f"quota-status at {self.address} answered without an action", backend="quota")
        raise AssertionError("unreachable")

    async def _exchange(self, request: bytes) -> bytes:
        reader, writer = self.idle.pop() if self.idle else await self._open()
        try:
            writer.write(request)
            answer = await reader.readuntil(b"\n\n")
        except BaseException:
            writer.close()
            raise
        if len(self.idle) < self.keep:
            self.idle.append((reader, writer))
        else:
            writer.close()
        return answer

    def close(self) -> None:
        for _reader, writer in self.idle:
            writer.close()
        self.idle.clear()


class QuotaCheck(Check):
    name = "quota"
    dependency = "quota"

    def __init__(self, settings: QuotaSettings, trusted: Sequence[IPNetwork] = (),
                 redis_pipe: PipelinedRedis | None = None, prefix: str = "") -> None:
        self.settings = settings
        self.trusted = list(trusted)
        self.redis = redis_pipe
        self.prefix = prefix
        self.file = QuotaFile(settings.file) if settings.file is not None else None
        self.quota_status = QuotaStatusClient(settings.dovecot, settings.timeout)

    def stop(self) -> None:
        self.quota_status.close()

    async def on_rcpt(self, request: PolicyRequest) -> Verdict | None:
        mailboxes = request.mailboxes or (request.recipient.lower(),)
        if len(mailboxes) != 1 or "@" not in mailboxes[0]:
            return None  # an alias to several mailboxes is not refused because one of them is full
        mailbox = mailboxes[0]
        request.transaction.quota_mailboxes += (mailbox,)
        if self._is_our_notice(request):
            return Verdict.accept("our own over-quota notice")
        return await self._judge(mailbox, _size(request))

    async def on_eom(self, request: PolicyRequest) -> Verdict | None:
        """At END-OF-MESSAGE Postfix knows the real size, also when the client announced none: a message to
        one mailbox that does not fit is refused now (with several recipients, none is refused for one)."""
        mailboxes = request.transaction.quota_mailboxes
        if len(mailboxes) != 1 or request.recipient_count > 1 or self._is_our_notice(request):
            return None
        return await self._judge(mailboxes[0], _size(request))

    async def _judge(self, mailbox: str, size: int) -> Verdict | None:
        for source in self.settings.sources:
            if source == "file" and self.file is not None:
                if self.file.over(mailbox, size, self.settings.grace_percent):
                    full = not size or self.file.over(mailbox, 0, self.settings.grace_percent)
                    return await self._refuse(mailbox, "over-quota file", full, size)
            elif source == "dovecot":
                answer = await self.quota_status.ask(mailbox, size)
                if self._room(answer):
                    continue
                # full, or only too big for the room left? (only a full mailbox is worth a notice)
                full = not size or not self._room(await self.quota_status.ask(mailbox, 0))
                return await self._refuse(mailbox, f"quota-status: {answer}", full, size)
        return Verdict.accept(f"mailbox {mailbox} has room for {size} bytes") if size else None

    def _is_our_notice(self, request: PolicyRequest) -> bool:
        notify = self.settings.notify
        ip = request.client_ip
        return bool(notify.relay and request.sender.lower() == notify.sender.lower() and ip is not None
                    and any(ip.version == net.version and ip in net for net in self.trusted))

    async def _notify(self, mailbox: str) -> None:
        """One notice per mailbox and interval; the mark is set atomically, so several MX hosts send one."""
        notify = self.settings.notify
        if not notify.relay or self.redis is None:
            return
        mark = f"{self.prefix}{keys.QUOTA_NOTIFIED}{keys.digest(mailbox)}"
        try:
            first = await self.redis.ask("SET", mark, str(int(time.time())), "NX", "EX", int(notify.interval))
        except BackendError:
            return  # no notice rather than one per message
        if first:
            text = notify.text.format(mailbox=mailbox)
            subject = notify.subject.format(mailbox=mailbox)
            send_later(notify.relay, [compose(notify.sender, mailbox, subject, text)], "over-quota notice",
                       mailbox=mailbox)

    @staticmethod
    def _room(answer: str) -> bool:
        # quota_status_nouser left at Dovecot's default: "no such user" is no verdict
        return answer.upper().startswith(_NOT_FULL) or bool(_NO_SUCH_USER.search(answer))

    async def _refuse(self, mailbox: str, detail: str, full: bool, size: int) -> Verdict:
        if full:
            await self._notify(mailbox)
        if self.settings.permanent:
            action, reply = Action.REJECT, reject(self.settings.text, REJECT_MAILBOX_FULL)
        else:
            action, reply = Action.DEFER, defer(self.settings.text, DEFER_MAILBOX_FULL)
        what = "over quota" if full else f"has no room for {size} bytes"
        return Verdict.refuse(action, f"mailbox {mailbox} {what} ({detail})", reply)


def _size(request: PolicyRequest) -> int:
    try:
        return max(0, int(request.attrs.get("size") or 0))
    except ValueError:
        return 0
