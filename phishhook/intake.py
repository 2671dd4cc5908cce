"""The login intake for services that are neither Postfix nor Dovecot (webmail, a VPN portal, an SSO):
``POST /login`` on ``[phishhook] listen`` with a bearer token, or ``mailwarden phish login`` from a script.

Body (JSON): ``{"user": "alice", "address": "203.0.113.7", "success": true, "service": "webmail",
"at": 1764650000, "session": "..."}``; ``success`` defaults to true, ``service`` to ``webmail``, ``at`` (epoch
seconds) to now. An event more than five minutes in the future, or older than the history keeps, is refused:
it could not be judged against the right neighbours.
"""

from __future__ import annotations

import hmac
import json
import math
from typing import TYPE_CHECKING, Any

from mailwarden.section import Section
from phishhook import metrics
from phishhook.authpolicy import MAX_BODY
from phishhook.events import BadEvent, LoginEvent, normalise_address, normalise_service, normalise_user

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response

    from phishhook.detector import Detector, LoginOutcome

FUTURE_SLACK = 300.0
"""Seconds an event's ``at`` may lie ahead of our clock (the sender's clock drifts)."""


class IntakeSettings(Section):
    """``[phishhook.intake]``: who may post login events to ``/login``."""

    tokens: dict[str, str] = {}
    """Bearer tokens by the name of the service that uses each (``webmail = "a-long-random-secret"``); the
    name is logged with its events. None configured: ``/login`` refuses every request (403)."""


def parse_event(fields: Any, now: float, oldest: float, via: str) -> LoginEvent:
    """A login event from the intake's JSON (or the CLI's options); BadEvent says which field is wrong."""
    if not isinstance(fields, dict):
        raise BadEvent("body is not a JSON object")
    success = fields.get("success", True)
    if not isinstance(success, bool):
        raise BadEvent("success: expected true or false")
    at = fields.get("at", now)
    if isinstance(at, bool) or not isinstance(at, int | float) or not math.isfinite(at):
        raise BadEvent("at: expected epoch seconds")
    if at > now + FUTURE_SLACK:
        raise BadEvent("at: in the future")
    if at < oldest:
        raise BadEvent("at: older than the login history keeps")
    return LoginEvent(user=normalise_user(fields.get("user")), address=normalise_address(fields.get("address")),
                      at=float(at), success=success, service=normalise_service(fields.get("service", "webmail")),
                      via=via, session=str(fields.get("session", ""))[:64])


def outcome_json(outcome: LoginOutcome | None) -> dict[str, object]:
    if outcome is None:
        return {"ok": True, "judged": "failed login counted"}
    snag = outcome.snag
    return {"ok": True, "place": outcome.sighting.place.label() if outcome.sighting.place else None,
            "class": str(outcome.sighting.kind), "travel": outcome.travel.as_dict() if outcome.travel else None,
            "exempt": outcome.exempt or None, "snag": snag.public_id if snag else None}


def intake_endpoint(detector: Detector, settings: IntakeSettings) -> Any:
    """The Starlette endpoint for ``POST /login``."""
    from starlette.concurrency import run_in_threadpool
    from starlette.responses import JSONResponse

    async def login(request: Request) -> Response:
        token = request.headers.get("authorization", "")
        scheme, _, secret = token.partition(" ")
        name = next((name for name, expected in settings.tokens.items()
                     if scheme.lower() == "bearer" and hmac.compare_digest(secret.strip().encode(), expected.encode())),
                    None)
        if name is None:
            metrics.INTAKE.labels("unauthorised").inc()
            text = "no intake tokens are configured" if not settings.tokens else "missing or wrong bearer token"
            return JSONResponse({"ok": False, "error": text}, status_code=403 if not settings.tokens else 401)
        body = await request.body()
        try:
            if len(body) > MAX_BODY:
                raise BadEvent(f"body larger than {MAX_BODY} bytes")
            fields = json.loads(body or b"")
            now = detector.now()
            event = parse_event(fields, now, now - detector.settings.history.ttl, f"intake:{name}")
        except (ValueError, UnicodeDecodeError) as exc:
            metrics.INTAKE.labels("bad").inc()
            reason = str(exc) if isinstance(exc, BadEvent) else "body is not JSON"
            return JSONResponse({"ok": False, "error": reason}, status_code=400)
        if event.success:
            outcome = await run_in_threadpool(detector.login, event)
        else:
            await run_in_threadpool(detector.failed_login, event)
            outcome = None
        metrics.INTAKE.labels("accepted").inc()
        return JSONResponse(outcome_json(outcome))

    return login
