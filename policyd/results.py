"""Results one check leaves in the transaction's scratch space for the checks after it.

Kept here, apart from the checks that produce them, so that a reader (the greylist reads the SPF result
and the DNSBL score) does not import the producer's libraries.
"""

from __future__ import annotations

from dataclasses import dataclass

from policyd.request import PolicyRequest

SPF_RESULT = "spf.result"
DNSBL_RESULT = "dnsbl.result"


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


def spf_result(request: PolicyRequest) -> SpfResult | None:
    """The SPF result of this request's transaction, if the spf check ran before."""
    kept = request.message.get(SPF_RESULT)
    if isinstance(kept, SpfResult) and kept.client == request.client_address and kept.sender == request.sender:
        return kept
    return None


def dnsbl_score(request: PolicyRequest) -> float | None:
    """The DNSBL score of this request's client, if the dnsbl check ran before."""
    kept = request.message.get(DNSBL_RESULT)
    if not isinstance(kept, tuple) or kept[0] != request.client_ip:
        return None
    return sum(answer.weight for answer in kept[1] if answer.codes)


def allow_listing(request: PolicyRequest) -> str | None:
    """The allow list (a DNS list with a negative weight) that lists this client, if the dnsbl check ran."""
    kept = request.message.get(DNSBL_RESULT)
    if not isinstance(kept, tuple) or kept[0] != request.client_ip:
        return None
    return next((answer.label for answer in kept[1] if answer.codes and answer.weight < 0), None)
