"""The transaction's scratch space (``TransactionState``), and the results one check leaves in it for the
checks after it.

Kept here, apart from the checks that produce them, so that a reader (the greylist reads the SPF result
and the DNSBL score) does not import the producer's libraries.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # request.py imports this module; ratelimit.py imports request.py
    from policyd.ratelimit import RateOverride
    from policyd.request import PolicyRequest


@dataclass(frozen=True, slots=True)
class SpfResult:
    result: str
    """pass, fail, softfail, neutral, none, temperror or permerror."""
    identity: str
    """``mailfrom`` or ``helo``."""
    domain: str
    """The domain whose policy was evaluated."""
    explanation: str
    client: str
    sender: str
    cached: bool = False


@dataclass(frozen=True, slots=True)
class ListAnswer:
    """One DNS list's answer about the client."""

    label: str
    weight: float
    codes: tuple[str, ...]
    """The return codes that count (empty: not listed)."""
    problem: str = ""
    """Why the list gave no usable answer (timeout, error, unexpected code), else empty."""
    cached: bool = False


@dataclass(slots=True)
class TransactionState:
    """What the requests of one mail transaction on one connection share (Postfix's ``instance``): one
    field per writer, so a check counts a message once, not once per recipient. The connection creates
    one per transaction; every field has a default, so a check that does not run costs nothing."""

    spf: SpfResult | None = None
    """Written by spf; read by spf for the next recipients and by the greylist (``spf_result``)."""
    spf_header_sent: bool = False
    """Written by spf: the Received-SPF header went out with an earlier answer."""
    dnsbl: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, list[ListAnswer]] | None = None
    """Written by dnsbl: the client and every list's answer; read by dnsbl for the next recipients and by
    the greylist (``dnsbl_score``, ``allow_listing``)."""
    greylist_header_sent: bool = False
    """Written by greylist: the X-Greylist header went out with an earlier answer."""
    ratelimit_counted: bool = False
    """Written by ratelimit: the message was counted (at its first recipient)."""
    ratelimit_user_overrides: dict[str, RateOverride] | None = None
    """Written by ratelimit: the authenticated user's overrides from the directory; None until looked up."""
    quota_mailboxes: tuple[str, ...] = ()
    """Written by quota at RCPT: the mailbox of each recipient it judged, for END-OF-MESSAGE."""
    pending_headers: list[str] = field(default_factory=list)
    """Written by the pipeline: PREPEND actions not sent yet (Postfix takes one action per answer)."""


def spf_result(request: PolicyRequest) -> SpfResult | None:
    """The SPF result of this request's transaction, if the spf check ran before."""
    kept = request.transaction.spf
    if kept is not None and kept.client == request.client_address and kept.sender == request.sender:
        return kept
    return None


def dnsbl_answers(request: PolicyRequest) -> list[ListAnswer] | None:
    """Every DNS list's answer about this request's client, if the dnsbl check ran before."""
    kept = request.transaction.dnsbl
    if kept is None or kept[0] != request.client_ip:
        return None
    return kept[1]


def dnsbl_score(request: PolicyRequest) -> float | None:
    """The DNSBL score of this request's client, if the dnsbl check ran before."""
    answers = dnsbl_answers(request)
    if answers is None:
        return None
    return sum(answer.weight for answer in answers if answer.codes)


def allow_listing(request: PolicyRequest) -> str | None:
    """The allow list (a DNS list with a negative weight) that lists this client, if the dnsbl check ran."""
    answers = dnsbl_answers(request)
    if answers is None:
        return None
    return next((answer.label for answer in answers if answer.codes and answer.weight < 0), None)
