"""What a check answers, and the policy actions sent back to Postfix (named, never retyped as strings).

Every action word and reply code policyd sends is named here once, as aiosmtpd names its status codes;
a check builds its ``action=`` value with the helpers below. (Tests keep the literal strings: they check
what goes over the wire.)
"""

from __future__ import annotations

from dataclasses import dataclass

from mailwarden.decision import Action

# -- Postfix access(5) actions ------------------------------------------------------------------------

DUNNO = "DUNNO"
"""No opinion: the next check, then Postfix's next restriction, decides."""
OK = "OK"
PERMIT = "PERMIT"
"""Accept: policyd never answers with these, but Dovecot's quota-status may (its "not full")."""
DEFER_IF_PERMIT = "DEFER_IF_PERMIT"
"""Temporary failure unless a later restriction rejects outright."""
PREPEND = "PREPEND"
"""Add a header to the message; the action lets the request pass."""
PREPEND_PREFIX = f"{PREPEND} "
"""How an ``action=`` value that is a PREPEND starts (``reply.startswith(PREPEND_PREFIX)``)."""
HOLD = "HOLD"
"""Accept into Postfix's hold queue (nothing lost, nothing sent: the postmaster decides)."""

# -- SMTP reply codes with their enhanced status (RFC 3463), the start of a refusal -------------------

DEFER_POLICY = "450 4.7.1"
"""Temporary refusal by policy: the default of ``defer`` (access rules, DNSBL, rate limits)."""
REJECT_POLICY = "550 5.7.1"
"""Permanent refusal by policy: the default of ``reject`` (access rules, block list, DNSBL, rate limits)."""
TEMPFAIL_STATUS = "4.3.0"
"""A temporary local problem (a backend failed, an internal error): the enhanced status alone, after
DEFER_IF_PERMIT."""
TEMPFAIL = f"451 {TEMPFAIL_STATUS}"
"""A temporary local problem, as a plain deferral."""
REJECT_SPF_FAIL = "550 5.7.23"
"""SPF validation failed (RFC 7372)."""
DEFER_SPF_ERROR = "451 4.7.24"
"""SPF validation could not be completed (RFC 7372)."""
REJECT_BAD_ADDRESS = "550 5.1.3"
"""The recipient address is not a valid address."""
REJECT_UNKNOWN_USER = "550 5.1.1"
"""No such recipient."""
REJECT_DISABLED_MAILBOX = "550 5.2.1"
"""The recipient's mailbox is disabled."""
DEFER_MAILBOX_FULL = "452 4.2.2"
"""The recipient's mailbox is over quota; the sender retries."""
REJECT_MAILBOX_FULL = "552 5.2.2"
"""The recipient's mailbox is over quota; the sender gives up."""


def defer_if_permit(text: str) -> str:
    """Temporary failure unless a later restriction rejects outright (greylisting: a hard reject wins)."""
    return f"{DEFER_IF_PERMIT} {text}"


def defer(text: str, code: str = DEFER_POLICY) -> str:
    return f"{code} {text}"


def reject(text: str, code: str = REJECT_POLICY) -> str:
    return f"{code} {text}"


def prepend(header: str) -> str:
    return f"{PREPEND} {header}"


def hold(text: str) -> str:
    return f"{HOLD} {text}"


@dataclass(slots=True, frozen=True)
class Verdict:
    action: Action
    reason: str
    reply: str = DUNNO
    """The ``action=`` value for Postfix."""
    decisive: bool = False
    """A decisive verdict ends the pipeline (reject, defer); an accept or a PREPEND lets later checks run."""

    @classmethod
    def accept(cls, reason: str, reply: str = DUNNO) -> Verdict:
        return cls(Action.ACCEPT, reason, reply, False)  # positional: made per request, keywords cost more

    @classmethod
    def refuse(cls, action: Action, reason: str, reply: str) -> Verdict:
        return cls(action, reason, reply, True)
