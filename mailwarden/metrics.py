"""Prometheus metrics on an optional HTTP port.

Metric objects live in the module of the capability that owns them (``policyd/metrics.py`` ...); the
core only serves the registry.
"""

from __future__ import annotations

import prometheus_client
from pydantic import field_validator

from mailwarden.listen import ListenError
from mailwarden.section import Section


class MetricsSettings(Section):
    listen: str | None = None
    """host:port of the /metrics HTTP endpoint, e.g. "127.0.0.1:9745" or "[::1]:9745" (the host is
    needed: "0.0.0.0:9745" to listen everywhere); unset means no endpoint."""

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, listen: str | None) -> str | None:
        if listen is None:
            return None
        host, _, port = listen.rpartition(":")
        if not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError('expected HOST:PORT or [IPV6]:PORT, e.g. "127.0.0.1:9745"')
        return listen


def start_metrics_server(settings: MetricsSettings) -> None:
    if not settings.listen:
        return
    host, _, port = settings.listen.rpartition(":")
    try:
        prometheus_client.start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1")
    except OSError as exc:
        raise ListenError(settings.listen, exc, listener="the metrics listener, [metrics] listen",
                          in_use_by="another mailwarden service, or another exporter: "
                                    f"ss -ltnp 'sport = :{port}' shows which") from None
