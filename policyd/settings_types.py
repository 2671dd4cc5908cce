"""Value types and validators that the settings models of several checks share: check names, networks,
reply-text templates, listen addresses. Each check's own settings model sits at the top of
its check's module; policyd/settings.py assembles them into the ``[policyd]`` section."""

from __future__ import annotations

import ipaddress
import string
from typing import Annotated, Literal

from pydantic import PlainValidator

CheckName = Literal["access", "blocklist", "ratelimit", "dnsbl", "spf", "recipients", "quota", "greylist"]


def check_template(text: str, allowed: set[str], one_line: bool = True) -> str:
    """The one check of every str.format text (reply texts, notice subjects and bodies): only the
    placeholders the code fills in, so a typo fails at start-up instead of at the first refusal."""
    try:
        fields = [field for _literal, field, _spec, _conv in string.Formatter().parse(text) if field is not None]
    except ValueError as exc:  # a lone "{" or "}": write "{{" or "}}" for a brace
        raise ValueError(f"{exc}; write {{{{ or }}}} for a literal brace") from None
    for field in fields:
        if field not in allowed:
            raise ValueError(f"unknown placeholder {{{field}}}; allowed: {', '.join(sorted(allowed))}")
    if one_line and ("\n" in text or "\r" in text):
        raise ValueError("a reply text or subject must be one line")
    return text


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def _network(value: object) -> IPNetwork:
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return value
    if not isinstance(value, str):
        raise ValueError('expected a network as a string, e.g. "192.0.2.0/24" or "2001:db8::/32"')
    try:
        return ipaddress.ip_network(value.strip())
    except ValueError as exc:
        raise ValueError(f"not a network: {exc}") from None


Network = Annotated[IPNetwork, PlainValidator(_network)]
"""An IPv4 or IPv6 network (a bare address is a /32 or /128); a bad one is one error, not one per IP
version."""


def listen_entry(entry: str) -> str:
    """A socket address: HOST:PORT, [IPV6]:PORT or unix:/path (where policyd listens, an SMTP relay)."""
    if entry.startswith("unix:"):
        if not entry[5:].startswith("/"):
            raise ValueError(f"{entry!r}: a unix socket needs an absolute path, e.g. unix:/run/mailwarden/policyd.sock")
        return entry
    host, _, port = entry.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{entry!r}: expected HOST:PORT, [IPV6]:PORT or unix:/path")
    return entry
