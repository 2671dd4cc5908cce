"""The ``[policyd]`` section: where the daemon listens, which checks run in which order, and how each
check and each dependency behaves. Every field says its unit and default; the annotated example config
(etc/mailwarden.toml) documents them for operators."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from mailwarden.section import Section
from mailwarden.units import Duration
from policyd.access import AccessSettings
from policyd.blocklist import BlocklistSettings
from policyd.dnsbl import DnsblSettings
from policyd.greylist import GreylistSettings
from policyd.quota import QuotaSettings
from policyd.ratelimit import RateLimitSettings
from policyd.recipients import RecipientSettings
from policyd.settings_types import CheckName, Network, listen_entry
from policyd.spf import SpfSettings

FailAction = Literal["dunno", "defer_if_permit", "defer"]
"""What to answer when a dependency fails: ``dunno`` lets the next check and Postfix decide (fail open),
``defer_if_permit`` and ``defer`` give the client a temporary failure (fail closed)."""


class FailModes(Section):
    """Fail mode of one dependency, chosen per class of client."""

    inbound: FailAction = "dunno"
    """Unauthenticated clients (mail from the Internet)."""
    authenticated: FailAction = "dunno"
    """SASL-authenticated submission."""


class PolicydSettings(Section):
    listen: list[str] = ["127.0.0.1:10023"]
    """TCP (host:port, [v6]:port) or unix:/path sockets; Postfix reuses connections, many at once."""
    checks: list[CheckName] = ["access", "blocklist", "ratelimit", "greylist"]
    """The pipeline, in order; the first decisive answer wins. Leave a check out to turn it off. The
    default is Postgrey's behaviour plus the site's rules, blocks and rate limits; the border checks
    (dnsbl, spf) are added by the site, in this order: access, blocklist, ratelimit, dnsbl, spf, greylist."""
    trusted_networks: list[Network] = [
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    ]
    """Clients Postfix permits as mynetworks: never greylisted. Keep it equal to Postfix's mynetworks."""
    answer_within: Duration = 2.0
    """Every request is answered within this time; past it the fail mode of the dependency applies."""
    request_timeout: Duration = 30
    """A request must arrive whole within this of its first byte (later bytes do not extend it), else the
    connection is closed."""
    idle_timeout: Duration = 600
    """A connection with nothing in flight is closed this long after its last answer (Postfix's
    smtpd_policy_service_max_idle is 300s)."""
    max_connections: Annotated[int, Field(ge=1)] = 4096
    """More are refused (counted, logged once per 10s); start-up refuses (exit 78) unless max_connections
    plus 64 descriptors fit in the open files limit."""
    max_line_bytes: Annotated[int, Field(ge=256)] = 8192
    max_request_bytes: Annotated[int, Field(ge=1024)] = 65536
    on_error: dict[Literal["redis", "dns", "ldap", "sql", "file", "quota"], FailModes] = Field(default_factory=dict)
    """Defaults: redis and dns fail open (dunno); the recipient directories (ldap, sql, file) defer, so an
    outage never turns into "user unknown" and never lets mail for unknown users in."""
    """Fail mode per dependency and per class of client; logged and counted when used."""
    check_histograms: bool = False
    """Observe each check's time in ``mailwarden_policyd_check_seconds`` (a histogram per check). Off by
    default: every request is timed in ``mailwarden_policyd_decision_seconds`` and every decision line has
    each check's time (``checks=``); the per-check histograms cost a little on every check of every
    request, worth it while looking for the slow check."""
    hostname: str | None = None
    """Name used in the X-Greylist header; the machine's name by default."""
    access: AccessSettings = Field(default_factory=AccessSettings)
    dnsbl: DnsblSettings = Field(default_factory=DnsblSettings)
    spf: SpfSettings = Field(default_factory=SpfSettings)
    recipients: RecipientSettings = Field(default_factory=RecipientSettings)
    quota: QuotaSettings = Field(default_factory=QuotaSettings)
    greylist: GreylistSettings = Field(default_factory=GreylistSettings)
    ratelimit: RateLimitSettings = Field(default_factory=RateLimitSettings)
    blocklist: BlocklistSettings = Field(default_factory=BlocklistSettings)

    @field_validator("listen")
    @classmethod
    def _listen(cls, entries: list[str]) -> list[str]:
        if not entries:
            raise ValueError("at least one listen address is needed")
        return [listen_entry(entry) for entry in entries]

    @field_validator("checks")
    @classmethod
    def _no_repeats(cls, checks: list[str]) -> list[str]:
        if not checks:
            raise ValueError('at least one check is needed (an empty list would answer DUNNO to everything), '
                             'e.g. ["access", "greylist"]')
        if len(checks) != len(set(checks)):
            raise ValueError("a check may appear only once")
        return checks

    @model_validator(mode="after")
    def _sources_configured(self) -> PolicydSettings:
        if "recipients" in self.checks and (missing := self.recipients.missing()):
            raise ValueError(missing)
        if "quota" in self.checks and (missing := self.quota.missing()):
            raise ValueError(missing)
        if self.ratelimit.ldap_attribute and not self.recipients.ldap.servers:
            raise ValueError("ratelimit.ldap_attribute is read through [policyd.recipients.ldap]: set its servers")
        return self

    def fail_modes(self, dependency: str) -> FailModes:
        if dependency in self.on_error:
            return self.on_error[dependency]
        if dependency in ("ldap", "sql", "file"):
            return FailModes(inbound="defer_if_permit", authenticated="defer_if_permit")
        return FailModes()
