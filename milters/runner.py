"""Running one milter process: bind its socket, report ready, serve until SIGTERM.

libmilter (under pymilter) owns the process: its own worker threads call the callbacks, and its signal
thread takes SIGTERM/SIGINT (stop accepting, let the connections in flight finish) and SIGHUP (re-open the
listening socket). So the asyncio lifecycle of ``mailwarden run`` does not apply: a milter is a process of
its own (``mailwarden milter NAME``), one per milter, because libmilter serves one milter per process.
"""

from __future__ import annotations

import logging
import os
import signal

import Milter
import milter

from mailwarden.listen import ListenError
from mailwarden.logs import get_logger, log_kv
from mailwarden.metrics import MetricsSettings, start_metrics_server
from mailwarden.service import sd_notify
from milters.base import ACTIONS, MilterApp, install
from milters.settings import MilterSettings, libmilter_socket

log = get_logger("milter")

STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}


def bind(name: str, settings: MilterSettings) -> str:
    """Open the listening socket now, so a port in use or a missing directory is an error at start-up
    (exit 69/77/78 with the reason) rather than inside libmilter's loop; return libmilter's address."""
    address = libmilter_socket(settings.listen)
    if address.startswith("unix:"):
        directory = os.path.dirname(address[5:])
        if not os.path.isdir(directory):
            raise ListenError(settings.listen, FileNotFoundError(2, f"directory {directory} does not exist"),
                              listener=f"the {name} milter, [milters.{name}] listen")
    milter.set_flags(ACTIONS)
    milter.setconn(address)
    milter.register(name)
    try:
        milter.opensocket(True)
    except milter.error as exc:
        port = settings.listen.rpartition(":")[2]
        raise ListenError(settings.listen, OSError(98, f"cannot listen: {exc}"),
                          listener=f"the {name} milter, [milters.{name}] listen",
                          in_use_by=f"another process: ss -ltnp 'sport = :{port}' shows which") from None
    if address.startswith("unix:"):
        # libmilter leaves the socket to the umask; Postfix (another user) must be able to write to it
        os.chmod(address[5:], int(settings.socket_mode, 8))
    return address


def serve(app: MilterApp, settings: MilterSettings, metrics: MetricsSettings) -> None:
    """Serve Postfix until SIGTERM; returns once libmilter has stopped and the checks are closed."""
    # Only libmilter's signal thread may take the stop signals: a thread started before it (the metrics
    # endpoint) would otherwise receive SIGTERM with Python's default action, and the process would die
    # with messages in flight instead of finishing them.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        address = bind(app.name, settings)
        start_metrics_server(metrics)
        install(app)
        sd_notify("READY=1")
        log_kv(log, logging.INFO, "ready", milter=app.name, listen=settings.listen, pid=os.getpid(),
               checks=",".join(check.name for check in app.checks))
        Milter.runmilter(app.name, address, timeout=int(settings.timeout))
    finally:
        sd_notify("STOPPING=1")
        log_kv(log, logging.INFO, "stopping", milter=app.name)
        app.close()
