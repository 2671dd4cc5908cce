"""The milter's side of the quarantine: a held copy becomes a committed row per held recipient (and a row
in state ``delivered`` per recorded one), or a HoldFailed (the milter answers 451 and the sender retries,
unless only records were asked for: milters/base.py)."""

from __future__ import annotations

import email.header
import logging
from datetime import UTC, datetime

from mailwarden.logs import get_logger, log_kv
from milters.base import HeldCopy, HoldFailed
from quarantine.models import State
from quarantine.store import HeldEnvelope, Hold, QuarantineSettings, QuarantineStore, SchemaBehind, StoreError

log = get_logger("milter")


def decoded(value: str | None) -> str:
    """A header value for people (the CLI, later the digest): RFC 2047 words decoded, folding undone; the
    raw value when it cannot be decoded."""
    if not value:
        return ""
    unfolded = " ".join(value.split())
    try:
        return str(email.header.make_header(email.header.decode_header(unfolded)))
    except (ValueError, LookupError, UnicodeError):
        return unfolded


class StoreHolder:
    def __init__(self, store: QuarantineStore) -> None:
        self.store = store

    @classmethod
    def open(cls, settings: QuarantineSettings) -> StoreHolder:
        """The store, checked now: a database behind this version's schema stops start-up (SchemaBehind,
        "run mailwarden quarantine migrate"); one that cannot be reached only warns, since mail that is not
        held flows without it and what must be held gets 451 until it is back."""
        store = QuarantineStore(settings)
        try:
            store.check()
        except SchemaBehind:
            store.close()
            raise
        except StoreError as exc:
            log_kv(log, logging.WARNING, "quarantine store unavailable at start-up; messages to hold get 451 "
                   "until it answers", error=str(exc))
        return cls(store)

    def hold(self, copy: HeldCopy) -> list[str]:
        message = copy.message
        envelope = HeldEnvelope(
            queue_id=message.queue_id, sender=message.sender, client_address=message.client_address,
            auth_user=message.auth_user, header_from=decoded(message.header("From")),
            subject=decoded(message.header("Subject")), date=decoded(message.header("Date")),
            received_at=datetime.now(UTC))
        holds = [Hold(recipient=rcpt, mailbox=copy.mailboxes[rcpt], check=verdict.check, kind=verdict.kind,
                      reason=verdict.reason, state=state)
                 for verdicts, state in ((copy.holds, State.HELD), (copy.recorded, State.DELIVERED))
                 for rcpt, verdict in verdicts.items()]
        try:
            return self.store.hold(copy.raw, copy.size, envelope, holds)
        except StoreError as exc:
            raise HoldFailed(str(exc)) from exc

    def close(self) -> None:
        self.store.close()
