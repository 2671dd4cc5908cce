"""The policy protocol server: many persistent connections, one request at a time on each.

Built on asyncio.Protocol callbacks rather than streams: on this machine kind that halves the CPU spent
per request (../shared/PERF-NOTES.md). Every request gets an answer within ``answer_within``: when the
pipeline has not decided by then (Redis hung, failing over), the fail mode of the dependency answers and
the late result is dropped. A peer that breaks the protocol, exceeds a limit or stalls is logged and
disconnected; nothing it does reaches the other connections.

Two deadlines hold every connection whatever the peer trickles: a request must arrive whole within
``request_timeout`` of its first byte (later bytes do not extend it), and a connection with nothing in
flight is closed ``idle_timeout`` after its last answer. Both, and ``answer_within``, are enforced by one
sweeper timer for all connections. When every slot is taken, a new client is not turned away while a
connection is doing nothing useful: the one trickling a request for longest (past ``TRICKLING_AFTER``),
else the one idle for longest (past ``IDLE_EVICTABLE_AFTER``; Postfix simply reopens it), is closed to
make room. A connection with a request in flight is never closed for that. Only when none can be closed is
the new one refused; refusals and evictions are counted, and logged once per interval with how many.

On SIGTERM (``stop``) the listeners close and each connection drains: one busy with a request stops
reading, gets its answers (within ``answer_within``: the sweeper runs to the end) and is closed right after
the last one, its end of the connection shut at once so that the peer sees the close before it could
write again; an idle one may still send one request (answered, then closed) for ``DRAIN_IDLE_GRACE``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass

from mailwarden.decision import Action, Decision, Stage
from mailwarden.inline import InlineTask
from mailwarden.listen import ListenError
from mailwarden.logs import DecisionLog, Throttled, get_logger, log_kv
from policyd import metrics
from policyd.check import Outcome, Pipeline, fail_verdict
from policyd.request import PolicyRequest, ProtocolError, RequestReader
from policyd.results import TransactionState
from policyd.settings import PolicydSettings
from policyd.verdict import TEMPFAIL_STATUS, Verdict, defer_if_permit

log = get_logger("policyd.server")

_STAGES = {
    state: stage.value for state, stage in (
        ("RCPT", Stage.RCPT), ("END-OF-MESSAGE", Stage.EOM), ("DATA", Stage.DATA), ("MAIL", Stage.MAIL),
        ("CONNECT", Stage.CONNECT), ("EHLO", Stage.HELO), ("HELO", Stage.HELO))
}
"""Postfix's protocol_state -> the decision line's stage (its text: looked up once per request)."""
OTHER_STAGE = Stage.OTHER.value
DEADLINE_TICK = 0.05
"""How often requests are checked against ``answer_within``: answers in the fail mode come at most this late."""
INTERNAL_ERROR_TEXT = f"{TEMPFAIL_STATUS} Temporary local problem, please try again later"
DRAIN_IDLE_GRACE = 0.5
"""On SIGTERM, how long a connection with nothing in flight may still send a request before it is closed:
a client that wrote its next request just before the signal gets the answer instead of a reset."""
TRICKLING_AFTER = 0.1
"""How long a request may have been arriving before its connection counts as trickling, and a new client
may take its slot: Postfix writes a request (under a kilobyte) in one go."""
IDLE_EVICTABLE_AFTER = 1.0
"""How long a connection must have been idle before a new client may take its slot: Postfix reuses an idle
connection within milliseconds of its last answer while a transaction goes on."""
ROOM_SCAN_PAUSE = 0.1
"""After a search for a slot to free found none, new clients are refused without searching for this long:
under a connection flood with every slot busy, refusing stays O(1)."""
POSTGREY_PORT = 10023
"""Where Debian's postgrey listens by default: the likely owner of our default address."""


@dataclass(slots=True)
class _InFlight:
    request: PolicyRequest
    started: float
    answered: bool = False


class PolicyConnection(asyncio.Protocol):
    def __init__(self, server: PolicyServer, listener: str) -> None:
        self.server = server
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        """Looked up once: on Python 3.11 each get_running_loop() is a getpid() system call."""
        self.reader = RequestReader(server.settings.max_line_bytes, server.settings.max_request_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "-"
        self.queue: collections.deque[dict[str, str]] = collections.deque()
        self.current: _InFlight | None = None
        self.idle_since = time.monotonic()
        """When the connection last had nothing to do (opened, or its last answer written)."""
        self.request_started: float | None = None
        """When the first byte of the request being received arrived (None between requests)."""
        self.draining = False
        self.instance = ""
        self.transaction = TransactionState()
        self.rcpt_number = 0
        self.starting = False
        """True while ``_next`` starts requests: an answer given at once does not start the next one itself
        (``_next`` goes on in its loop instead of recursing once per request a client pipelined)."""

    # -- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else self.listener
        if self.server.draining or (len(self.server.connections) >= self.server.settings.max_connections
                                    and not self.server.make_room()):
            transport.close()
            self.server.refused("draining" if self.server.draining else "max_connections")
            return
        self.server.connections.add(self)
        metrics.CONNECTIONS.inc()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.server.connections:
            self.server.connections.discard(self)
            metrics.CONNECTIONS.dec()
            if self.server.draining and not self.server.connections:
                self.server.drained.set()
        self.queue.clear()

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        if self.request_started is None:
            self.request_started = now  # the deadline runs from a request's first byte, whatever follows
        try:
            requests = self.reader.feed(data)
        except ProtocolError as exc:
            self.protocol_error(str(exc))
            return
        if requests:
            self.request_started = now if self.reader.partial else None  # the rest began in this chunk
            self.queue.extend(requests)
            if self.draining and self.transport is not None:
                self.transport.pause_reading()  # the request that came in the grace is the last one
            if self.current is None:
                self._next()

    def eof_received(self) -> bool | None:
        if self.reader.partial:
            log_kv(log, logging.WARNING, "connection closed in the middle of a request", peer=self.peer)
        return None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def check_timeouts(self, now: float, settings: PolicydSettings, drain_started: float | None) -> None:
        """Close the connection past its whole-request deadline, or idle past ``idle_timeout`` (past
        ``DRAIN_IDLE_GRACE`` once draining)."""
        if self.request_started is not None:
            if now - self.request_started > settings.request_timeout:
                metrics.PROTOCOL_ERRORS.labels("stalled").inc()
                log_kv(log, logging.WARNING, "client stalled inside a request; closing", peer=self.peer,
                       after=f"{settings.request_timeout:g}s", since="its first byte")
                self.queue.clear()
                self.close()
        elif self.current is None and not self.queue:
            if drain_started is not None:
                if now - max(self.idle_since, drain_started) > DRAIN_IDLE_GRACE:
                    self.close()
            elif now - self.idle_since > settings.idle_timeout:
                self.close()

    def evictable_since(self) -> tuple[int, float] | None:
        """How it ranks for giving its slot to a new client: (1, since when it trickles a request) before
        (0, since when it is idle), older first; None while a request is in flight or queued."""
        if self.current is not None or self.queue or self.draining or self.transport is None:
            return None
        if self.request_started is not None:
            return 1, self.request_started
        return 0, self.idle_since

    def start_drain(self) -> None:
        """SIGTERM: read no further request once one is in flight; close after its answer."""
        self.draining = True
        if (self.current is not None or self.queue) and self.transport is not None:
            self.transport.pause_reading()

    def _send_last(self, transport: asyncio.Transport, answer: bytes) -> None:
        """The last answer on a draining connection, sent together with the FIN in this step rather than at
        the end of the loop iteration (uvloop batches writes), so that a client reading the answer sees the
        close before it could write another request. On TCP, MSG_MORE holds the answer back until the FIN
        joins it in one segment: the client cannot wake up to the answer alone. Then the connection is
        closed."""
        sent = 0
        sock = transport.get_extra_info("socket")
        if sock is not None and not transport.get_write_buffer_size():  # nothing queued to overtake
            more = socket.MSG_MORE if sock.family in (socket.AF_INET, socket.AF_INET6) else 0
            try:
                with socket.socket(fileno=os.dup(sock.fileno())) as dup:  # the transport keeps its own fd
                    sent = dup.send(answer, more)
                    if sent == len(answer):
                        dup.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # a full socket buffer (the transport sends the answer) or a peer already gone
        if sent < len(answer):
            transport.write(answer[sent:])
        transport.close()

    # -- requests -------------------------------------------------------------------------------

    def protocol_error(self, why: str) -> None:
        kind = why.split(" ", 1)[0].strip(":")
        metrics.PROTOCOL_ERRORS.labels(kind).inc()
        log_kv(log, logging.ERROR, "policy protocol error; closing connection", peer=self.peer, error=why)
        self.queue.clear()
        if self.transport:
            self.transport.close()

    def _next(self) -> None:
        """Start the queued requests, one at a time: each runs in line (mailwarden/inline.py) until it waits on
        Redis or is answered; the next starts once the answer is written."""
        self.starting = True
        try:
            while self.current is None:
                if not self.queue or self.transport is None or self.transport.is_closing():
                    return
                request = PolicyRequest.from_attrs(self.queue.popleft(), self.transaction)
                self._track_transaction(request)
                flight = _InFlight(request, time.perf_counter())
                self.current = flight
                InlineTask(self.server.pipeline.decide(request),
                           lambda outcome, exc, flight=flight: self._decided(flight, outcome, exc),  # type: ignore[misc]
                           self.loop).start()
        finally:
            self.starting = False

    def _track_transaction(self, request: PolicyRequest) -> None:
        """Give the request its transaction's scratch space, keyed by Postfix's ``instance`` (it was made
        with the connection's current one; the first request of a transaction gets a new one)."""
        if not request.instance or request.instance != self.instance:
            self.instance = request.instance
            self.transaction = request.transaction = TransactionState()
            self.rcpt_number = 0
        if request.protocol_state == "RCPT":
            self.rcpt_number += 1
        request.rcpt_number = max(self.rcpt_number, 1)

    def _decided(self, flight: _InFlight, outcome: Outcome | None, exc: BaseException | None) -> None:
        if flight.answered:
            return  # answered at the time bound already
        if exc is not None or outcome is None:
            log.error("internal error deciding a request; answering with a temporary failure",
                      exc_info=exc, extra={"kv": {"peer": self.peer, "queue_id": flight.request.queue_id}})
            outcome = Outcome(Verdict.refuse(Action.DEFER, f"internal error: {type(exc).__name__}",
                                              defer_if_permit(INTERNAL_ERROR_TEXT)), "internal")
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
            answer = f"action={outcome.verdict.reply}\n\n".encode()
            if self.draining and not self.queue:
                self._send_last(self.transport, answer)
            else:
                self.transport.write(answer)
        self.server.record(flight.request, outcome, elapsed)
        self.current = None
        if self.queue:
            if not self.starting:
                self._next()
        elif self.draining:
            self.close()
        else:
            self.idle_since = time.monotonic()


class PolicyServer:
    def __init__(self, settings: PolicydSettings, pipeline: Pipeline, decisions: DecisionLog) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.decisions = decisions
        self.connections: set[PolicyConnection] = set()
        self.servers: list[asyncio.Server] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._last_idle_sweep = 0.0
        self.draining = False
        self.drained = asyncio.Event()
        """Set when the last connection closes while draining."""
        self._drain_started: float | None = None
        self.refusals = Throttled(log, logging.WARNING, "connections refused")
        """One warning line per interval while connections are refused, with how many were."""
        self.evictions = Throttled(log, logging.WARNING, "connections closed to make room for new clients")
        """One line per interval while slots are freed for new clients, with how many were."""
        self._no_room_until = 0.0
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
        instead of one per request); every second (every tick while draining): disconnect peers past the
        whole-request deadline or idle too long, and log what was throttled."""
        loop = asyncio.get_running_loop()
        self._sweeper = loop.call_later(DEADLINE_TICK, self._sweep)
        perf_now = time.perf_counter()
        for conn in list(self.connections):
            conn.check_deadline(perf_now)
        if not self.draining and loop.time() - self._last_idle_sweep < 1.0:
            return
        self._last_idle_sweep = loop.time()
        self.late_answers.flush()
        self.refusals.flush()
        self.evictions.flush()
        now = time.monotonic()
        for conn in list(self.connections):
            conn.check_timeouts(now, self.settings, self._drain_started)

    def make_room(self) -> bool:
        """Every slot is taken: close the connection trickling a request for longest (past ``TRICKLING_AFTER``),
        else the one idle for longest (past ``IDLE_EVICTABLE_AFTER``), so that the new client is served at once.
        False when none can go (each busy with a request, or active just now)."""
        now = time.monotonic()
        if now < self._no_room_until:
            return False
        victim: PolicyConnection | None = None
        best: tuple[int, float] = (-1, 0.0)
        for conn in self.connections:
            rank = conn.evictable_since()
            if (rank is not None and now - rank[1] >= (TRICKLING_AFTER if rank[0] else IDLE_EVICTABLE_AFTER)
                    and (rank[0], -rank[1]) > best):
                victim, best = conn, (rank[0], -rank[1])
        if victim is None:
            self._no_room_until = now + ROOM_SCAN_PAUSE
            return False
        state = "inside a request" if best[0] else "idle"
        self.connections.discard(victim)  # its slot is free now, not when the loop reports it closed
        metrics.CONNECTIONS.dec()
        metrics.CONNECTIONS_EVICTED.labels(state).inc()
        self.evictions.hit(state, state=state, max_connections=self.settings.max_connections)
        victim.queue.clear()
        victim.close()
        return True

    def refused(self, reason: str) -> None:
        """A connection closed at once (over max_connections, or while draining): counted every time, logged
        at once when none was in the last interval, else folded into the next line's count."""
        metrics.CONNECTIONS_REFUSED.labels(reason).inc()
        self.refusals.hit(reason, reason=reason, max_connections=self.settings.max_connections)

    def record(self, request: PolicyRequest, outcome: Outcome, elapsed: float) -> None:
        verdict = outcome.verdict
        metrics.HOT.decided(outcome.check, verdict.action._value_, elapsed)  # _value_: no enum property call
        if outcome.fail_mode is not None:
            metrics.FAIL_MODE.labels(*outcome.fail_mode).inc()
        if not self.decisions.enabled:
            return
        extra: dict[str, object] = {}
        if outcome.timings:
            extra["checks"] = ",".join([f"{name}:{seconds * 1000:.2f}" for name, seconds in outcome.timings])
        if outcome.degraded:
            extra["degraded"] = ",".join(outcome.degraded)
        if outcome.notes:
            extra["notes"] = "; ".join(outcome.notes)
        # positional (once per request): service, stage, check, action, reason, seconds, queue_id, client, helo,
        # sender, recipient, user, reply, extra; the e2e tests read these fields back from the line
        decision = Decision("policyd", _STAGES.get(request.protocol_state, OTHER_STAGE), outcome.check,
                            verdict.action, verdict.reason, elapsed, request.queue_id, request.client_address,
                            request.helo_name, request.sender, request.recipient, request.sasl_username,
                            verdict.reply, extra)
        self.decisions.emit(decision.logfmt())

    async def stop(self, drain_seconds: float) -> None:
        """Stop accepting; every connection stops reading once a request is in flight, gets its answers
        (the sweeper keeps enforcing ``answer_within``) and is closed; idle ones after DRAIN_IDLE_GRACE.
        Returns when the last connection is closed, or at ``drain_seconds``, closing what is left."""
        for server in self.servers:
            server.close()
        self.draining = True
        self._drain_started = time.monotonic()
        busy = sum(1 for conn in self.connections if conn.current is not None or conn.queue)
        log_kv(log, logging.INFO, "draining: answering requests in flight, then closing",
               connections=len(self.connections), in_flight=busy, bound=f"{drain_seconds:g}s")
        for conn in list(self.connections):
            conn.start_drain()
        if self.connections:
            try:
                await asyncio.wait_for(self.drained.wait(), drain_seconds)
            except TimeoutError:
                log_kv(log, logging.WARNING, "drain bound reached; closing the connections left",
                       connections=len(self.connections), bound=f"{drain_seconds:g}s")
        for conn in list(self.connections):
            conn.close()
        if self._sweeper:
            self._sweeper.cancel()
            self._sweeper = None
        self.refusals.flush()
        self.decisions.flush()


def _in_use_by(entry: str) -> str:
    """Who probably holds a TCP address policyd wants, for the start-up error."""
    port = entry.rpartition(":")[2]
    if port == str(POSTGREY_PORT):
        return ("another policyd, or Debian's postgrey, which listens there by default: systemctl stop postgrey "
                "and systemctl disable postgrey")
    return f"another policyd, or another program: ss -ltnp 'sport = :{port}' shows which"
