"""Release: the original bytes, unchanged (DKIM signatures still verify), re-injected over SMTP with the
original envelope sender to the one recipient the row was held for, through a Postfix listener that skips
the milters and the policy service (``[quarantine] reinject``; README, "Quarantine", gives its master.cf
lines).

Exactly once, even when two releases of one id race (two admins, the digest reply and the CLI): each
claims the row first with a conditional update held -> releasing, and only the one that won sends. After
the listener's 250 the row becomes released, with who, when and the queue id of the new copy; if sending
fails the row goes back to held and the caller gets a ReleaseError saying why.

Messages of a kind in ``ADMIN_ONLY_KINDS`` (a virus) are released only with ``admin=True``. A row in state
``delivered`` (tagged spam the recipient already got) is not held: release refuses it, as it refuses a
message released already.
"""

from __future__ import annotations

import contextlib
import logging
import re
import smtplib
from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import BinaryIO

from mailwarden.logs import get_logger, log_kv
from quarantine.models import State
from quarantine.store import QuarantineSettings, QuarantineStore, StoreError, UnknownMessage, split_host_port

log = get_logger("quarantine.release")

ADMIN_ONLY_KINDS = frozenset({"virus", "phish"})

SECURITY_KINDS = frozenset({"phish"})
"""Held for the security team, not for the recipient (the message that snagged its sender, phishhook): never
listed in a recipient's digest, released only by an admin."""
"""Kinds released only by an admin who says so (``release --admin``)."""
QUEUED_AS = re.compile(rb"queued as ([0-9A-Za-z]+)")
"""Postfix's 250 reply to the end of data: ``250 2.0.0 Ok: queued as 4ZbQ3x5yQ7z9``."""
SEND_BUFFER = 1 << 16


class Failure(StrEnum):
    UNKNOWN = "unknown"
    """No such id."""
    NOT_HELD = "not_held"
    """Released, being released, deleted or expired already; or never held (delivered, reported)."""
    ADMIN_ONLY = "admin_only"
    """A virus: needs ``admin=True``."""
    SEND = "send"
    """The re-injection listener could not be reached or refused it; the row is held again."""
    OUTCOME_UNKNOWN = "outcome_unknown"
    """The whole message was sent but the listener's reply never came: it may have been queued, so the row
    stays releasing (purge holds it again after an hour, with a warning)."""
    STORE = "store"
    """The store failed (its message says what)."""


class DeliveryUnknown(Exception):
    """The end of data was sent, and the connection failed before the reply: Postfix may have queued it."""


class ReleaseError(Exception):
    def __init__(self, message: str, failure: Failure) -> None:
        super().__init__(message)
        self.failure = failure


@dataclass(frozen=True)
class Released:
    public_id: str
    recipient: str
    sender: str
    queue_id: str
    """The queue id Postfix gave the re-injected copy ("" if its reply named none)."""
    by: str


def release(store: QuarantineStore, public_id: str, by: str, *, admin: bool = False) -> Released:
    """Re-inject the message held as ``public_id`` to its recipient; raises ReleaseError."""
    try:
        return _release(store, public_id, by, admin)
    except StoreError as exc:
        raise ReleaseError(str(exc), Failure.STORE) from None


def _release(store: QuarantineStore, public_id: str, by: str, admin: bool) -> Released:
    record = store.get(public_id)
    if record is None:
        raise ReleaseError(f"no quarantined message {public_id}", Failure.UNKNOWN)
    if record.kind.lower() in ADMIN_ONLY_KINDS and not admin:
        raise ReleaseError(f"{public_id} was held as {record.kind} ({record.reason}): only an admin releases it, "
                           "with --admin", Failure.ADMIN_ONLY)
    if record.state in (State.DELIVERED, State.REPORTED):
        raise ReleaseError(f"{public_id} is not held: it was delivered to {record.recipient} (tagged, "
                           f"{record.reason}); nothing to release", Failure.NOT_HELD)
    if not store.transition(public_id, [State.HELD], State.RELEASING, by):
        now = store.get(public_id)
        state = f"{now.state} by {now.state_by or '?'} at {now.state_at:%Y-%m-%d %H:%M:%S} UTC" if now else "gone"
        raise ReleaseError(f"{public_id} is not held (it is {state}): not released again", Failure.NOT_HELD)
    try:
        with store.open_raw(public_id) as raw:
            queue_id = reinject(store.settings, record.sender, record.recipient, raw)
    except DeliveryUnknown as exc:
        log_kv(log, logging.WARNING, "release outcome unknown", id=public_id, recipient=record.recipient, by=by,
               error=str(exc))
        raise ReleaseError(f"{public_id}: the whole message was sent to the re-injection listener but its reply "
                           f"never came ({exc}): it may have been queued, so it stays 'releasing' (see the "
                           "listener's log; purge holds it again after an hour)", Failure.OUTCOME_UNKNOWN) from None
    except (OSError, smtplib.SMTPException, UnknownMessage, StoreError) as exc:
        why = _describe(exc)
        try:
            store.transition(public_id, [State.RELEASING], State.HELD, by)
        except StoreError as again:
            raise ReleaseError(f"cannot release {public_id}: {why}; and it could not be put back to held "
                               f"({again}): it stays 'releasing'", Failure.STORE) from None
        log_kv(log, logging.WARNING, "release failed", id=public_id, recipient=record.recipient, by=by, error=why)
        failure = Failure.STORE if isinstance(exc, StoreError | UnknownMessage) else Failure.SEND
        raise ReleaseError(f"cannot release {public_id}: {why}; it stays held", failure) from None
    delivered = f"{public_id} was re-injected (queue id {queue_id or 'not given'})"
    try:
        marked = store.transition(public_id, [State.RELEASING], State.RELEASED, by, released_queue_id=queue_id)
    except StoreError as exc:
        raise ReleaseError(f"{delivered} but could not be marked released ({exc}): it stays 'releasing', and "
                           "purge holds it again after an hour; do not release it again", Failure.STORE) from None
    if not marked:
        raise ReleaseError(f"{delivered} but its row was changed meanwhile: not marked released", Failure.STORE)
    log_kv(log, logging.INFO, "released", id=public_id, queue_id=record.queue_id, recipient=record.recipient,
           sender=record.sender, by=by, released_queue_id=queue_id)
    return Released(public_id, record.recipient, record.sender, queue_id, by)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, smtplib.SMTPResponseException):
        error: bytes | str = exc.smtp_error
        text = error.decode("utf-8", "replace") if isinstance(error, bytes) else str(error)
        return f"the re-injection listener answered {exc.smtp_code} {text}"
    if isinstance(exc, smtplib.SMTPRecipientsRefused):
        [(code, reply)] = exc.recipients.values()
        return f"the re-injection listener refused the recipient: {code} {reply.decode('utf-8', 'replace')}"
    if isinstance(exc, OSError):
        return f"cannot re-inject through the listener ([quarantine] reinject): {exc.strerror or exc}"
    if isinstance(exc, smtplib.SMTPException):
        return f"re-injection failed: {exc}"
    return str(exc)


def reinject(settings: QuarantineSettings, sender: str, recipient: str, raw: BinaryIO) -> str:
    """Send ``raw`` from ``sender`` to ``recipient`` through the listener at ``settings.reinject``,
    streamed (a 50 MB message is never whole in memory); returns the queue id of the 250 reply ("" if
    none). Raises OSError or smtplib.SMTPException (not sent), or DeliveryUnknown."""
    host, port = split_host_port(settings.reinject)
    with contextlib.closing(smtplib.SMTP(host, port, timeout=settings.reinject_timeout)) as smtp:
        smtp.ehlo_or_helo_if_needed()
        options: list[str] = []
        if smtp.has_extn("8bitmime"):
            options.append("BODY=8BITMIME")
        if not (sender + recipient).isascii():
            if not smtp.has_extn("smtputf8"):
                raise smtplib.SMTPNotSupportedError("non-ASCII addresses and the listener offers no SMTPUTF8")
            options.append("SMTPUTF8")
        code, text = smtp.mail(sender, options)
        if code != 250:
            raise smtplib.SMTPSenderRefused(code, text, sender)
        code, text = smtp.rcpt(recipient)
        if code not in (250, 251):
            raise smtplib.SMTPRecipientsRefused({recipient: (code, text)})
        smtp.putcmd("data")
        code, text = smtp.getreply()
        if code != 354:
            raise smtplib.SMTPDataError(code, text)
        for block in dot_stuffed(raw):
            smtp.send(block)
        try:
            code, text = smtp.getreply()
        except (OSError, smtplib.SMTPServerDisconnected) as exc:
            raise DeliveryUnknown(str(exc) or type(exc).__name__) from exc
        if code != 250:
            raise smtplib.SMTPDataError(code, text)
        # delivered: whatever happens to the QUIT (smtplib's __exit__ would raise on a reset) changes nothing
        with contextlib.suppress(OSError, smtplib.SMTPException):
            smtp.quit()
    match = QUEUED_AS.search(text)
    return match.group(1).decode("ascii") if match else ""


def dot_stuffed(raw: BinaryIO, size: int = SEND_BUFFER) -> Iterator[bytes]:
    """The DATA payload in blocks of about ``size`` bytes: lines ending in CRLF (a bare LF or CR becomes
    CRLF, as smtplib does), a dot doubled at the start of a line, and the final ``.`` line."""
    out = bytearray()
    at_line_start = True
    pending_cr = False  # a CR ended the previous piece: a LF starting this one completes it
    while piece := raw.readline(size):
        if pending_cr:
            pending_cr = False
            if piece.startswith(b"\n"):
                piece = piece[1:]
                if not piece:
                    continue
        if piece.endswith(b"\r"):
            pending_cr = True
        lines = re.sub(rb"\r\n|\r(?!\n)|\n", b"\r\n", piece)
        if at_line_start and lines.startswith(b"."):
            out += b"."
        out += lines.replace(b"\r\n.", b"\r\n..")
        at_line_start = lines.endswith(b"\r\n")
        if len(out) >= size:
            yield bytes(out)
            out.clear()
    if not at_line_start:
        out += b"\r\n"
    out += b".\r\n"
    yield bytes(out)
