"""The milter base: one instance per Postfix connection, the message spooled in bounded memory, the checks
run at end of message, per-recipient verdicts turned into one answer, one decision line per recipient.

Callbacks are negotiated to the minimum: no DATA or unknown-command callbacks, and no replies asked for
connect, HELO, MAIL, RCPT, the header fields or the body chunks (``@Milter.noreply``): each round trip costs
Postfix about 10 ms of wall time (../shared/PERF-NOTES.md), so only end of message waits for an answer.
(HELO is kept, without a reply, for the hop the spam check describes to spamd.)

Nothing is lost: a check that raises, a store that cannot commit, anything unexpected at end of message
answers 451 (Postfix keeps the message in the client's hands, who retries); a held message is committed
before Postfix is told to discard it or to drop that recipient.

Records of delivered mail (a verdict with ``record``: the SpamAssassin milter's tagged spam) are kept in
the same store write as the message's held copies, if any (one copy of the bytes; a failure is then a
failure to hold: 451). A message with nothing held is delivered whatever happens to its record: a store
that cannot keep it costs the record only, with a warning line (fail-open: the record is a convenience
for the digest, the message is the user's).
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import Milter

from mailwarden.decision import Action, Decision
from mailwarden.directory import DirectorySettings
from mailwarden.logs import DecisionLog, get_logger
from milters import metrics
from milters.check import HoldListener, Message, MessageCheck
from milters.mailbox import MailboxResolver
from milters.spool import Spool
from milters.verdict import (
    TEMPFAIL_SCANNER,
    TEMPFAIL_STORE,
    Fate,
    Reply,
    Resolution,
    Verdict,
    for_recipient,
    merge,
    resolve,
)

log = get_logger("milter")

ACTIONS = Milter.ADDHDRS | Milter.CHGHDRS | Milter.DELRCPT
"""The only message changes a mailwarden milter makes: add its headers, remove forged copies of them, and
remove held recipients."""

ACTION_OF_FATE = {Fate.ACCEPT: Action.ACCEPT, Fate.TAG: Action.TAG, Fate.QUARANTINE: Action.QUARANTINE,
                  Fate.REJECT: Action.REJECT, Fate.TEMPFAIL: Action.DEFER}


class HoldFailed(Exception):
    """The store could not commit a held message: the milter answers 451 and the client retries."""


@dataclass(frozen=True, slots=True)
class HeldCopy:
    """What the milter asks the store to keep: the message (with the held-only headers in front) and, for
    each held recipient, the verdict that held it; for each delivered recipient to record (state
    ``delivered``), its verdict."""

    message: Message
    raw: BinaryIO
    size: int
    holds: dict[str, Verdict]
    mailboxes: dict[str, str]
    recorded: dict[str, Verdict] = field(default_factory=dict)


class Holder(Protocol):
    """The quarantine store as the milter sees it; ``hold`` returns once the copy is committed (one public
    id per held recipient, in order, then one per recorded one) and raises HoldFailed otherwise."""

    def hold(self, copy: HeldCopy) -> list[str]: ...

    def close(self) -> None: ...


def strip_brackets(address: str) -> str:
    address = address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address


@dataclass
class MilterApp:
    """What every connection of one milter process shares."""

    name: str
    checks: Sequence[MessageCheck]
    decisions: DecisionLog
    holder: Holder | None = None
    spool_memory: int = 1 << 20
    mailboxes: MailboxResolver = field(default_factory=lambda: MailboxResolver(DirectorySettings(), 0))
    """Whose mailbox each recipient's held mail is filed under (by default, the address without its
    +extension)."""
    owned_headers: frozenset[str] = field(init=False)
    """Lower-case names of the headers our checks set: incoming copies are removed before delivery, so a
    sender cannot forge a verdict."""
    owned_prefixes: tuple[str, ...] = field(init=False)
    """Lower-case name prefixes a check owns whole (``x-spam-``): every incoming header so named is removed."""

    def __post_init__(self) -> None:
        self.owned_headers = frozenset(name.lower() for check in self.checks
                                       for name in getattr(check, "owned_headers", ()))
        self.owned_prefixes = tuple(prefix.lower() for check in self.checks
                                    for prefix in getattr(check, "owned_header_prefixes", ()))

    def owns(self, header: str) -> bool:
        """Whether an incoming header of this (lower-case) name is one of ours, to be removed."""
        return header in self.owned_headers or header.startswith(self.owned_prefixes)

    def close(self) -> None:
        for check in self.checks:
            try:
                check.close()
            except Exception:
                log.exception("closing a check failed", extra={"kv": {"check": check.name}})
        if self.holder is not None:
            self.holder.close()
        self.mailboxes.close()


class PrefixedReader(io.RawIOBase):
    """Bytes ``prefix`` followed by the rest of ``body``, read once (the held copy's own headers in front of
    the spooled message), without copying the message."""

    def __init__(self, prefix: bytes, body: BinaryIO) -> None:
        self._prefix = memoryview(prefix)
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._prefix:
            n = min(len(buffer), len(self._prefix))
            buffer[:n] = self._prefix[:n]
            self._prefix = self._prefix[n:]
            return n
        data = self._body.read(len(buffer))
        buffer[:len(data)] = data
        return len(data)


class MessageMilter(Milter.Base):
    """One Postfix connection. libmilter calls it from several threads in turn, never two at once, so the
    per-message state lives here (never in thread-locals)."""

    def __init__(self, app: MilterApp) -> None:
        self.app = app
        self.client_address = ""
        self.client_name = ""
        self.helo = ""
        self.message: Message | None = None
        self.owned_seen: dict[str, int] = {}

    # --- callbacks ---------------------------------------------------------------------------------

    @Milter.noreply
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        self.client_address = hostaddr[0] if isinstance(hostaddr, tuple) else str(hostaddr or "")
        self.client_name = hostname or ""
        return Milter.CONTINUE

    @Milter.noreply
    def envfrom(self, sender: str, *params: str) -> int:
        self._discard_message()
        self.message = Message(queue_id="", client_address=self.client_address, client_name=self.client_name,
                               helo=self.helo, sender=strip_brackets(sender), recipients=[],
                               auth_user=self.getsymval("{auth_authen}") or "",
                               spool=Spool(self.app.spool_memory), mta_name=self.getsymval("j") or "")
        self.owned_seen = {}
        return Milter.CONTINUE

    @Milter.noreply
    def envrcpt(self, recipient: str, *params: str) -> int:
        if self.message is not None:
            self.message.recipients.append(strip_brackets(recipient))
        return Milter.CONTINUE

    @Milter.noreply
    @Milter.decode("bytes")
    def header(self, name: str, value: bytes) -> int:
        message = self.message
        if message is None:
            return Milter.CONTINUE
        # Postfix sends continuation lines joined by bare LF; the spool keeps the message in wire form
        raw = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        message.spool.write(name.encode("ascii", "surrogateescape") + b": " + raw + b"\r\n")
        message.headers.append((name, raw.decode("utf-8", "surrogateescape")))
        lowered = name.lower()
        if self.app.owns(lowered):
            self.owned_seen[lowered] = self.owned_seen.get(lowered, 0) + 1
        return Milter.CONTINUE

    @Milter.noreply
    def eoh(self) -> int:
        if self.message is not None:
            self.message.spool.write(b"\r\n")
        return Milter.CONTINUE

    @Milter.noreply
    def body(self, chunk: bytes) -> int:
        if self.message is not None:
            self.message.spool.write(chunk)
        return Milter.CONTINUE

    def eom(self) -> int:
        message = self.message
        if message is None:  # Postfix never skips MAIL; answer safely all the same
            return Milter.TEMPFAIL
        started = time.monotonic()
        message.queue_id = self.getsymval("i") or ""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("end of message", extra={"kv": {"milter": self.app.name, "queue_id": message.queue_id,
                                                      "size": message.spool.size}})
        kept: dict[str, str] = {}
        try:
            verdicts = self._run_checks(message)
            resolution = resolve(message.recipients, verdicts)
            kept = self._keep(message, resolution)
            result = self._answer(resolution)
            self._tell_hold_listeners(message, kept, resolution, verdicts)
        except HoldFailed as exc:
            resolution = Resolution(Fate.TEMPFAIL, TEMPFAIL_STORE)
            self._log_failure(message, "the quarantine store could not keep the message", exc)
            verdicts, kept = {}, {}
            result = self._answer(resolution)
        except Exception as exc:  # a bug must not lose mail: the client retries
            resolution = Resolution(Fate.TEMPFAIL, TEMPFAIL_SCANNER)
            self._log_failure(message, "end of message failed", exc, traceback=True)
            verdicts, kept = {}, {}
            result = self._answer(resolution)
        self._record(message, verdicts, resolution, kept, time.monotonic() - started)
        self._discard_message()
        return result

    def abort(self) -> int:
        self._discard_message()
        return Milter.CONTINUE

    def close(self) -> int:
        self._discard_message()
        return Milter.CONTINUE

    @Milter.noreply
    def hello(self, hostname: str) -> int:
        self.helo = hostname or ""
        return Milter.CONTINUE

    @Milter.nocallback
    def data(self) -> int:
        return Milter.CONTINUE

    @Milter.nocallback
    def unknown(self, command: str) -> int:
        return Milter.CONTINUE

    # --- end of message ----------------------------------------------------------------------------

    def _run_checks(self, message: Message) -> dict[str, Verdict | None]:
        """Every check in order, merged per recipient; stops early once every recipient is rejected."""
        merged: dict[str, Verdict | None] = dict.fromkeys(message.recipients)
        for check in self.app.checks:
            started = time.monotonic()
            result = check.check(message)
            metrics.CHECK_SECONDS.labels(self.app.name, check.name).observe(time.monotonic() - started)
            for rcpt in message.recipients:
                merged[rcpt] = merge(merged[rcpt], for_recipient(result, rcpt))
            if all(v is not None and v.fate is Fate.REJECT for v in merged.values()):
                break
        return merged

    def _tell_hold_listeners(self, message: Message, kept: dict[str, str], resolution: Resolution,
                             verdicts: dict[str, Verdict | None]) -> None:
        held = {rcpt: public_id for rcpt, public_id in kept.items() if rcpt in resolution.held}
        if not held:
            return
        for check in self.app.checks:
            if isinstance(check, HoldListener):
                try:
                    check.after_hold(message, held, verdicts)
                except Exception as exc:  # the message is held and answered: only the link is lost
                    log.warning("after-hold hook failed", exc_info=exc,
                                extra={"kv": {"milter": self.app.name, "check": check.name,
                                              "queue_id": message.queue_id or "-", "error": str(exc)}})

    def _keep(self, message: Message, resolution: Resolution) -> dict[str, str]:
        """Commit the held recipients' copy, and the records of delivered ones, in one store write; the
        public id of each recipient kept. Raises HoldFailed when a held copy could not be committed; a
        record alone that cannot be kept is skipped with a warning (``_record_delivered``)."""
        held = resolution.held if resolution.fate in (Fate.ACCEPT, Fate.QUARANTINE) else {}
        recorded = resolution.recorded if resolution.fate is Fate.ACCEPT else {}
        if not held:
            return self._record_delivered(message, recorded) if recorded else {}
        if self.app.holder is None:
            raise HoldFailed("no quarantine store is configured for this milter")
        ids = self.app.holder.hold(self._copy(message, held, recorded))
        return dict(zip([*held, *recorded], ids, strict=False))

    def _record_delivered(self, message: Message, recorded: dict[str, Verdict]) -> dict[str, str]:
        """Records of a message delivered to every recipient: never at its cost. Whatever fails (the store,
        or a bug here), the message goes on, with a warning line and the skipped records counted."""
        try:
            if self.app.holder is None:
                raise HoldFailed("no quarantine store is configured for this milter")
            ids = self.app.holder.hold(self._copy(message, {}, recorded))
            return dict(zip(recorded, ids, strict=False))
        except Exception as exc:
            metrics.RECORDS_SKIPPED.labels(self.app.name, type(exc).__name__).inc()
            log.warning("record of delivered mail skipped: the quarantine store could not keep it; the message "
                        "is delivered", exc_info=None if isinstance(exc, HoldFailed) else exc,
                        extra={"kv": {"milter": self.app.name, "queue_id": message.queue_id or "-",
                                      "recipients": ",".join(recorded), "error": str(exc)}})
            return {}

    def _copy(self, message: Message, held: dict[str, Verdict], recorded: dict[str, Verdict]) -> HeldCopy:
        """The copy the store keeps: the verdicts' held-only headers in front of the message as received."""
        headers = _unique(header for verdict in [*held.values(), *recorded.values()]
                          for header in verdict.held_headers)
        prefix = b"".join(f"{name}: {value}\r\n".encode() for name, value in headers)
        return HeldCopy(message, io.BufferedReader(PrefixedReader(prefix, message.spool.reader())),
                        message.spool.size + len(prefix), held,
                        {rcpt: self.app.mailboxes(rcpt) for rcpt in [*held, *recorded]}, recorded)

    def _answer(self, resolution: Resolution) -> int:
        if resolution.fate in (Fate.REJECT, Fate.TEMPFAIL):
            self._reply(resolution.reply or TEMPFAIL_SCANNER)
            return Milter.REJECT if resolution.fate is Fate.REJECT else Milter.TEMPFAIL
        if resolution.fate is Fate.QUARANTINE:
            return Milter.DISCARD  # every recipient held, and the copy committed
        for rcpt in resolution.held:
            self.delrcpt(f"<{rcpt}>")
        for name, count in self.owned_seen.items():
            for index in range(count, 0, -1):
                self.chgheader(name, index, "")
        for name, value in resolution.headers:
            self.addheader(name, value)
        if resolution.subject_tag and self.message is not None:
            self._tag_subject(self.message, resolution.subject_tag)
        return Milter.ACCEPT

    def _tag_subject(self, message: Message, tag: str) -> None:
        """``tag`` in front of the first Subject (once: a reply to tagged mail keeps a single tag)."""
        subject = message.header("Subject")
        if subject is None:
            self.addheader("Subject", tag)
        elif not subject.lstrip().startswith(tag):
            self.chgheader("Subject", 1, f"{tag} {subject.lstrip()}")

    def _reply(self, reply: Reply) -> None:
        self.setreply(reply.code, reply.status, reply.text.replace("%", "%%"))

    # --- logging -----------------------------------------------------------------------------------

    def _record(self, message: Message, verdicts: dict[str, Verdict | None], resolution: Resolution,
                kept: dict[str, str], seconds: float) -> None:
        """One decision line per recipient, and the metrics."""
        app = self.app
        reply = f"{resolution.reply.code} {resolution.reply.status} {resolution.reply.text}" \
            if resolution.reply and resolution.fate in (Fate.REJECT, Fate.TEMPFAIL) else ""
        for rcpt in message.recipients:
            verdict = verdicts.get(rcpt)
            if resolution.fate in (Fate.REJECT, Fate.TEMPFAIL):
                action = ACTION_OF_FATE[resolution.fate]
            elif rcpt in resolution.held:
                action = Action.QUARANTINE
            else:
                action = ACTION_OF_FATE[verdict.fate] if verdict else Action.ACCEPT
            extra: dict[str, object] = {"milter": app.name, "size": message.spool.size}
            if verdict is not None and verdict.kind:
                extra["kind"] = verdict.kind
            if rcpt in resolution.held:
                extra["held_id"] = kept.get(rcpt, "")
            elif rcpt in resolution.recorded and resolution.fate is Fate.ACCEPT:
                extra["recorded_id"] = kept.get(rcpt, "skipped")
            if verdict is not None:
                extra.update(verdict.log_fields)
            app.decisions.emit(Decision(
                service="milter", stage="eom", check=verdict.check if verdict else "",
                action=action, reason=verdict.reason if verdict else "no check decided",
                seconds=seconds, queue_id=message.queue_id, client=message.client_address,
                sender=message.sender, recipient=rcpt, user=message.auth_user, reply=reply,
                extra=extra).logfmt())
            metrics.DECISIONS.labels(app.name, verdict.check if verdict else "", action.value).inc()
        metrics.MESSAGE_SECONDS.labels(app.name).observe(seconds)
        metrics.MESSAGE_BYTES.labels(app.name).observe(message.spool.size)

    def _log_failure(self, message: Message, what: str, exc: BaseException, traceback: bool = False) -> None:
        metrics.FAILURES.labels(self.app.name, type(exc).__name__).inc()
        log.log(logging.ERROR, f"{what}; answered 451", exc_info=exc if traceback else None,
                extra={"kv": {"milter": self.app.name, "queue_id": message.queue_id or "-", "error": str(exc)}})

    def _discard_message(self) -> None:
        if self.message is not None:
            self.message.spool.close()
            self.message = None


def _unique(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each header once, in order: recipients held (or recorded) for different reasons share one copy, and
    the check gives them the same held-only headers."""
    seen: list[tuple[str, str]] = []
    for header in headers:
        if header not in seen:
            seen.append(header)
    return seen


def install(app: MilterApp) -> None:
    """Make libmilter create a MessageMilter of ``app`` for each Postfix connection. pymilter keeps the
    factory in a module global; this is the one place that sets it, once per process (the actions are
    declared when the socket is bound: runner.bind)."""
    Milter.factory = lambda: MessageMilter(app)

