"""The outbound anomaly: an authenticated user sending one message to many recipients with a From header
that is not their envelope sender (the seed university's rule: "envelope-sender does not match from header,
and there is a large number of recipients").

Legitimate mail trips it too: mailing-list servers (a list's posts keep the author's From, the envelope is
the list's bounce address), SRS and VERP rewriting, forwarding services. Their accounts and envelope
patterns are exempt by configuration, and an exempt message is logged as such.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from email.utils import getaddresses

from pydantic import Field, field_validator

from mailwarden.section import Section

DEFAULT_SENDER_PATTERNS = ["*-bounces*@*", "*-bounce-*@*", "owner-*@*", "*-owner@*", "srs0=*", "srs1=*",
                           "bounce-*@*", "*+*=*@*"]
"""Envelope senders of list servers, SRS (``SRS0=hash=tt=domain=user@``) and VERP (``list+user=host@``)."""


class OutboundSettings(Section):
    """``[phishhook.outbound]``: the mass-mail rule, judged by the phish milter at end of message."""

    enabled: bool = True
    max_recipients: int = Field(default=100, ge=1)
    """A message with a forged From to more recipients than this snags its sender (the seed's 100)."""
    list_accounts: list[str] = []
    """SASL login names of list servers and other accounts that legitimately send other people's mail to
    many recipients (``lists``, ``sympa``): never snagged by this rule."""
    sender_patterns: list[str] = DEFAULT_SENDER_PATTERNS
    """Envelope senders (shell patterns, case-insensitive) whose mail is exempt: list bounce addresses,
    SRS and VERP forms."""

    @field_validator("list_accounts", "sender_patterns")
    @classmethod
    def _lower(cls, values: list[str]) -> list[str]:
        return [value.strip().lower() for value in values if value.strip()]


class OutboundVerdict:
    CLEAN = "clean"
    NOT_AUTHENTICATED = "not-authenticated"
    EXEMPT = "exempt"
    ANOMALY = "anomaly"


@dataclass(frozen=True)
class OutboundFinding:
    verdict: str
    reason: str
    from_address: str = ""
    recipients: int = 0


def header_addresses(value: str | None) -> list[str]:
    """The addr-specs of a From header, lower case ([] when none can be parsed)."""
    if not value:
        return []
    return [address.lower() for _name, address in getaddresses([value]) if "@" in address]


def judge_outbound(settings: OutboundSettings, auth_user: str, sender: str, from_header: str | None,
                   recipients: Sequence[str]) -> OutboundFinding:
    """The rule on one message; ``ANOMALY`` snags its sender."""
    count = len(recipients)
    if not auth_user:
        return OutboundFinding(OutboundVerdict.NOT_AUTHENTICATED, "not authenticated", recipients=count)
    if count <= settings.max_recipients:
        return OutboundFinding(OutboundVerdict.CLEAN, f"{count} recipients", recipients=count)
    envelope = sender.strip().lower()
    addresses = header_addresses(from_header)
    if envelope and envelope in addresses:
        return OutboundFinding(OutboundVerdict.CLEAN, "From matches the envelope sender", addresses[0], count)
    if auth_user.strip().lower() in settings.list_accounts:
        return OutboundFinding(OutboundVerdict.EXEMPT, "a list server account", ",".join(addresses), count)
    if any(fnmatch.fnmatchcase(envelope, pattern) for pattern in settings.sender_patterns):
        return OutboundFinding(OutboundVerdict.EXEMPT, "a list, SRS or VERP envelope sender",
                               ",".join(addresses), count)
    shown = ",".join(addresses) or "none"
    return OutboundFinding(OutboundVerdict.ANOMALY,
                           f"From {shown} is not the envelope sender <{envelope}>, {count} recipients "
                           f"(more than {settings.max_recipients})", ",".join(addresses), count)
