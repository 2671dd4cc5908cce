"""The check interface and the pipeline that runs checks in the configured order.

A check implements only the stages it needs (``on_rcpt``, ``on_eom``); the pipeline collects those hooks
once at start-up. The first decisive verdict (reject, defer) wins. A check whose dependency fails
gets its dependency's fail mode for this class of client: ``dunno`` skips that check (fail open),
``defer``/``defer_if_permit`` answer with a temporary failure.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar

from mailwarden.decision import Action
from mailwarden.logs import get_logger, log_kv
from mailwarden.redis_pipe import RedisCommandError, RedisUnavailable
from policyd import metrics
from policyd.request import PolicyRequest
from policyd.settings import PolicydSettings
from policyd.verdict import DUNNO, Verdict, defer, defer_if_permit

log = get_logger("policyd.pipeline")

Hook = Callable[[PolicyRequest], Awaitable[Verdict | None]]

STAGE_HOOKS = {"RCPT": "on_rcpt", "END-OF-MESSAGE": "on_eom"}
"""Postfix protocol_state -> the hook a check implements for it."""

TEMPFAIL_TEXT = "Temporary local problem, please try again later"


class Check:
    name: ClassVar[str]
    dependency: ClassVar[str | None] = "redis"
    """The backend whose failure this check's fail mode covers."""


@dataclass(slots=True)
class Outcome:
    """The pipeline's answer for one request, with what the log line needs."""

    verdict: Verdict
    check: str
    timings: list[tuple[str, float]] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)


def fail_verdict(settings: PolicydSettings, dependency: str, request: PolicyRequest, why: str) -> Verdict:
    """The configured answer when ``dependency`` failed for this request."""
    modes = settings.fail_modes(dependency)
    mode = modes.authenticated if request.authenticated else modes.inbound
    reason = f"{why}; fail mode {mode}"
    if mode == "dunno":
        return Verdict(Action.FAIL_OPEN, reason, DUNNO, decisive=False)
    if mode == "defer_if_permit":
        return Verdict.refuse(Action.DEFER, reason, defer_if_permit(f"4.3.0 {TEMPFAIL_TEXT}"))
    return Verdict.refuse(Action.DEFER, reason, defer(TEMPFAIL_TEXT, "451 4.3.0"))


class Pipeline:
    def __init__(self, settings: PolicydSettings, checks: list[Check]) -> None:
        self.settings = settings
        self.hooks: dict[str, list[tuple[Check, Hook]]] = {}
        for state, method in STAGE_HOOKS.items():
            self.hooks[state] = [(check, getattr(check, method)) for check in checks if hasattr(check, method)]
        self._last_error_log: dict[str, float] = {}

    async def decide(self, request: PolicyRequest) -> Outcome:
        hooks = self.hooks.get(request.protocol_state)
        if not hooks:
            return Outcome(Verdict.accept(f"no check at {request.protocol_state or 'unknown'} stage"), "none")
        outcome = Outcome(Verdict.accept("no check objected"), "none")
        prepend: Verdict | None = None
        for check, hook in hooks:
            started = time.perf_counter()
            try:
                verdict = await hook(request)
            except (RedisUnavailable, RedisCommandError) as exc:
                dependency = check.dependency or "redis"
                metrics.BACKEND_ERRORS.labels(dependency, check.name).inc()
                self._log_backend_error(dependency, check.name, exc)
                verdict = fail_verdict(self.settings, dependency, request, f"{dependency} failed: {exc}")
                metrics.FAIL_MODE.labels(dependency, verdict.action.value).inc()
                outcome.degraded.append(check.name)
            outcome.timings.append((check.name, time.perf_counter() - started))
            if verdict is None:
                continue
            if verdict.decisive:
                outcome.verdict, outcome.check = verdict, check.name
                return outcome
            if prepend is None and verdict.reply.startswith("PREPEND "):
                prepend = verdict
                outcome.verdict, outcome.check = verdict, check.name
            elif prepend is None:
                outcome.verdict, outcome.check = verdict, check.name
        return outcome

    def _log_backend_error(self, dependency: str, check: str, exc: Exception) -> None:
        """At most one error line per dependency a second: an outage must not flood the log."""
        now = time.monotonic()
        if now - self._last_error_log.get(dependency, 0.0) >= 1.0:
            self._last_error_log[dependency] = now
            log_kv(log, logging.ERROR, "backend failed; applying fail mode", backend=dependency, check=check,
                   error=str(exc))
