"""Who is looking at the review page: local accounts (argon2 hashes in the config), or the login name a
trusted reverse proxy vouches for; the signed session cookie that remembers a login; the failed-login limit.

**Passwords.** ``argon2.PasswordHasher().verify`` compares in constant time. An unknown login name is verified
against a dummy hash made at start-up, so the answer takes as long as for a real account and its timing does
not tell which names exist.

**The proxy header.** ``trusted_header`` (``X-Remote-User``) is believed only when the connection comes from
one of ``trusted_proxies``; from anywhere else it is ignored (and logged), and the request needs a session
like any other. Behind such a proxy every connection comes from the proxy, so the address counted for failed
logins is the last one the proxy appended to ``X-Forwarded-For`` (only from a trusted proxy, too).

**Sessions.** Starlette's ``SessionMiddleware``: the session is a JSON cookie signed with itsdangerous
(``session_secret``, or a random key per start), HttpOnly, SameSite=Strict, Secure with ``secure_cookie``,
``Max-Age`` = ``session_lifetime``. The login time is kept in it and checked on each request, so a session
ends ``session_lifetime`` after the login even if the cookie was re-signed since (a flash message re-signs
it), and at once when its account is no longer in the config (after the service restarts with it removed).
Logging out empties the cookie; a copied cookie stays valid until its lifetime ends (nothing is kept
server-side): keep the lifetime short on shared machines.

**Failed logins.** Counted in Redis per client address and per account (the login name, hashed), whatever
the name (an unknown one counts too, or the limit would tell which names exist). Once ``failed_logins`` are
reached within ``failed_window`` for either, further attempts are answered 429 without looking at the
password until the window that started with the first failure passes. Refused attempts are counted too (the
count shows the pressure) but do not extend the window. The counters are read before and written after the
argon2 check, so a burst of parallel attempts may overshoot the limit by the number in flight (a handful):
the limit slows guessing down, it is not a lock. Keys: ``phishhook/keys.py`` (``ph:rl:``).
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from mailwarden.logs import Throttled, get_logger
from phishhook import keys
from phishhook.review.settings import ReviewSettings

log = get_logger("phishhook.review")
ignored_headers = Throttled(log, logging.WARNING, "review: proxy login header from an untrusted address ignored")

SESSION_COOKIE = "phishhook_review"
MAX_NAME = 128
"""Characters of a review login name (typed or from the proxy header)."""
MAX_PASSWORD = 1024
"""Characters of a password looked at: argon2 hashes anything, but a megabyte would only cost CPU."""

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def clean_name(raw: object) -> str:
    """A login name as typed or sent by the proxy: stripped, bounded, no control characters; "" when it
    cannot be one."""
    if not isinstance(raw, str):
        return ""
    name = raw.strip()
    if not name or len(name) > MAX_NAME or any(ord(char) < 32 or ord(char) == 127 for char in name):
        return ""
    return name


class PasswordCheck:
    """The local accounts of ``[phishhook.review] accounts``."""

    def __init__(self, accounts: dict[str, str]) -> None:
        self.hasher = PasswordHasher()
        self.accounts = dict(accounts)
        self.dummy = self.hasher.hash(secrets.token_urlsafe(24))

    def verify(self, name: str, password: str) -> bool:
        """Whether ``password`` is ``name``'s: one argon2 verification whether the account exists or not."""
        stored = self.accounts.get(name)
        try:
            self.hasher.verify(stored if stored is not None else self.dummy, password[:MAX_PASSWORD])
        except (VerificationError, InvalidHashError):  # VerifyMismatchError is a VerificationError
            return False
        return stored is not None


def parse_networks(networks: Iterable[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(network, strict=False) for network in networks]


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class Identity:
    """Who is asking, as far as the connection tells."""

    peer: str
    """The connection's own address."""
    address: str
    """The client's address: the peer, or the proxy's last ``X-Forwarded-For`` entry from a trusted proxy."""
    proxy_user: str
    """The login name the trusted proxy vouches for, or ""."""


class Gate:
    """Tells who a request is from: the trusted proxy's header, or the session's login."""

    def __init__(self, settings: ReviewSettings, now: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.proxies = parse_networks(settings.trusted_proxies)
        self.header = settings.trusted_header.lower() if settings.trusted_header else None
        self.now = now

    def trusted(self, peer: str) -> bool:
        ip = _ip(peer)
        return ip is not None and any(ip.version == net.version and ip in net for net in self.proxies)

    def identify(self, peer: str, headers: Any) -> Identity:
        """``headers``: a case-insensitive mapping (Starlette's ``Headers``)."""
        trusted = self.trusted(peer)
        address = peer
        if trusted:
            forwarded = headers.get("x-forwarded-for", "")
            last = forwarded.split(",")[-1].strip() if forwarded else ""
            if _ip(last) is not None:
                address = str(_ip(last))
        proxy_user = ""
        if self.header is not None and self.header in headers:
            if trusted:
                proxy_user = clean_name(headers.get(self.header))
            else:
                ignored_headers.hit(peer, peer=peer, header=self.header)
        return Identity(peer=peer, address=address, proxy_user=proxy_user)

    def user(self, identity: Identity, session: dict[str, Any]) -> str | None:
        """The review login name of the request, or None (not logged in, or the login is too old)."""
        if identity.proxy_user:
            return identity.proxy_user
        name = session.get("user")
        started = session.get("login_at")
        if not isinstance(name, str) or not isinstance(started, int | float):
            return None
        if name not in self.settings.accounts:  # the account was removed from the config since the login
            session.clear()
            return None
        if not 0 <= self.now() - started < self.settings.session_lifetime:
            session.pop("user", None)
            session.pop("login_at", None)
            return None
        return name

    def log_in(self, session: dict[str, Any], name: str) -> None:
        """A new session for ``name``: what the pre-login session held is dropped (its CSRF token too)."""
        session.clear()
        session["user"] = name
        session["login_at"] = self.now()


def actor(name: str) -> str:
    """How a review login is named in the audit log."""
    return f"review:{name}"


@dataclass(frozen=True)
class Counted:
    address: int
    account: int


class LoginLimiter:
    """Failed review logins per address and per account in Redis (see the module docstring)."""

    def __init__(self, client: redis.Redis, prefix: str, limit: int, window: float) -> None:
        self.client = client
        self.prefix = prefix
        self.limit = limit
        self.window = max(1, round(window))

    def keys(self, address: str, account: str) -> tuple[str, str]:
        return (f"{self.prefix}{keys.REVIEW_FAILED_ADDRESS}{address}",
                keys.user_key(self.prefix, keys.REVIEW_FAILED_ACCOUNT, account.lower()))

    def current(self, address: str, account: str) -> Counted:
        by_address, by_account = self.client.mget(self.keys(address, account))
        return Counted(int(by_address or 0), int(by_account or 0))

    def over(self, counted: Counted) -> str:
        """Which limit ``counted`` is at: "address", "account" or "" (none)."""
        if counted.address >= self.limit:
            return "address"
        if counted.account >= self.limit:
            return "account"
        return ""

    def count(self, address: str, account: str) -> Counted:
        """One more failed (or refused) attempt; the window starts with the first."""
        pipe = self.client.pipeline(transaction=True)
        for key in self.keys(address, account):
            pipe.incr(key)
            pipe.expire(key, self.window, nx=True)
        by_address, _, by_account, _ = pipe.execute()
        return Counted(int(by_address), int(by_account))

    def retry_after(self, address: str, account: str) -> int:
        """Seconds until both windows have passed."""
        ttls = [int(ttl) for ttl in (self.client.ttl(key) for key in self.keys(address, account))]
        return max([ttl for ttl in ttls if ttl > 0], default=1)
