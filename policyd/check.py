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
from typing import TYPE_CHECKING, ClassVar

from mailwarden.backend import BackendError
from mailwarden.decision import Action
from mailwarden.logs import get_logger, log_kv
from policyd import metrics
from policyd.request import PolicyRequest
from policyd.verdict import DUNNO, PREPEND_PREFIX, TEMPFAIL, TEMPFAIL_STATUS, Verdict, defer, defer_if_permit

if TYPE_CHECKING:  # settings.py imports the check modules, which import this one
    from policyd.settings import PolicydSettings

log = get_logger("policyd.pipeline")

Hook = Callable[[PolicyRequest], Awaitable[Verdict | None]]

STAGE_HOOKS = {"RCPT": "on_rcpt", "END-OF-MESSAGE": "on_eom"}
"""Postfix protocol_state -> the hook a check implements for it."""

ALL_CHECKS = "*"
"""In ``request.skip``: every remaining check is skipped (an access rule's ``permit``)."""

TEMPFAIL_TEXT = "Temporary local problem, please try again later"


class Check:
    name: ClassVar[str]
    dependency: ClassVar[str | None] = "redis"
    """The backend whose failure this check's fail mode covers."""

    def start(self) -> None:
        """Called once the event loop runs (watchers, connections); the default does nothing."""

    def stop(self) -> None:
        """Called on shutdown."""

    def reload(self) -> None:
        """SIGHUP: re-read files; keep the old state and log why when they are broken."""


@dataclass(slots=True)
class Outcome:
    """The pipeline's answer for one request, with what the log line needs."""

    verdict: Verdict
    check: str
    timings: list[tuple[str, float]] = field(default_factory=list)
    degraded: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the checks before the deciding one found (``dnsbl: score 1 below 2``), for the log line."""
    fail_mode: tuple[str, str] | None = None
    """(dependency, mode) of the first check answered in its dependency's fail mode, or of the time bound;
    counted once per answer in ``mailwarden_policyd_fail_mode_total`` when the answer is sent."""


def fail_verdict(settings: PolicydSettings, dependency: str, request: PolicyRequest, why: str) -> Verdict:
    """The configured answer when ``dependency`` failed for this request."""
    modes = settings.fail_modes(dependency)
    mode = modes.authenticated if request.authenticated else modes.inbound
    reason = f"{why}; fail mode {mode}"
    if mode == "dunno":
        return Verdict(Action.FAIL_OPEN, reason, DUNNO, decisive=False)
    if mode == "defer_if_permit":
        return Verdict.refuse(Action.DEFER, reason, defer_if_permit(f"{TEMPFAIL_STATUS} {TEMPFAIL_TEXT}"))
    return Verdict.refuse(Action.DEFER, reason, defer(TEMPFAIL_TEXT, TEMPFAIL))


def failed_dependency(check: Check, exc: BackendError) -> str:
    """The dependency whose fail mode covers ``exc`` raised in ``check``."""
    return exc.backend if exc.backend != "backend" else (check.dependency or "backend")


class Pipeline:
    def __init__(self, settings: PolicydSettings, checks: list[Check]) -> None:
        self.settings = settings
        self.hooks: dict[str, list[tuple[Check, Hook]]] = {}
        for state, method in STAGE_HOOKS.items():
            self.hooks[state] = [(check, getattr(check, method)) for check in checks if hasattr(check, method)]
        self._last_error_log: dict[str, float] = {}
        self._latency = {check.name: metrics.HOT.check_buckets(check.name) for check in checks}

    async def decide(self, request: PolicyRequest) -> Outcome:
        outcome = Outcome(Verdict.accept("no check objected"), "none")
        headers: list[Verdict] = []
        for check, hook in self.hooks.get(request.protocol_state, ()):
            if request.skip and (check.name in request.skip or ALL_CHECKS in request.skip):
                continue
            started = time.perf_counter()
            request.waiting_on = check.dependency or "redis"
            try:
                verdict = await hook(request)
            except BackendError as exc:
                verdict = self._backend_failed(check, request, exc)
                outcome.degraded.append(check.name)
                if outcome.fail_mode is None:
                    outcome.fail_mode = (failed_dependency(check, exc), verdict.action.value)
            elapsed = time.perf_counter() - started
            outcome.timings.append((check.name, elapsed))
            self._latency[check.name].observe(elapsed)
            if verdict is None:
                continue
            if outcome.check != "none":
                outcome.notes.append(f"{outcome.check}: {outcome.verdict.reason}")
            outcome.verdict, outcome.check = verdict, check.name
            if verdict.decisive:
                # headers found for this recipient still belong to the message if a later recipient is taken
                request.transaction.pending_headers.extend(h.reply for h in headers)
                return outcome
            if verdict.reply.startswith(PREPEND_PREFIX):
                headers.append(verdict)
        return self._with_header(request, outcome, headers)

    @staticmethod
    def _with_header(request: PolicyRequest, outcome: Outcome, headers: list[Verdict]) -> Outcome:
        """Postfix takes one action per answer, so one PREPEND: the first now, the others kept for the next
        answers of the same transaction (a later RCPT, or DATA when check_policy_service is in
        smtpd_data_restrictions)."""
        pending = request.transaction.pending_headers
        pending.extend(verdict.reply for verdict in headers)
        if not pending:
            return outcome
        reply = pending.pop(0)
        current = outcome.verdict
        outcome.verdict = Verdict(current.action, current.reason, reply, decisive=False)
        return outcome

    def _backend_failed(self, check: Check, request: PolicyRequest, exc: BackendError) -> Verdict:
        """Counted per failed check in ``backend_errors``; the answer is counted in ``fail_mode`` once sent."""
        dependency = failed_dependency(check, exc)
        metrics.BACKEND_ERRORS.labels(dependency, check.name).inc()
        self._log_backend_error(dependency, check.name, exc)
        return fail_verdict(self.settings, dependency, request, f"{dependency} failed: {exc}")

    def _log_backend_error(self, dependency: str, check: str, exc: Exception) -> None:
        """At most one error line per dependency a second: an outage must not flood the log."""
        now = time.monotonic()
        if now - self._last_error_log.get(dependency, 0.0) >= 1.0:
            self._last_error_log[dependency] = now
            log_kv(log, logging.ERROR, "backend failed; applying fail mode", backend=dependency, check=check,
                   error=str(exc))
