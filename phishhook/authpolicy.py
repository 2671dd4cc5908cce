"""Dovecot's auth policy interface (``auth_policy_server_url``): IMAP and POP3 logins.

Dovecot POSTs JSON to ``/policy?command=allow`` before authentication (and again after it, with
``auth_policy_check_after_auth``) and to ``/policy?command=report`` once it knows the result. ``allow`` is
answered from the block list (one MGET): a blocked account or address gets ``{"status": -1}`` and Dovecot
refuses the login with our text; anything else ``{"status": 0}``. ``report`` feeds the detector: a success
is a login (geo-velocity), a failure is counted (brute force).

The client address is the request's ``remote`` (Dovecot's ``%{rip}``): the originating address a proxy
passed with IMAP ID ``x-originating-ip`` when the proxy is in ``login_trusted_networks``, else the
connection's own. Dovecot fails open by itself when we are down (``auth_policy_reject_on_fail = no``, its
default): the README's Dovecot snippet sets a short timeout so logins go on without us.

A request we cannot read (not JSON, no login) is answered 400 with a reason and logged; Dovecot then applies
its own fail setting. The endpoint never says why beyond the configured text.
"""

from __future__ import annotations

import hmac
import json
import time
from typing import TYPE_CHECKING, Any

from mailwarden.logs import Throttled, get_logger
from mailwarden.section import Section
from phishhook import metrics
from phishhook.events import BadEvent, LoginEvent, normalise_address, normalise_service, normalise_user

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from phishhook.detector import Detector

log = get_logger("phishhook")
bad_requests = Throttled(log, 30, "bad Dovecot auth policy request")

MAX_BODY = 64 * 1024
"""Bytes of a request body read: Dovecot's are a few hundred."""


class DovecotSettings(Section):
    """``[phishhook.dovecot]``: the endpoint Dovecot's ``auth_policy_server_url`` points at (``/policy`` on
    ``[phishhook] listen``)."""

    api_header: str | None = None
    """Exactly Dovecot's ``auth_policy_server_api_header`` (``X-API-Key: a-long-secret``): requests without
    it are refused (401). Unset: no check (only sensible when ``listen`` is a loopback address)."""
    refuse_text: str = "Your account has been blocked for security reasons; please contact the help desk"
    """What Dovecot shows a refused client (``[ALERT] ...``): no rule, no reason."""

    def header(self) -> tuple[str, str] | None:
        if not self.api_header:
            return None
        name, _, value = self.api_header.partition(":")
        return name.strip().lower(), value.strip()


def dovecot_endpoint(detector: Detector, settings: DovecotSettings) -> Any:
    """The Starlette endpoint for ``POST /policy``."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    expected = settings.header()

    async def policy(request: Request) -> Response:
        started = time.monotonic()
        command = request.query_params.get("command", "")
        if expected is not None:
            given = request.headers.get(expected[0], "")
            if not hmac.compare_digest(given.encode(), expected[1].encode()):
                metrics.AUTH_POLICY.labels(command or "none", "unauthorised").inc()
                return _bad(401, "missing or wrong API header", request)
        if command not in ("allow", "report"):
            metrics.AUTH_POLICY.labels("none", "bad").inc()
            return _bad(400, "command must be allow or report", request)
        body = await request.body()
        try:
            fields = _fields(body)
            user = normalise_user(fields.get("login"))
            address = normalise_address(fields.get("remote", ""))
        except BadEvent as exc:
            metrics.AUTH_POLICY.labels(command, "bad").inc()
            return _bad(400, str(exc), request)
        if command == "allow":
            refused = await run_in_threadpool(detector.blocked, user, address)
            result = "refused" if refused else "allowed"
            metrics.AUTH_POLICY.labels(command, result).inc()
            metrics.AUTH_POLICY_SECONDS.labels(command).observe(time.monotonic() - started)
            if refused:
                return JSONResponse({"status": -1, "msg": settings.refuse_text})
            return JSONResponse({"status": 0, "msg": ""})
        success = fields.get("success") is True and fields.get("policy_reject") is not True
        event = LoginEvent(user=user, address=address, at=detector.now(), success=success,
                           service=normalise_service(fields.get("protocol")), via="dovecot",
                           session=str(fields.get("session_id", ""))[:64])
        await run_in_threadpool(detector.login if success else detector.failed_login, event)
        metrics.AUTH_POLICY.labels(command, "success" if success else "failure").inc()
        metrics.AUTH_POLICY_SECONDS.labels(command).observe(time.monotonic() - started)
        return JSONResponse({"status": 0, "msg": ""})

    return policy


def _fields(body: bytes) -> dict[str, Any]:
    if len(body) > MAX_BODY:
        raise BadEvent(f"body larger than {MAX_BODY} bytes")
    try:
        fields = json.loads(body or b"")
    except (ValueError, UnicodeDecodeError):
        raise BadEvent("body is not JSON") from None
    if not isinstance(fields, dict):
        raise BadEvent("body is not a JSON object")
    if "remote" not in fields:
        raise BadEvent("no remote address (auth_policy_request_attributes must include remote=%{rip})")
    return fields


def _bad(status: int, reason: str, request: Request) -> Response:
    from starlette.responses import JSONResponse

    client = request.client.host if request.client else "-"
    bad_requests.hit(reason, client=client, reason=reason)
    return JSONResponse({"status": 0, "msg": "", "error": reason}, status_code=status)
