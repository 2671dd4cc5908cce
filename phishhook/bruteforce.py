"""Failed logins, taken one by one as Dovecot reports them: the brute-force and password-spraying signal.

Counted in fixed windows in Redis (keys in ``phishhook/keys.py``): per address, per login name, and the
distinct login names an address failed with (spraying: one password tried on many accounts). An address
over its limit is blocked for a while in policyd's block list (so Dovecot's next ``allow`` and policyd's
next RCPT refuse it); a login name over its limit gets an alert snag (the account is under attack, not
necessarily taken). Failed logins never feed geo-velocity.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis
from pydantic import Field

from mailwarden.section import Section
from mailwarden.units import Duration
from phishhook import keys


class BruteForceSettings(Section):
    """``[phishhook.bruteforce]``."""

    window: Duration = 600
    """Seconds ("10m") over which failed logins are counted (a fixed window that starts at the first one)."""
    per_address: int = Field(default=30, ge=0)
    """Failed logins from one address in a window that get it blocked; 0: never."""
    spray_users: int = Field(default=10, ge=0)
    """Different login names failing from one address in a window that get it blocked; 0: never."""
    per_user: int = Field(default=50, ge=0)
    """Failed logins of one login name in a window, from anywhere, that raise an alert snag; 0: never."""
    block_for: Duration = 3600
    """Seconds ("1h") an address over its limit stays blocked."""


@dataclass(frozen=True)
class FailedCount:
    address_failures: int
    address_users: int
    user_failures: int
    block_address: str
    """Why to block the address now (the first request over a limit in this window), or ""."""
    alert_user: str
    """Why to raise an alert for the login name now, or ""."""


class FailedLogins:
    def __init__(self, client: redis.Redis, prefix: str, settings: BruteForceSettings) -> None:
        self.client = client
        self.prefix = prefix
        self.settings = settings

    def count(self, user: str, address: str) -> FailedCount:
        """Count one failed login (one round trip) and say whether a limit was crossed by it."""
        window = max(1, int(self.settings.window))
        by_address = keys.address_key(self.prefix, keys.FAILED_ADDRESS, address)
        spray = keys.address_key(self.prefix, keys.FAILED_SPRAY, address)
        by_user = keys.user_key(self.prefix, keys.FAILED_USER, user)
        notified_address = keys.address_key(self.prefix, keys.FAILED_NOTIFIED, address)
        notified_user = keys.user_key(self.prefix, keys.FAILED_NOTIFIED, user)
        pipe = self.client.pipeline(transaction=False)
        pipe.incr(by_address)
        pipe.expire(by_address, window, nx=True)
        pipe.pfadd(spray, user)
        pipe.expire(spray, window, nx=True)
        pipe.pfcount(spray)
        pipe.incr(by_user)
        pipe.expire(by_user, window, nx=True)
        address_failures, _, _, _, address_users, user_failures, _ = pipe.execute()
        settings = self.settings
        block = ""
        if settings.per_address and address_failures >= settings.per_address:
            block = f"{address_failures} failed logins in {window}s"
        elif settings.spray_users and address_users >= settings.spray_users:
            block = f"failed logins with {address_users} different login names in {window}s (password spraying)"
        if block and not self.client.set(notified_address, "1", ex=window, nx=True):
            block = ""
        alert = ""
        if (settings.per_user and user_failures >= settings.per_user
                and self.client.set(notified_user, "1", ex=window, nx=True)):
            alert = f"{user_failures} failed logins in {window}s"
        return FailedCount(int(address_failures), int(address_users), int(user_failures), block, alert)
