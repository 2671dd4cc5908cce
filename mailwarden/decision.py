"""One decision, one event.

Every check and milter ends in a Decision. Its logfmt rendering is the log line; the metrics count it.
Later stages (milters, digests, replies, logins) emit the same type, so one message can be traced across
the whole suite by its Postfix queue id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from mailwarden.logfmt import logfmt_pairs


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
        pairs: list[tuple[str, object]] = [
            ("event", "decision"),
            ("service", self.service),
            ("stage", self.stage),
            ("queue_id", self.queue_id or "-"),
            ("client", self.client),
            ("helo", self.helo),
            ("sender", self.sender or "<>"),
            ("recipient", self.recipient),
            ("user", self.user),
            ("check", self.check),
            ("action", self.action.value),
            ("reason", self.reason),
            ("ms", f"{self.seconds * 1000:.2f}"),
        ]
        pairs.extend(self.extra.items())
        if self.reply:
            pairs.append(("reply", self.reply))
        return logfmt_pairs(pairs)
