"""Service lifecycle shared by every daemon: uvloop, signals, systemd readiness, bounded drain."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
from collections.abc import Coroutine
from typing import Any

from mailwarden.capability import Service
from mailwarden.logs import get_logger, log_kv
from mailwarden.reload import ConfigReloader

log = get_logger("service")


def sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) about READY=1 / STOPPING=1; a no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as exc:
        log_kv(log, logging.WARNING, "could not notify systemd", error=str(exc))


NR_OPEN = "/proc/sys/fs/nr_open"
"""The kernel's ceiling for RLIMIT_NOFILE, used when the hard limit is unlimited."""


def raise_open_files_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (systemd's LimitNOFILE=, ``ulimit -Hn``) and return the
    soft limit in force. setrlimit is called only when the soft limit is lower: the unit sets both alike, and
    its system-call filter (~@resources) would not let setrlimit through."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open(NR_OPEN) as file:
                target = int(file.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            log_kv(log, logging.WARNING, "could not raise the open files limit", soft=soft, hard=hard, error=str(exc))
            return soft
        log_kv(log, logging.INFO, "open files limit raised", soft=soft, to=target)
        return target
    return soft


async def run_until_signalled(services: dict[str, Service], reloader: ConfigReloader | None = None) -> None:
    """Start every service, report ready, wait for SIGTERM/SIGINT, then stop them (each bounds its time).
    SIGHUP reads the config file again when there is a ``reloader``, and re-reads the services' files."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, _reload_all, services, reloader)
    started: list[tuple[str, Service]] = []
    try:
        for name, service in services.items():
            started.append((name, service))  # stopped too if its start fails half-way (listeners, Redis)
            await service.start()
        sd_notify("READY=1")
        log_kv(log, logging.INFO, "ready", services=",".join(services), pid=os.getpid())
        await stopping.wait()
    finally:
        sd_notify("STOPPING=1")
        log_kv(log, logging.INFO, "stopping", services=",".join(name for name, _ in started))
        for _name, service in reversed(started):
            await service.stop()


def _reload_all(services: dict[str, Service], reloader: ConfigReloader | None = None) -> None:
    log_kv(log, logging.INFO, "SIGHUP: reloading", services=",".join(services))
    config = reloader.reread() if reloader is not None else None
    for name, service in services.items():
        try:
            if config is not None:
                service.reconfigure(config)
            else:
                service.reload()
        except Exception:
            log.exception("reload failed; the service keeps its previous state", extra={"kv": {"service": name}})


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run ``main`` on uvloop where it is installed (measurably faster), else on asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
