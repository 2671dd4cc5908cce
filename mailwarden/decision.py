"""One decision, one event.

Every check and milter ends in a Decision. Its logfmt rendering is the log line; the metrics count it.
Later stages (milters, digests, replies, logins) emit the same type, so one message can be traced across
the whole suite by its Postfix queue id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from mailwarden.logfmt import logfmt_value, logfmt_value_cached, needs_quotes


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
        reply. Empty values are left out, except queue_id (``-``) and sender (``<>``, the null sender).

        Built in one pass, since policyd renders one per request: one regex scan over the request's values
        joined (client, helo, sender, ...) decides whether any needs quoting (almost never), and then one
        f-string renders them all; otherwise each is quoted on its own. The check, the reason and the
        reply, the same few texts over and over and often quoted ("new triplet"), come from a small cache.
        Byte for byte the same line either way (tests/test_decision_line.py)."""
        queue_id, client, helo, sender = self.queue_id, self.client, self.helo, self.sender
        recipient, user, check, reason = self.recipient, self.user, self.check, self.reason
        if needs_quotes(f"{queue_id}{client}{helo}{sender}{recipient}{user}") is None:
            line = (
                f"event=decision service={self.service} stage={self.stage} queue_id={queue_id or '-'}"
                f"{' client=' + client if client else ''}{' helo=' + helo if helo else ''}"
                f" sender={sender or '<>'}{' recipient=' + recipient if recipient else ''}"
                f"{' user=' + user if user else ''}{' check=' + logfmt_value_cached(check) if check else ''}"
                f" action={self.action._value_}{' reason=' + logfmt_value_cached(reason) if reason else ''}"
                f" ms={self.seconds * 1000:.2f}"
            )
        else:
            line = self._fixed_quoted()
        if self.extra:
            line += "".join([f" {key}={logfmt_value(value)}" for key, value in self.extra.items()
                             if value is not None and value != ""])
        if self.reply:
            line += f" reply={logfmt_value_cached(self.reply)}"
        return line

    def _fixed_quoted(self) -> str:
        """The fixed keys when some value needs quoting: each value quoted on its own."""
        parts = [
            "event=decision service=", self.service, " stage=", self.stage,
            " queue_id=", logfmt_value(self.queue_id) if self.queue_id else "-",
        ]
        for key, value in (("client", self.client), ("helo", self.helo)):
            if value:
                parts += (" ", key, "=", logfmt_value(value))
        parts += (" sender=", logfmt_value(self.sender) if self.sender else "<>")
        for key, value in (("recipient", self.recipient), ("user", self.user), ("check", self.check),
                           ("action", self.action._value_), ("reason", self.reason)):
            if value:
                parts += (" ", key, "=", logfmt_value(value))
        parts.append(f" ms={self.seconds * 1000:.2f}")
        return "".join(parts)
