"""A login, as phishhook hears of it: from the phish milter (SMTP AUTH), Dovecot's auth policy requests
(IMAP, POP3), the HTTP and CLI intake (webmail and other services) or the log follower.

Successful logins feed geo-velocity; failed ones are the brute-force signal. Login names come from outside
(a client typed them): they are kept as given, except surrounding white space and case (``Alice`` and
``alice`` are one account to Dovecot and Postfix with the usual lookups), and refused when they could not be
an account at all (empty, too long, control characters).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

MAX_USER = 320
"""Characters of a login name: the longest mail address (64 + 1 + 255)."""


class BadEvent(ValueError):
    """A login event that cannot be judged: the message says which field and why."""


@dataclass(frozen=True, slots=True)
class LoginEvent:
    user: str
    """The login name, normalised (``normalise_user``)."""
    address: str
    """The client's address as the service saw it, normalised (``normalise_address``)."""
    at: float
    """When (epoch seconds)."""
    success: bool
    service: str
    """``smtp``, ``imap``, ``pop3``, ``webmail`` ... (lower case, at most 32 characters)."""
    via: str
    """Who told us: ``milter``, ``dovecot``, ``intake``, ``log``."""
    session: str = ""
    """The service's session or queue id, for the log line."""


def normalise_user(raw: object) -> str:
    """The login name as phishhook keys it; BadEvent for one that cannot be an account."""
    if not isinstance(raw, str):
        raise BadEvent("login name: expected a string")
    user = raw.strip().lower()
    if not user:
        raise BadEvent("login name: empty")
    if len(user) > MAX_USER:
        raise BadEvent(f"login name: longer than {MAX_USER} characters")
    if any(ord(char) < 32 or ord(char) == 127 for char in user):
        raise BadEvent("login name: contains control characters")
    return user


def normalise_address(raw: object) -> str:
    """A client address in canonical form (IPv6 compressed, IPv4-mapped IPv6 as IPv4, Postfix's
    ``IPv6:`` prefix and brackets removed); BadEvent for anything else (``unknown``, a host name)."""
    if not isinstance(raw, str):
        raise BadEvent("address: expected a string")
    text = raw.strip().strip("[]")
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    try:
        ip = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        raise BadEvent(f"address: {raw[:64]!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return ip.compressed


def normalise_service(raw: object) -> str:
    if not isinstance(raw, str) or not raw.strip():
        return "unknown"
    service = raw.strip().lower()[:32]
    return "".join(char if char.isalnum() or char in "-_." else "_" for char in service)
