"""One shared, pipelined Redis connection for a whole daemon.

Why not redis-py's asyncio client on the hot path: measured on this machine kind, its per-command path
costs about 80 µs of CPU per request more than writing RESP straight to one shared connection, where the
commands of every client connection are written once per event-loop tick and answered in order
(../shared/PERF-NOTES.md). Redis answers in order on one connection, so a FIFO of waiters is all the
bookkeeping needed: Futures, or the in-line coroutines of policyd's requests, resumed from the data callback
(``ask``, mailwarden/inline.py). redis-py is still used where it is the right tool: the CLI.

Failure handling is the point of this module as much as speed. It works as a circuit breaker:
- the connection counts as up (``connected``, the gauge, the "redis connected" line) only once Redis has
  answered PING (and, with Sentinel, ROLE says master): a port that accepts and never answers is down;
- while down, every call fails at once with RedisUnavailable and the caller applies its fail mode: no
  request waits out the timeout while Redis is known down;
- a command unanswered for longer than ``timeout`` marks the connection down: it is closed, every pending
  call fails, and the background probe starts: connect + PING (bounded by ``connect_timeout``), again
  every 50 ms backing off to 0.5 s, until Redis answers;
- with Sentinel each probe first asks the sentinels for the master (``redis_sentinel.py``: all at once,
  bounded by ``sentinel_timeout``), so a failover needs no restart; a READONLY reply (we reached a demoted
  master) forces the same.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

from mailwarden import inline
from mailwarden.backend import BackendError
from mailwarden.inline import ReplyWait
from mailwarden.logs import Throttled, get_logger, log_kv
from mailwarden.redis_guard import Guard, guarded_source
from mailwarden.redis_sentinel import Address, SentinelLookup
from mailwarden.redis_settings import RedisSettings
from mailwarden.resp import pack

log = get_logger("redis")

PROBE_MAX_INTERVAL = 0.5
"""While Redis is down, a probe (connect + PING) starts at most this long after the previous one failed."""

Arg = str | bytes | int | float
Waiter = asyncio.Future[object] | ReplyWait | None
"""Who gets a reply: a Future, an in-line coroutine, or nobody (the connection's set-up commands)."""


class RedisUnavailable(BackendError):
    """Redis could not answer in time (down, unreachable, paused, failing over)."""

    backend = "redis"


class RedisCommandError(BackendError):
    """Redis answered with an error reply (a bug in a script, a key of the wrong type, a misconfiguration)."""

    backend = "redis"


@dataclass(frozen=True)
class Script:
    """A Lua script run with EVALSHA; loaded on every (re)connection before any other command."""

    name: str
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode(), usedforsecurity=False).hexdigest())


@dataclass(frozen=True)
class Endpoint:
    host: str | None
    port: int | None
    path: str | None
    password: str | None
    username: str | None
    db: int


def parse_url(url: str) -> Endpoint:
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    if parts.scheme == "unix":
        db = int(query.get("db", ["0"])[0])
        return Endpoint(None, None, unquote(parts.path), parts.password, parts.username, db)
    db_text = parts.path.strip("/") or query.get("db", ["0"])[0]
    return Endpoint(parts.hostname or "127.0.0.1", parts.port or 6379, None, parts.password, parts.username,
                    int(db_text))


class _Resp(asyncio.Protocol):
    def __init__(self, owner: PipelinedRedis) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        self.owner._on_data(self, data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.owner._on_lost(self, exc)


class PipelinedRedis:
    def __init__(self, settings: RedisSettings, scripts: Sequence[Script] = (),
                 on_state: Callable[[bool], None] | None = None) -> None:
        self.settings = settings
        self.scripts = {script.name: script for script in scripts}
        self._guarded = {script.name: Script(f"{script.name}+guard", guarded_source(script.source))
                         for script in scripts}
        """Each script behind the guard prelude (redis_guard.py), for calls that carry another caller's reads."""
        self._on_state = on_state
        self._endpoint = parse_url(settings.url)
        self._proto: _Resp | None = None
        self._reader = hiredis.Reader()
        self._pending: collections.deque[tuple[Waiter, float]] = collections.deque()
        self._wbuf: list[bytes] = []
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        """The loop of the current or last connection (set before its set-up sends anything): looked up once,
        because on Python 3.11 each get_running_loop() is a getpid() system call (twice per request before)."""
        self._connector: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None
        self._closed = False
        self._sentinels = SentinelLookup(settings) if settings.sentinels else None
        self._target: Address | None = None
        """The master a sentinel named for the current or last connection attempt."""
        self._avoid: Address | None = None
        """A master that just failed: a sentinel still naming it is believed only if no other names another."""
        self._connect_failed = Throttled(log, logging.WARNING, "redis connect failed; retrying")
        self.connected = False
        """True only while Redis answers: after PING (and ROLE) on this connection, until it fails."""
        self.address = ""

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Begin connecting in the background; the daemon serves (in its fail mode) until Redis is there."""
        self._closed = False
        self._ensure_connector()

    async def wait_connected(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.connected

    async def close(self) -> None:
        self._closed = True
        if self._connector:
            self._connector.cancel()
        if self._proto and self._proto.transport:
            self._proto.transport.close()
        self._fail_pending(RedisUnavailable("client closed"))

    # -- calls -----------------------------------------------------------------------------------

    def call(self, *args: Arg) -> asyncio.Future[object]:
        """Send one command; the future resolves with the decoded reply or fails with RedisUnavailable."""
        if self.connected and self._loop is not None:
            future: asyncio.Future[object] = self._loop.create_future()
        else:
            future = asyncio.get_running_loop().create_future()
            future.set_exception(RedisUnavailable(f"not connected to redis {self.address or self.settings.url}"))
            self._ensure_connector()
            return future
        self._send(pack(args), future)
        return future

    def ask(self, *args: Arg) -> Awaitable[object]:
        """Send one command whose reply the caller awaits at once: in an in-line coroutine (policyd's
        requests, mailwarden/inline.py) the reply resumes it from the data callback, without a Future and a
        trip through the event loop; elsewhere it is ``call``'s Future."""
        if (task := inline.running()) is None or not self.connected:
            return self.call(*args)
        waiter = ReplyWait(task)
        self._send(pack(args), waiter)
        return waiter

    def post(self, *args: Arg) -> None:
        """Send one command whose reply nobody waits for (a cache write): a failure only costs a later miss."""
        command = str(args[0])
        self.call(*args).add_done_callback(lambda done: _log_failure(done, command))

    def run_script(self, name: str, keys: Sequence[Arg], args: Sequence[Arg],
                   guard: Guard | None = None) -> Awaitable[object]:
        """Run a loaded script (await it at once: see ``ask``); with ``guard``, behind the guard prelude: pass
        the reply through ``redis_guard.unguarded``, which raises GuardTripped when the script did not run."""
        if guard is None:
            return self.ask("EVALSHA", self.scripts[name].sha, len(keys), *keys, *args)
        size = len(guard.keys)
        return self.ask("EVALSHA", self._guarded[name].sha, size + len(keys), *guard.keys, *keys, size, *guard.args,
                        *args)

    def _send(self, payload: bytes, future: Waiter) -> None:
        now = time.monotonic()
        self._pending.append((future, now))
        self._wbuf.append(payload)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._flush)
        if self._watchdog is None:
            self._arm_watchdog()

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._proto and self._proto.transport and self._wbuf:
            self._proto.transport.write(b"".join(self._wbuf))
        self._wbuf.clear()

    # -- replies ---------------------------------------------------------------------------------

    def _on_data(self, proto: _Resp, data: bytes) -> None:
        if proto is not self._proto:
            return
        self._reader.feed(data)
        while (reply := self._reader.gets()) is not False:
            if not self._pending:
                log_kv(log, logging.ERROR, "redis sent a reply nobody asked for; reconnecting")
                self._drop("unexpected reply")
                return
            waiter, _sent = self._pending.popleft()
            if isinstance(reply, hiredis.ReplyError):
                self._on_error_reply(waiter, str(reply))
                if proto is not self._proto:
                    return  # the error made us drop this connection; the rest of its data is void
            elif isinstance(waiter, ReplyWait):
                waiter.resume(reply)  # runs the request on, to its next call or its answer
                if proto is not self._proto:
                    return  # it dropped this connection (and failed what was pending)
            elif waiter is not None and not waiter.done():
                waiter.set_result(reply)

    def _on_error_reply(self, future: Waiter, message: str) -> None:
        if message.startswith(("READONLY", "MASTERDOWN", "LOADING")):
            self._fail(future, RedisUnavailable(f"redis at {self.address} cannot take writes: {message}"))
            self._drop(message.split(" ", 1)[0])
            return
        if message.startswith("NOSCRIPT"):
            self._load_scripts()  # flushed by someone: load again; this call fails over to the fail mode
        if future is None:
            log_kv(log, logging.ERROR, "redis refused a connection set-up command", error=message)
            return
        self._fail(future, RedisCommandError(message))

    def _fail(self, waiter: Waiter, exc: Exception) -> None:
        """Fail one call. An in-line coroutine is resumed from the next loop iteration, not from inside the
        pipe's own handling of the failure (which may be tearing the connection down)."""
        if isinstance(waiter, ReplyWait):
            (self._loop or asyncio.get_running_loop()).call_soon(waiter.fail, exc)
        elif waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    # -- connection management -------------------------------------------------------------------

    def _ensure_connector(self) -> None:
        if self._closed or self.connected or (self._connector and not self._connector.done()):
            return
        self._connector = asyncio.get_running_loop().create_task(self._connect_loop())

    async def _connect_loop(self) -> None:
        """The probe: connect and PING until Redis answers (one warning line per interval, with a count)."""
        delay = 0.05
        loop = asyncio.get_running_loop()
        while not self._closed:
            try:
                await self._connect_once(loop)
                self._avoid = None
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._avoid = self._target
                self._connect_failed.hit(address=self.address or "-", error=str(exc) or type(exc).__name__)
            await asyncio.sleep(delay)
            delay = min(delay * 2, PROBE_MAX_INTERVAL)

    async def _connect_once(self, loop: asyncio.AbstractEventLoop) -> None:
        host, port, path = await self._locate()
        self._loop = loop
        timeout = self.settings.connect_timeout
        self.address = path or f"{host}:{port}"
        if path:
            coro = loop.create_unix_connection(lambda: _Resp(self), path)
        else:
            assert host is not None and port is not None  # a TCP endpoint has both
            coro = loop.create_connection(lambda: _Resp(self), host, port)
        _transport, proto = await asyncio.wait_for(coro, timeout)
        self._reader = hiredis.Reader()
        self._proto = proto
        try:
            await asyncio.wait_for(self._handshake(), timeout)
        except BaseException as exc:
            if self._proto is proto:
                self._drop("no answer to PING" if isinstance(exc, TimeoutError) else "set-up failed")
            if isinstance(exc, TimeoutError):
                raise RedisUnavailable(f"no answer to PING within {timeout:g}s") from None
            raise
        self.connected = True
        log_kv(log, logging.INFO, "redis connected", address=self.address)
        if self._on_state:
            self._on_state(True)

    async def _handshake(self) -> None:
        """Log in, select, load the scripts; up only once PING answers (and ROLE says master, with Sentinel:
        a sentinel may still name a master that was demoted)."""
        ep = self._endpoint
        if ep.password:
            auth = ("AUTH", ep.username, ep.password) if ep.username else ("AUTH", ep.password)
            self._send(pack(auth), None)
        if ep.db:
            self._send(pack(("SELECT", ep.db)), None)
        self._load_scripts()
        await self._request("PING")
        if self._sentinels:
            role = await self._request("ROLE")
            if not isinstance(role, list) or role[0] != b"master":
                raise RedisUnavailable(f"{self.address} is not a master (yet)")

    def _request(self, *args: Arg) -> asyncio.Future[object]:
        """A command on the connection being set up (``call`` refuses until it counts as up)."""
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._send(pack(args), future)
        return future

    async def _locate(self) -> tuple[str | None, int | None, str | None]:
        if self._sentinels is None:
            return self._endpoint.host, self._endpoint.port, self._endpoint.path
        self._target = None
        try:
            self._target = await self._sentinels.master(avoid=self._avoid)
        except Exception as exc:
            raise RedisUnavailable(str(exc)) from None
        return self._target[0], self._target[1], None

    def _load_scripts(self) -> None:
        for script in (*self.scripts.values(), *self._guarded.values()):
            self._send(pack(("SCRIPT", "LOAD", script.source)), None)

    def _arm_watchdog(self) -> None:
        self._watchdog = asyncio.get_running_loop().call_later(self.settings.timeout / 4, self._check_stalled)

    def _check_stalled(self) -> None:
        self._watchdog = None
        if not self._pending or not self.connected:
            return  # nothing waits, or a connection being set up: its handshake has its own time-out
        _future, sent = self._pending[0]
        if time.monotonic() - sent > self.settings.timeout:
            log_kv(log, logging.ERROR, "redis did not answer in time; reconnecting", address=self.address,
                   timeout=f"{self.settings.timeout:g}s", pending=len(self._pending))
            self._drop("timeout")
        else:
            self._arm_watchdog()

    def _drop(self, why: str) -> None:
        proto, self._proto = self._proto, None
        if proto and proto.transport:
            proto.transport.abort()
        self._mark_down(RedisUnavailable(f"redis connection to {self.address} dropped: {why}"))

    def _on_lost(self, proto: _Resp, exc: Exception | None) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        if not self._closed and self.connected:  # while being set up, the probe's own line says why
            log_kv(log, logging.ERROR, "redis connection lost", address=self.address, error=str(exc or "closed"))
        self._mark_down(RedisUnavailable(f"redis connection to {self.address} lost"))

    def _mark_down(self, exc: RedisUnavailable) -> None:
        was_connected, self.connected = self.connected, False
        if was_connected:
            self._avoid = self._target  # with Sentinel: the next lookup prefers another master if named
        self._wbuf.clear()
        self._fail_pending(exc)
        if was_connected and self._on_state:
            self._on_state(False)
        if not self._closed:
            self._ensure_connector()

    def _fail_pending(self, exc: Exception) -> None:
        pending, self._pending = self._pending, collections.deque()
        for waiter, _sent in pending:
            self._fail(waiter, exc)


def _log_failure(future: asyncio.Future[object], command: str) -> None:
    """Retrieve a posted command's failure (asyncio would log it as never retrieved) and say it at debug level."""
    if (exc := future.exception()) is not None:
        log_kv(log, logging.DEBUG, "redis command nobody waited for failed", command=command, error=str(exc))
