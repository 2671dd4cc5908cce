"""How every service reaches the shared Redis: a URL, or Redis Sentinel for high availability."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, field_validator, model_validator

from mailwarden.section import Section
from mailwarden.units import Duration


class RedisSettings(Section):
    url: str = "redis://127.0.0.1:6379/0"
    """redis://[:password@]host:port/db or unix:///path/to/redis.sock?db=0. Ignored for the
    address when ``sentinels`` is set (its password and db still apply)."""
    sentinels: list[str] = []
    """host:port of each Sentinel; when set, the master is found through them and found again after
    a failover, with no restart."""
    sentinel_service: str = "mymaster"
    sentinel_password: str | None = None
    sentinel_timeout: Duration = 1.0
    """Finding the master takes at most this long, whatever state each Sentinel is in: all of them are
    asked at once, the first to name a master wins, none is retried within one lookup."""
    timeout: Duration = 0.5
    """A command not answered within this time counts as a Redis failure (the fail mode applies)."""
    connect_timeout: Duration = 1.0
    key_prefix: Annotated[str, Field(pattern=r"^[A-Za-z0-9:_.-]{0,32}$")] = "mw:"
    """Prefix of every key the suite writes, so one Redis can be shared with other software."""

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "unix"):
            raise ValueError("must start with redis:// or unix://")
        db = parse_qs(parts.query).get("db", ["0"])[0]
        if parts.scheme == "redis":
            db = parts.path.strip("/") or db
            try:
                port = parts.port
            except ValueError:
                port = 0
            if port == 0:
                raise ValueError("the port must be a number from 1 to 65535")
        if not db.isdigit():
            raise ValueError(f"the database must be a number (got {db!r})")
        return url

    @field_validator("sentinels")
    @classmethod
    def _host_ports(cls, sentinels: list[str]) -> list[str]:
        for entry in sentinels:
            host, _, port = entry.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"sentinel {entry!r} must be host:port")
        return sentinels

    @model_validator(mode="after")
    def _positive_timeouts(self) -> RedisSettings:
        if self.timeout <= 0 or self.connect_timeout <= 0 or self.sentinel_timeout <= 0:
            raise ValueError("timeout, connect_timeout and sentinel_timeout must be greater than zero")
        return self

    def sentinel_addresses(self) -> list[tuple[str, int]]:
        pairs = []
        for entry in self.sentinels:
            host, _, port = entry.rpartition(":")
            pairs.append((host.strip("[]"), int(port)))
        return pairs
