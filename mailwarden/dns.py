"""DNS for every capability: which nameservers to ask (configurable, so tests and sites can point at their
own), with what time limits, and resolvers built from that for aiodns (pydnsbl) and dnspython (pyspf)."""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from pydantic import Field, field_validator

from mailwarden.section import Section
from mailwarden.units import Duration


class DnsSettings(Section):
    nameservers: list[str] = []
    """IP addresses of the resolvers to ask; empty means the system's (/etc/resolv.conf)."""
    port: Annotated[int, Field(ge=1, le=65535)] = 53
    """Port of those nameservers (one port for all of them)."""
    timeout: Duration = 1.0
    """Time for one query before it counts as failed."""
    tries: Annotated[int, Field(ge=1, le=5)] = 1

    @field_validator("nameservers")
    @classmethod
    def _addresses(cls, nameservers: list[str]) -> list[str]:
        for server in nameservers:
            try:
                ipaddress.ip_address(server)
            except ValueError:
                raise ValueError(f"{server!r} is not an IP address (a nameserver is given by address)") from None
        return nameservers


def aiodns_resolver(settings: DnsSettings) -> Any:
    """An aiodns (c-ares) resolver asking the configured nameservers; call it inside the event loop."""
    import aiodns

    kwargs: dict[str, Any] = {"timeout": settings.timeout, "tries": settings.tries}
    if settings.nameservers:
        kwargs.update(nameservers=settings.nameservers, udp_port=settings.port, tcp_port=settings.port)
    return aiodns.DNSResolver(**kwargs)


def dnspython_resolver(settings: DnsSettings) -> Any:
    """A dnspython resolver asking the configured nameservers (used by pyspf through the module default)."""
    import dns.resolver

    resolver = dns.resolver.Resolver(configure=not settings.nameservers)
    if settings.nameservers:
        resolver.nameservers = list(settings.nameservers)
        resolver.port = settings.port
    resolver.timeout = settings.timeout
    resolver.lifetime = settings.timeout * settings.tries
    return resolver
