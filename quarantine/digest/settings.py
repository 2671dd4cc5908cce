"""``[quarantine.digest]``: the digests users get of their held mail, and the replies that act on it.

Absent: no digest is sent and ``digest reply`` refuses every reply (``config check`` says so when the reply
transport is configured without it). The token keys and lifetime come from ``tokens.TokenSettings``.
"""

from __future__ import annotations

import datetime
import ipaddress
import re
import zoneinfo
from enum import StrEnum
from pathlib import Path

from pydantic import field_validator, model_validator

from mailwarden.units import Duration
from quarantine.digest.tokens import MAX_LOCAL_PREFIX, TokenSettings

_ADDRESS = re.compile(r"[^\s@<>\"\\]{1,64}@[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,253}[A-Za-z0-9_])?")
WEEKDAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


class Interval(StrEnum):
    DAILY = "daily"
    WEEKLY = "weekly"
    IMMEDIATE = "immediate"
    """Batched: at most one digest every ``immediate_every`` (for sign-in codes that expire in minutes)."""
    OFF = "off"


class BlockDomain(StrEnum):
    AUTO = "auto"
    """The sender's domain when its address looks single-use (VERP, BATV, a long random local part)."""
    NEVER = "never"
    ALWAYS = "always"


def check_address(value: str, what: str) -> str:
    value = value.strip()
    if not _ADDRESS.fullmatch(value):
        raise ValueError(f"{value!r} is not a mail address ({what}: e.g. 'quarantine@example.org')")
    return value


class DigestSettings(TokenSettings):
    """The ``[quarantine.digest]`` section (with ``token_keys`` and ``token_lifetime`` from TokenSettings)."""

    from_address: str
    """From of digests and confirmations, e.g. ``postmaster@example.org`` (the envelope sender is null)."""
    from_name: str = "Mail quarantine"
    reply_mailbox: str
    """The address Postfix routes to ``mailwarden digest reply`` (README, "Digests"): replies and the
    digest's ``mailto:`` links go to ``<local part><delimiter><token>@<domain>``; its local part may have
    at most 22 characters so that the token fits SMTP's 64."""
    recipient_delimiter: str = "+"
    """Postfix's recipient_delimiter (one character)."""
    submit: str | None = None
    """host:port digests and confirmations are sent through: a Postfix listener that skips the milters (a
    digest lists spam subjects); unset: ``[quarantine] reinject``."""
    interval: Interval = Interval.DAILY
    """Of mailboxes that did not choose one by reply (``DIGEST WEEKLY`` ...)."""
    send_at: str = "06:00"
    """Local time (``timezone``) daily and weekly digests go out from: the first ``digest send`` after it."""
    weekly_day: str = "monday"
    immediate_every: Duration = 900.0
    """Seconds ("15m") between two digests of an ``immediate`` mailbox; the timer runs ``digest send`` at
    least this often."""
    timezone: str = "UTC"
    """IANA zone (``Europe/Berlin``) of send_at and of the dates digests show."""
    max_listed: int = 200
    """Messages a digest lists per section; the rest are counted ("and 12 more")."""
    list_tagged: bool = True
    """A second section: mail delivered with a score between the tag and hold levels, with REPORT."""
    templates: Path | None = None
    """A directory whose ``digest.txt.j2``, ``digest.html.j2``, ... replace the shipped templates."""
    admin_copy: str | None = None
    """An address that gets, after each run, the count of held messages and digests per domain."""
    stale_after: Duration = 2 * 86400.0
    """``digest send`` and ``config check`` warn when no digest went out for this long while mail is held."""
    require_authentication: bool = True
    """A reply acts only when it came through authenticated submission as its owner (Postfix passes the SASL
    login) or from ``trusted_networks``; off: the envelope sender alone (forgeable: not for the Internet)."""
    trusted_networks: list[str] = []
    """Clients (``192.0.2.0/24``, ``2001:db8::/32``) whose replies need no SASL login: a webmail host that
    submits with the user's own address after its own login."""
    login_domain: str | None = None
    """Appended to SASL logins without a domain (``alice`` -> ``alice@example.org``) to compare with owners."""
    learn_on_release: bool = True
    """Released by reply: learnt as ham in the owner's Bayes database."""
    learn_on_delete: bool = True
    """Deleted, blocked or reported by reply: learnt as spam."""
    block_domain: BlockDomain = BlockDomain.AUTO
    metrics_file: Path | None = None
    """A Prometheus textfile (node_exporter's textfile collector) ``digest send`` rewrites after each run."""

    @field_validator("from_address")
    @classmethod
    def _from(cls, value: str) -> str:
        return check_address(value, "from_address")

    @field_validator("admin_copy")
    @classmethod
    def _admin(cls, value: str | None) -> str | None:
        return None if value is None else check_address(value, "admin_copy")

    @field_validator("reply_mailbox")
    @classmethod
    def _reply(cls, value: str) -> str:
        value = check_address(value, "reply_mailbox").lower()
        local = value.rsplit("@", 1)[0]
        if len(local) > MAX_LOCAL_PREFIX:
            raise ValueError(f"{value!r}: its local part may have {MAX_LOCAL_PREFIX} characters at most, so that "
                             "the token after the delimiter fits SMTP's 64")
        return value

    @field_validator("recipient_delimiter")
    @classmethod
    def _delimiter(cls, value: str) -> str:
        if len(value) != 1 or value.isalnum() or value in "@ \t\"<>":
            raise ValueError(f"{value!r}: one character, as Postfix's recipient_delimiter (e.g. '+' or '-')")
        return value

    @field_validator("send_at")
    @classmethod
    def _send_at(cls, value: str) -> str:
        try:
            datetime.time.fromisoformat(value)
        except ValueError:
            raise ValueError(f"{value!r}: a local time, e.g. '06:00'") from None
        return value

    @field_validator("weekly_day")
    @classmethod
    def _weekday(cls, value: str) -> str:
        if value.lower() not in WEEKDAYS:
            raise ValueError(f"{value!r}: one of {', '.join(WEEKDAYS)}")
        return value.lower()

    @field_validator("immediate_every")
    @classmethod
    def _every(cls, value: float) -> float:
        if not 60 <= value <= 86400:
            raise ValueError("immediate_every must be between 1m and 1d")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not an IANA time zone (e.g. 'UTC', 'Europe/Berlin')") from None
        return value

    @field_validator("max_listed")
    @classmethod
    def _listed(cls, value: int) -> int:
        if not 1 <= value <= 5000:
            raise ValueError("max_listed must be between 1 and 5000")
        return value

    @field_validator("trusted_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError:
                raise ValueError(f"{network!r} is not a network (e.g. '192.0.2.0/24')") from None
        return value

    @model_validator(mode="after")
    def _submit(self) -> DigestSettings:
        if self.submit is not None:
            from quarantine.store import split_host_port  # the store imports this module

            split_host_port(self.submit)
        return self

    @property
    def zone(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    def networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(network, strict=False) for network in self.trusted_networks]
