"""``mailwarden phish serve``: one uvicorn server on up to two sockets. On ``[phishhook] listen``: Dovecot's
auth policy endpoint (``/policy``), the login intake (``/login``), ``/metrics`` and ``/health``; on
``[phishhook.review] listen``: the review page. A request is routed by the socket it came in on, so the
review page is never reachable on the policy address and the reverse.

uvicorn owns SIGTERM/SIGINT (it stops accepting and lets requests in flight finish); then the action worker
drains (bounded) and the stores close.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from mailwarden.listen import ListenError
from mailwarden.logs import get_logger, log_kv
from mailwarden.service import sd_notify
from phishhook.authpolicy import dovecot_endpoint
from phishhook.detector import Detector
from phishhook.intake import intake_endpoint
from phishhook.ratelimit_signal import RateLimitWatcher
from quarantine.store import QuarantineStore, split_host_port

log = get_logger("phishhook")


def bind(listen: str, listener: str) -> socket.socket:
    host, port = split_host_port(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ListenError(listen, exc, listener=listener) from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


def policy_routes(detector: Detector) -> list[Any]:
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    async def health(_request: Any) -> Response:
        return PlainTextResponse("ok\n")

    async def metrics(_request: Any) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    settings = detector.settings
    return [Route("/policy", dovecot_endpoint(detector, settings.dovecot), methods=["POST"]),
            Route("/login", intake_endpoint(detector, settings.intake), methods=["POST"]),
            Route("/metrics", metrics), Route("/health", health)]


class PortDispatcher:
    """An ASGI app that hands each request to the app of the port it came in on."""

    def __init__(self, apps: dict[int, Any], lifespan_app: Any) -> None:
        self.apps = apps
        self.lifespan_app = lifespan_app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan_app(scope, receive, send)
            return
        server = scope.get("server") or ("", 0)
        app = self.apps.get(int(server[1]))
        if app is None:  # a port we did not bind: cannot happen, answer safely
            from starlette.responses import PlainTextResponse

            await PlainTextResponse("not found\n", status_code=404)(scope, receive, send)
            return
        await app(scope, receive, send)


def build_asgi(detector: Detector, ports: dict[str, int], watcher: RateLimitWatcher | None = None,
               quarantine: QuarantineStore | None = None) -> Any:
    from starlette.applications import Starlette

    def reload() -> None:  # Apple's full relay list takes a second or two of CPU: off the event loop
        threading.Thread(target=detector.parts.classifier.reload, name="phish-reload", daemon=True).start()

    @asynccontextmanager
    async def lifespan(_app: Any) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGHUP, reload)
        if watcher is not None:
            watcher.start()
        log_kv(log, logging.INFO, "phishhook serving", **{name: port for name, port in ports.items()})
        sd_notify("READY=1")
        yield
        sd_notify("STOPPING=1")
        if watcher is not None:
            await asyncio.to_thread(watcher.stop)

    policy = Starlette(routes=policy_routes(detector))
    apps = {ports["policy"]: policy}
    if "review" in ports:
        from phishhook.review.web import review_app

        apps[ports["review"]] = review_app(detector, quarantine)
    return PortDispatcher(apps, Starlette(lifespan=lifespan))


def serve(detector: Detector, watcher: RateLimitWatcher | None = None,
          quarantine: QuarantineStore | None = None) -> None:
    import uvicorn

    settings = detector.settings
    sockets = [bind(settings.listen, "the phishhook service, [phishhook] listen")]
    ports = {"policy": sockets[0].getsockname()[1]}
    if settings.review.listen:
        sockets.append(bind(settings.review.listen, "the review page, [phishhook.review] listen"))
        ports["review"] = sockets[1].getsockname()[1]
    # proxy_headers off: uvicorn would otherwise take the client address from X-Forwarded-For of any request
    # from 127.0.0.1; the review page believes a proxy's headers only from [phishhook.review] trusted_proxies
    config = uvicorn.Config(build_asgi(detector, ports, watcher, quarantine), lifespan="on", log_config=None,
                            access_log=False, http="httptools", server_header=False, timeout_graceful_shutdown=10,
                            proxy_headers=False)
    try:
        uvicorn.Server(config).run(sockets=sockets)
    finally:
        detector.close()
        if quarantine is not None:
            quarantine.close()
