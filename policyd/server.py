"""The policy protocol server: many persistent connections, one request at a time on each.

Built on asyncio.Protocol callbacks rather than streams: on this machine kind that halves the CPU spent
per request (../shared/PERF-NOTES.md). Every request gets an answer within ``answer_within``: when the
pipeline has not decided by then (Redis hung, failing over), the fail mode of the dependency answers and
the late result is dropped. A peer that breaks the protocol, exceeds a limit or stalls is logged and
disconnected; nothing it does reaches the other connections.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import stat
import time
from dataclasses import dataclass
from typing import Any

from mailwarden.decision import Action, Decision, Stage
from mailwarden.listen import ListenError
from mailwarden.logs import DecisionLog, Throttled, get_logger, log_kv
from policyd import metrics
from policyd.check import Outcome, Pipeline, fail_verdict
from policyd.request import PolicyRequest, ProtocolError, RequestReader
from policyd.settings import PolicydSettings
from policyd.verdict import Verdict, defer_if_permit

log = get_logger("policyd.server")

_STAGES = {
    "RCPT": Stage.RCPT, "END-OF-MESSAGE": Stage.EOM, "DATA": Stage.DATA, "MAIL": Stage.MAIL,
    "CONNECT": Stage.CONNECT, "EHLO": Stage.HELO, "HELO": Stage.HELO,
}
DEADLINE_TICK = 0.05
"""How often requests are checked against ``answer_within``: answers in the fail mode come at most this late."""
INTERNAL_ERROR_TEXT = "4.3.0 Temporary local problem, please try again later"
POSTGREY_PORT = 10023
"""Where Debian's postgrey listens by default: the likely owner of our default address."""


@dataclass(slots=True)
class _InFlight:
    request: PolicyRequest
    started: float
    task: asyncio.Task[Outcome] | None = None
    answered: bool = False


class PolicyConnection(asyncio.Protocol):
    def __init__(self, server: PolicyServer, listener: str) -> None:
        self.server = server
        self.listener = listener
        self.reader = RequestReader(server.settings.max_line_bytes, server.settings.max_request_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.queue: collections.deque[dict[str, str]] = collections.deque()
        self.current: _InFlight | None = None
        self.last_activity = time.monotonic()
        self.partial_since: float | None = None
        self.instance = ""
        self.message: dict[str, object] = {}
        self.rcpt_number = 0

    # -- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  (uvloop's transports are not subclasses)
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else self.listener
        if len(self.server.connections) >= self.server.settings.max_connections:
            log_kv(log, logging.WARNING, "too many connections; refusing one", peer=self.peer,
                   max_connections=self.server.settings.max_connections)
            transport.close()
            return
        self.server.connections.add(self)
        metrics.CONNECTIONS.inc()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.server.connections:
            self.server.connections.discard(self)
            metrics.CONNECTIONS.dec()
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        self.last_activity = time.monotonic()
        try:
            requests = self.reader.feed(data)
        except ProtocolError as exc:
            self.protocol_error(str(exc))
            return
        self.partial_since = self.last_activity if self.reader.partial else None
        if requests:
            self.queue.extend(requests)
            if self.current is None:
                self._next()

    def eof_received(self) -> bool | None:
        if self.reader.partial:
            log_kv(log, logging.WARNING, "connection closed in the middle of a request", peer=self.peer)
        return None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    # -- requests -------------------------------------------------------------------------------

    def protocol_error(self, why: str) -> None:
        kind = why.split(" ", 1)[0].strip(":")
        metrics.PROTOCOL_ERRORS.labels(kind).inc()
        log_kv(log, logging.ERROR, "policy protocol error; closing connection", peer=self.peer, error=why)
        self.queue.clear()
        if self.transport:
            self.transport.close()

    def _next(self) -> None:
        if not self.queue or self.transport is None or self.transport.is_closing():
            self.current = None
            return
        request = PolicyRequest.from_attrs(self.queue.popleft())
        self._track_transaction(request)
        loop = asyncio.get_running_loop()
        flight = _InFlight(request, time.perf_counter())
        self.current = flight
        task = loop.create_task(self.server.pipeline.decide(request))
        flight.task = task
        task.add_done_callback(lambda done: self._decided(flight, done))

    def _track_transaction(self, request: PolicyRequest) -> None:
        """Give the request its transaction's scratch space, keyed by Postfix's ``instance``."""
        if not request.instance or request.instance != self.instance:
            self.instance = request.instance
            self.message = {}
            self.rcpt_number = 0
        if request.protocol_state == "RCPT":
            self.rcpt_number += 1
        request.message = self.message
        request.rcpt_number = max(self.rcpt_number, 1)

    def _decided(self, flight: _InFlight, task: asyncio.Task[Outcome]) -> None:
        if flight.answered:
            return  # answered at the time bound already
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            log.error("internal error deciding a request; answering with a temporary failure",
                      exc_info=exc, extra={"kv": {"peer": self.peer, "queue_id": flight.request.queue_id}})
            outcome = Outcome(Verdict.refuse(Action.DEFER, f"internal error: {type(exc).__name__}",
                                              defer_if_permit(INTERNAL_ERROR_TEXT)), "internal")
        else:
            outcome = task.result()
        self._answer(flight, outcome)

    def check_deadline(self, now: float) -> None:
        """Answer the request in flight in the fail mode once it has waited ``answer_within``."""
        flight = self.current
        if flight is not None and not flight.answered and now - flight.started >= self.server.settings.answer_within:
            self._timed_out(flight)

    def _timed_out(self, flight: _InFlight) -> None:
        if flight.answered:
            return
        metrics.TIMEOUTS.inc()
        bound = self.server.settings.answer_within
        dependency = flight.request.waiting_on
        self.server.late_answers.hit(answer_within=f"{bound:g}s", waiting_on=dependency)
        verdict = fail_verdict(self.server.settings, dependency, flight.request,
                               f"no decision within {bound:g}s (waiting on {dependency})")
        self._answer(flight, Outcome(verdict, "timeout", degraded=["timeout"],
                                     fail_mode=(dependency, verdict.action.value)))

    def _answer(self, flight: _InFlight, outcome: Outcome) -> None:
        flight.answered = True
        elapsed = time.perf_counter() - flight.started
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(f"action={outcome.verdict.reply}\n\n".encode())
        self.server.record(flight.request, outcome, elapsed)
        self.current = None
        if self.queue:
            self._next()


class PolicyServer:
    def __init__(self, settings: PolicydSettings, pipeline: Pipeline, decisions: DecisionLog) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.decisions = decisions
        self.connections: set[PolicyConnection] = set()
        self.servers: list[asyncio.Server] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._last_idle_sweep = 0.0
        self._decision_counters: dict[tuple[str, Action], Any] = {}
        self.late_answers = Throttled(log, logging.WARNING, "requests answered at the answer_within bound in the "
                                      "fail mode")
        """One warning line per interval while answers hit ``answer_within``, with how many did."""

    async def start(self, listen: list[str]) -> None:
        """Open every listener; raises ListenError (one line for the postmaster) when one cannot be opened."""
        for entry in listen:
            try:
                server = await self._listen(entry)
            except OSError as exc:
                raise ListenError(entry, exc, in_use_by=_in_use_by(entry)) from None
            self.servers.append(server)
            log_kv(log, logging.INFO, "policyd listening", listen=entry)
        self._sweeper = asyncio.get_running_loop().call_later(DEADLINE_TICK, self._sweep)

    async def _listen(self, entry: str) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        if entry.startswith("unix:"):
            path = entry[5:]
            if os.path.exists(path) and stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)  # stale socket of a previous run
            server = await loop.create_unix_server(lambda: PolicyConnection(self, entry), path)
            os.chmod(path, 0o666)  # noqa: S103 - Postfix's smtpd (another user) must connect
            return server
        host, _, port = entry.rpartition(":")
        return await loop.create_server(lambda: PolicyConnection(self, entry), host.strip("[]"), int(port),
                                        reuse_address=True, backlog=1024)

    def swap(self, settings: PolicydSettings, pipeline: Pipeline) -> None:
        """Use new settings and a new pipeline for the requests that start from now on (SIGHUP); a request
        in flight finishes with the pipeline it started with."""
        self.settings, self.pipeline = settings, pipeline

    def _sweep(self) -> None:
        """Every tick: answer requests past ``answer_within`` in the fail mode (one timer for all requests
        instead of one per request); every second: disconnect peers that stall or sit idle too long."""
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(DEADLINE_TICK, self._sweep)
        perf_now = time.perf_counter()
        for conn in list(self.connections):
            conn.check_deadline(perf_now)
        if loop.time() - self._last_idle_sweep < 1.0:
            return
        self._last_idle_sweep = loop.time()
        self.late_answers.flush()
        now = time.monotonic()
        for conn in list(self.connections):
            if conn.partial_since is not None and now - conn.partial_since > self.settings.request_timeout:
                metrics.PROTOCOL_ERRORS.labels("stalled").inc()
                log_kv(log, logging.WARNING, "client stalled inside a request; closing", peer=conn.peer,
                       after=f"{self.settings.request_timeout:g}s")
                conn.close()
            elif conn.current is None and now - conn.last_activity > self.settings.idle_timeout:
                conn.close()

    def record(self, request: PolicyRequest, outcome: Outcome, elapsed: float) -> None:
        verdict = outcome.verdict
        counter = self._decision_counters.get((outcome.check, verdict.action))
        if counter is None:
            counter = metrics.DECISIONS.labels(outcome.check, verdict.action.value)
            self._decision_counters[(outcome.check, verdict.action)] = counter
        counter.inc()
        if outcome.fail_mode is not None:
            metrics.FAIL_MODE.labels(*outcome.fail_mode).inc()
        metrics.LATENCY.observe(elapsed)
        if not self.decisions.enabled:
            return
        extra: dict[str, object] = {}
        if outcome.timings:
            extra["checks"] = ",".join(f"{name}:{seconds * 1000:.2f}" for name, seconds in outcome.timings)
        if outcome.degraded:
            extra["degraded"] = ",".join(outcome.degraded)
        if outcome.notes:
            extra["notes"] = "; ".join(outcome.notes)
        decision = Decision(
            service="policyd",
            stage=_STAGES.get(request.protocol_state, Stage.OTHER).value,
            check=outcome.check,
            action=verdict.action,
            reason=verdict.reason,
            seconds=elapsed,
            queue_id=request.queue_id,
            client=request.client_address,
            helo=request.helo_name,
            sender=request.sender,
            recipient=request.recipient,
            user=request.sasl_username,
            reply=verdict.reply,
            extra=extra,
        )
        self.decisions.emit(decision.logfmt())

    async def stop(self, drain_seconds: float) -> None:
        """Stop accepting, let requests in flight be answered (bounded), then close every connection."""
        for server in self.servers:
            server.close()
        if self._sweeper:
            self._sweeper.cancel()
        deadline = time.monotonic() + drain_seconds
        while any(conn.current or conn.queue for conn in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport:
                conn.transport.close()
        self.decisions.flush()


def _in_use_by(entry: str) -> str:
    """Who probably holds a TCP address policyd wants, for the start-up error."""
    port = entry.rpartition(":")[2]
    if port == str(POSTGREY_PORT):
        return ("another policyd, or Debian's postgrey, which listens there by default: systemctl stop postgrey "
                "and systemctl disable postgrey")
    return f"another policyd, or another program: ss -ltnp 'sport = :{port}' shows which"
