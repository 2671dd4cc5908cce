"""One decision, one event.

Every check and milter ends in a Decision. Its logfmt rendering is the log line; the metrics count it.
Later stages (milters, digests, replies, logins) emit the same type, so one message can be traced across
the whole suite by its Postfix queue id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from mailwarden.logfmt import logfmt_value


class Stage(StrEnum):
    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    EOM = "eom"
    OTHER = "other"


class Action(StrEnum):
    """What was done, in the suite's own words (the Postfix reply is in the log line beside it)."""

    ACCEPT = "accept"
    DEFER = "defer"
    REJECT = "reject"
    HOLD = "hold"
    TAG = "tag"
    QUARANTINE = "quarantine"
    SNAG = "snag"
    FAIL_OPEN = "fail_open"


@dataclass(slots=True)
class Decision:
    service: str
    stage: str
    check: str
    action: Action
    reason: str
    seconds: float
    queue_id: str = ""
    client: str = ""
    helo: str = ""
    sender: str = ""
    recipient: str = ""
    user: str = ""
    reply: str = ""
    """What the client or Postfix was told, e.g. ``DEFER_IF_PERMIT 4.7.1 ...``."""
    extra: dict[str, object] = field(default_factory=dict)

    def logfmt(self) -> str:
        """``event=decision service=... stage=... queue_id=...``: fixed keys first, then ``extra``, then the
        reply. Empty values are left out, except queue_id (``-``) and sender (``<>``, the null sender)."""
        parts = [
            "event=decision service=", self.service, " stage=", self.stage,
            " queue_id=", logfmt_value(self.queue_id) if self.queue_id else "-",
        ]
        for key, value in (("client", self.client), ("helo", self.helo)):
            if value:
                parts += (" ", key, "=", logfmt_value(value))
        parts += (" sender=", logfmt_value(self.sender) if self.sender else "<>")
        for key, value in (("recipient", self.recipient), ("user", self.user), ("check", self.check),
                           ("action", self.action.value), ("reason", self.reason)):
            if value:
                parts += (" ", key, "=", logfmt_value(value))
        parts.append(f" ms={self.seconds * 1000:.2f}")
        for key, extra in self.extra.items():
            if extra is not None and extra != "":
                parts += (" ", key, "=", logfmt_value(extra))
        if self.reply:
            parts += (" reply=", logfmt_value(self.reply))
        return "".join(parts)
