"""The check interface and the pipeline that runs checks in the configured order.

A check implements only the stages it needs (``on_rcpt``, ``on_eom``); the pipeline collects those hooks
once at start-up. The first decisive verdict (reject, defer) wins. A check whose dependency fails
gets its dependency's fail mode for this class of client: ``dunno`` skips that check (fail open),
``defer``/``defer_if_permit`` answer with a temporary failure.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from mailwarden.backend import BackendError
from mailwarden.decision import Action
from mailwarden.logs import get_logger, log_kv
from mailwarden.redis_guard import Guard, GuardTripped
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
perf_counter = time.perf_counter  # looked up once: the pipeline reads the clock twice per check


class Check:
    name: ClassVar[str]
    dependency: ClassVar[str | None] = "redis"
    """The backend whose failure this check's fail mode covers."""
    carries_reads: ClassVar[bool] = False
    """Its Redis script takes a guard (``request.take_guard()``): the reads an earlier check deferred ride
    on it, one round trip for both (mailwarden/redis_guard.py)."""

    def start(self) -> None:
        """Called once the event loop runs (watchers, connections); the default does nothing."""

    def stop(self) -> None:
        """Called on shutdown."""

    def reload(self) -> None:
        """SIGHUP: re-read files; keep the old state and log why when they are broken."""


class DeferringCheck(Check, ABC):
    """A check at RCPT that only reads Redis, and can have its read carried by a later check's script.

    ``rcpt_read`` says which keys it needs and what it expects of each (expected: nothing to object to);
    ``rcpt_judge`` decides from what the keys hold. Its ``on_rcpt`` is both with a read of its own (used
    when no later check can carry the read). A judge answers None or a decisive verdict."""

    @abstractmethod
    def rcpt_read(self, request: PolicyRequest) -> Guard | None:
        """The keys to read and what each is expected to hold, or None when there is nothing to read."""

    @abstractmethod
    async def rcpt_check(self, request: PolicyRequest, read: Guard) -> Verdict | None:
        """Read the keys with a Redis call of its own, then judge."""

    @abstractmethod
    async def rcpt_judge(self, request: PolicyRequest, read: Guard, found: list[bytes | None]) -> Verdict | None:
        """The verdict from what the keys hold (``found``, in ``read.keys``'s order)."""

    async def on_rcpt(self, request: PolicyRequest) -> Verdict | None:
        read = self.rcpt_read(request)
        return None if read is None else await self.rcpt_check(request, read)


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


NO_OBJECTION = Verdict.accept("no check objected")


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


@dataclass(slots=True, frozen=True)
class _Step:
    """A check in the pipeline, with what the hot loop needs of it looked up once."""

    check: Check
    hook: Hook
    defers: bool
    """A DeferringCheck whose next check carries reads: its read waits for that check's script."""
    carries: bool
    name: str
    waits_on: str
    """What ``request.waiting_on`` says while it runs (its dependency)."""
    latency: metrics.Buckets | None
    """Its histogram in ``mailwarden_policyd_check_seconds``, with ``check_histograms`` on."""


@dataclass(slots=True)
class _Deferred:
    """A read a check deferred, with the outcome as it stood right after that check (to decide in its place
    if the read finds something)."""

    check: DeferringCheck
    read: Guard
    verdict: Verdict
    decided_by: str
    timings: int
    degraded: int
    notes: int
    headers: int
    fail_mode: tuple[str, str] | None


class Pipeline:
    """Runs the checks in order; the first decisive verdict wins.

    One Redis round trip for the default checks: a DeferringCheck (the block list) followed by a check
    that carries reads (rate limit, greylist) does not read on its own; its keys ride as a guard on the
    next script (mailwarden/redis_guard.py). The order of the checks holds all the same: a script whose
    guard finds a block does not run, and the block list decides as if it had read first; its read is made
    on its own (as before) when no carrier made a Redis call, before any other check runs and before a
    carrier's refusal counts."""

    def __init__(self, settings: PolicydSettings, checks: list[Check]) -> None:
        self.settings = settings
        self.hooks: dict[str, list[_Step]] = {}
        for state, method in STAGE_HOOKS.items():
            here = [check for check in checks if hasattr(check, method)]
            self.hooks[state] = [
                _Step(check, getattr(check, method),
                      state == "RCPT" and isinstance(check, DeferringCheck) and index + 1 < len(here)
                      and here[index + 1].carries_reads,
                      check.carries_reads, check.name, check.dependency or "redis",
                      metrics.HOT.check_buckets(check.name) if settings.check_histograms else None)
                for index, check in enumerate(here)
            ]
        self._last_error_log: dict[str, float] = {}

    async def decide(self, request: PolicyRequest) -> Outcome:
        outcome = Outcome(NO_OBJECTION, "none")
        headers: list[Verdict] = []
        deferred: list[_Deferred] = []
        for step in self.hooks.get(request.protocol_state, ()):
            if request.skip and (step.name in request.skip or ALL_CHECKS in request.skip):
                continue
            if (deferred and not (step.carries or step.defers)
                    and await self._settle(request, deferred, None, outcome, headers)):
                return outcome
            check = step.check
            started = perf_counter()
            request.waiting_on = step.waits_on
            if step.defers:
                assert isinstance(check, DeferringCheck)
                read = check.rcpt_read(request)
                elapsed = perf_counter() - started
                outcome.timings.append((step.name, elapsed))
                if step.latency is not None:
                    step.latency.observe(elapsed)
                if read is not None:
                    deferred.append(_Deferred(check, read, outcome.verdict, outcome.check, len(outcome.timings),
                                              len(outcome.degraded), len(outcome.notes), len(headers),
                                              outcome.fail_mode))
                    request.guard = read if len(deferred) == 1 else Guard.combine([item.read for item in deferred])
                continue
            try:
                verdict = await step.hook(request)
            except GuardTripped as trip:
                if await self._settle(request, deferred, trip.found, outcome, headers):
                    return outcome
                verdict = await self._call(step, request, outcome)  # again, its guard judged and gone
            except BackendError as exc:
                # when the failed call carried the reads, they failed first
                if deferred and request.guard is None and self._deferred_failed(request, deferred, exc, outcome,
                                                                                headers):
                    return outcome
                verdict = self._failed(check, request, exc, outcome)
            else:
                if deferred and request.guard is None:
                    deferred.clear()  # carried, and every key held what was expected: nothing to object to
            elapsed = perf_counter() - started
            outcome.timings.append((step.name, elapsed))
            if step.latency is not None:
                step.latency.observe(elapsed)
            if verdict is None:
                continue
            if verdict.decisive and deferred and await self._settle(request, deferred, None, outcome, headers):
                return outcome  # a check before this one objects first
            if self._apply(request, outcome, headers, step.name, verdict):
                return outcome
        if deferred and await self._settle(request, deferred, None, outcome, headers):
            return outcome
        return self._with_header(request, outcome, headers)

    @staticmethod
    def _apply(request: PolicyRequest, outcome: Outcome, headers: list[Verdict], name: str,
               verdict: Verdict) -> bool:
        """Make ``verdict`` of check ``name`` the outcome; True when it ends the pipeline."""
        if outcome.check != "none":
            outcome.notes.append(f"{outcome.check}: {outcome.verdict.reason}")
        outcome.verdict, outcome.check = verdict, name
        if verdict.decisive:
            # headers found for this recipient still belong to the message if a later recipient is taken
            request.transaction.pending_headers.extend(h.reply for h in headers)
            return True
        if verdict.reply.startswith(PREPEND_PREFIX):
            headers.append(verdict)
        return False

    async def _call(self, step: _Step, request: PolicyRequest, outcome: Outcome) -> Verdict | None:
        try:
            return await step.hook(request)
        except BackendError as exc:
            return self._failed(step.check, request, exc, outcome)

    def _failed(self, check: Check, request: PolicyRequest, exc: BackendError, outcome: Outcome) -> Verdict:
        verdict = self._backend_failed(check, request, exc)
        outcome.degraded.append(check.name)
        if outcome.fail_mode is None:
            outcome.fail_mode = (failed_dependency(check, exc), verdict.action.value)
        return verdict

    async def _settle(self, request: PolicyRequest, deferred: list[_Deferred], found: list[bytes | None] | None,
                      outcome: Outcome, headers: list[Verdict]) -> bool:
        """Judge the deferred reads, in order, from ``found`` (what a tripped guard returned) or from reads
        of their own; True when one of them ends the pipeline. Leaves ``deferred`` empty and no guard."""
        request.guard = None
        items, offset = list(deferred), 0
        deferred.clear()
        for item in items:
            try:
                if found is None:
                    verdict = await item.check.rcpt_check(request, item.read)
                else:
                    size = len(item.read.keys)
                    verdict = await item.check.rcpt_judge(request, item.read, found[offset:offset + size])
                    offset += size
            except BackendError as exc:
                if self._late_failure(request, item, exc, outcome, headers):
                    return True
                continue
            if verdict is not None:
                assert verdict.decisive, "a deferred read answers None or a refusal"
                self._rewind(outcome, headers, item)
                return self._apply(request, outcome, headers, item.check.name, verdict)
        return False

    def _deferred_failed(self, request: PolicyRequest, deferred: list[_Deferred], exc: BackendError,
                         outcome: Outcome, headers: list[Verdict]) -> bool:
        """The script that carried the deferred reads failed: each deferring check failed first, in its
        place; True when its fail mode ends the pipeline."""
        request.guard = None
        items = list(deferred)
        deferred.clear()
        return any(self._late_failure(request, item, exc, outcome, headers) for item in items)

    def _late_failure(self, request: PolicyRequest, item: _Deferred, exc: BackendError, outcome: Outcome,
                      headers: list[Verdict]) -> bool:
        """A deferred read failed: the check's fail mode, recorded as if it had failed in its place."""
        verdict = self._backend_failed(item.check, request, exc)
        mode = (failed_dependency(item.check, exc), verdict.action.value)
        if verdict.decisive:
            self._rewind(outcome, headers, item)
            outcome.degraded.append(item.check.name)
            outcome.fail_mode = outcome.fail_mode or mode
            return self._apply(request, outcome, headers, item.check.name, verdict)
        outcome.degraded.insert(item.degraded, item.check.name)
        if item.fail_mode is None:
            outcome.fail_mode = mode
        if outcome.check == item.decided_by and len(outcome.notes) == item.notes:
            self._apply(request, outcome, headers, item.check.name, verdict)  # nothing decided after it
        else:  # a later check decided: this check's answer is a note before the later ones, as it would be
            outcome.notes.insert(item.notes + (item.decided_by != "none"), f"{item.check.name}: {verdict.reason}")
        return False

    @staticmethod
    def _rewind(outcome: Outcome, headers: list[Verdict], item: _Deferred) -> None:
        """The outcome as it stood right after ``item``'s check: it decides in its place."""
        outcome.verdict, outcome.check, outcome.fail_mode = item.verdict, item.decided_by, item.fail_mode
        del outcome.timings[item.timings:], outcome.degraded[item.degraded:], outcome.notes[item.notes:]
        del headers[item.headers:]

    @staticmethod
    def _with_header(request: PolicyRequest, outcome: Outcome, headers: list[Verdict]) -> Outcome:
        """Postfix takes one action per answer, so one PREPEND: the first now, the others kept for the next
        answers of the same transaction (a later RCPT, or DATA when check_policy_service is in
        smtpd_data_restrictions)."""
        pending = request.transaction.pending_headers
        if headers:
            pending.extend([verdict.reply for verdict in headers])
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
