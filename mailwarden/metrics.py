"""Prometheus metrics on an optional HTTP port.

Metric objects live in the module of the capability that owns them (``policyd/metrics.py`` ...); the
core only serves the registry.
"""

from __future__ import annotations

import prometheus_client

from mailwarden.section import Section


class MetricsSettings(Section):
    listen: str | None = None
    """host:port of the /metrics HTTP endpoint, e.g. "127.0.0.1:9745"; unset means no endpoint."""


def start_metrics_server(settings: MetricsSettings) -> None:
    if not settings.listen:
        return
    host, _, port = settings.listen.rpartition(":")
    prometheus_client.start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1")
