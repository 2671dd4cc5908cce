"""``[phishhook.review]``: the security team's review page."""

from __future__ import annotations

from pydantic import Field, field_validator

from mailwarden.section import Section
from mailwarden.units import Duration


class ReviewSettings(Section):
    listen: str | None = None
    """host:port the review page serves on (``127.0.0.1:10041`` behind a TLS reverse proxy); unset: no page
    (the CLI still reviews)."""
    public_url: str = ""
    """The page's address as the security team opens it (``https://mail-admin.example.org/phish``): links in
    tickets and webhooks point there. Unset: no links."""
    accounts: dict[str, str] = {}
    """Local accounts: login name = argon2 hash (``mailwarden phish passwd NAME`` prints one)."""
    trusted_header: str | None = None
    """A header carrying the login name set by a reverse proxy that authenticated the user (``X-Remote-User``),
    believed only from ``trusted_proxies``. Unset: local accounts only."""
    trusted_proxies: list[str] = ["127.0.0.1/32", "::1/128"]
    """Addresses the trusted header is believed from."""
    session_secret: str | None = None
    """Signs the session cookie (32+ characters). Unset: a random one at each start (everyone logs in again
    after a restart)."""
    session_lifetime: Duration = 8 * 3600
    """Seconds a login lasts."""
    secure_cookie: bool = False
    """Mark the cookie Secure (set it when the page is served over HTTPS by the proxy)."""
    failed_logins: int = Field(default=5, ge=1)
    """Wrong passwords from one address (or for one account) within ``failed_window`` before further
    attempts are refused (429) until the window passes."""
    failed_window: Duration = 900
    """Seconds ("15m") the failed-login count runs from the first failure; the refusals last until it ends."""

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str) -> str:
        if value and not value.startswith(("https://", "http://")):
            raise ValueError(f"{value!r}: give the page's full address (https://host/path)")
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies(cls, value: list[str]) -> list[str]:
        import ipaddress

        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not an address or CIDR network") from None
        return value

    @field_validator("session_secret")
    @classmethod
    def _secret(cls, value: str | None) -> str | None:
        if value is not None and len(value) < 32:
            raise ValueError("too short: use 32 or more random characters (e.g. `openssl rand -hex 32`)")
        return value
