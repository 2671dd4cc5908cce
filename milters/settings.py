"""Settings every milter process shares; each milter's own section (``[milters.clamav]`` ...) extends
them with its scanner's options."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import field_validator

from mailwarden.metrics import MetricsSettings
from mailwarden.section import Section
from mailwarden.units import Duration

ErrorFate = Literal["tempfail", "accept"]
"""What a check does with a message when its scanner cannot answer: 451 (the client retries), or pass it
with a header saying it was not scanned."""

_SOCKET = re.compile(r"^(?:unix:(?P<path>/\S+)|inet:(?P<host>\[[0-9a-fA-F:.]+\]|[\w.-]+):(?P<port>\d{1,5}))$")


def libmilter_socket(spec: str) -> str:
    """Postfix's form of a milter address (``inet:127.0.0.1:10030``, ``inet:[::1]:10030``,
    ``unix:/run/mailwarden/clamav.sock``) in libmilter's (``inet:10030@127.0.0.1``, ``inet6:10030@::1``,
    ``unix:/run/...``)."""
    match = _SOCKET.match(spec)
    if match is None:
        raise ValueError(f"{spec!r}: expected inet:HOST:PORT or unix:/PATH")
    if match["path"]:
        return spec
    host = match["host"]
    if host.startswith("["):
        return f"inet6:{match['port']}@{host.strip('[]')}"
    return f"inet:{match['port']}@{host}"


class MilterSettings(Section):
    listen: str
    """Where Postfix reaches this milter, in Postfix's own form (what ``smtpd_milters`` says):
    ``inet:127.0.0.1:10030`` or ``unix:/run/mailwarden/clamav.sock``."""
    checks: list[str]
    """The checks this milter runs at end of message, in order (the first rejection stops the rest)."""
    timeout: Duration = 600
    """How long libmilter waits on Postfix for one step before dropping the connection."""
    socket_mode: str = "0660"
    """Permissions of a unix socket (octal): Postfix must be able to write to it, so the group that both
    the milter's user and Postfix belong to (``adduser postfix mailwarden``) needs write access."""
    metrics_listen: str | None = None
    """host:port of this milter's own /metrics endpoint (each process needs a port of its own, so the
    core's ``[metrics] listen`` is policyd's); unset means none."""

    @field_validator("socket_mode")
    @classmethod
    def _mode(cls, mode: str) -> str:
        if not re.fullmatch(r"0?[0-7]{3}", mode):
            raise ValueError(f"{mode!r}: expected an octal mode such as \"0660\"")
        return mode

    @field_validator("metrics_listen")
    @classmethod
    def _metrics(cls, listen: str | None) -> str | None:
        return MetricsSettings(listen=listen).listen

    @field_validator("listen")
    @classmethod
    def _listen(cls, listen: str) -> str:
        libmilter_socket(listen)
        port = listen.rpartition(":")[2]
        if listen.startswith("inet:") and not 0 < int(port) < 65536:
            raise ValueError(f"port {port} out of range 1-65535")
        return listen
