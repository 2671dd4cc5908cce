"""Side-by-side benchmark: mailwarden's policyd against Debian's postgrey 1.37, on the same request streams.

Why it is built this way:

- Every server runs as a real separate process, started here from nothing (its own redis-server on a
  free port, postgrey with an empty database directory), so the figures are those an operator gets and
  no state leaks in from the machine (the system Redis on 6379 is never touched).
- Client, servers and Redis share the same 2 cores, so the client must cost little and must not set
  the pace unnoticed. A Python client on asyncio streams costs about 105 µs of CPU per request and caps
  what can be measured at about 5x postgrey; this one uses asyncio.Protocol callbacks on uvloop with
  every request pre-encoded before the clock starts (about 20 µs per request). It reports its own CPU,
  and besides requests/s the table reports what does not depend on the client at all: each server's
  CPU per request, read from /proc/PID/stat before and after the run (and its Redis's, which does the
  storage work that postgrey does in-process).
- Requests come from ranges of triplet numbers that are never handed out twice, so "new" really is
  never-seen for every run and every server, and "repeat" always replays triplets its server already
  holds (primed, untimed, before the timed run).
- Runs go in ABBA order (server order reversed on every other pass) after a discarded warm-up pass, and
  medians across runs are reported, so drift on a shared machine (another engineer's tests) weighs on
  every server alike. The CPU taken by other processes during each run is reported too.
- Every process started here is stopped on normal exit, on errors, on Ctrl-C and on SIGTERM (and gets
  PR_SET_PDEATHSIG, so it dies even if this script is killed outright); every wait is bounded.

Run with the project's venv:  .venv/bin/python bench/policyd_bench.py --help
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar, cast

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
POSTGREY = "/usr/sbin/postgrey"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1

SERVERS = ("mailwarden-greylist", "mailwarden-all", "postgrey")
"""Benchmarked servers: policyd with greylisting only (what postgrey does), policyd with its default
pipeline (blocklist, ratelimit, greylist), and postgrey itself (the reference for the ratios)."""
MAILWARDEN_CHECKS = {
    "mailwarden-greylist": ["greylist"],
    "mailwarden-all": ["blocklist", "ratelimit", "greylist"],
}
SCENARIOS = ("new", "repeat")
REFERENCE = "postgrey"
EXPECTED_ACTION = b"DEFER_IF_PERMIT"
"""Every request of both scenarios is greylisted (new triplet, or a retry well inside the 300 s delay),
so any other answer means the benchmark measured something else (a whitelist hit, a fail-open path)."""

# A Postfix 3.7 RCPT-stage request, attribute for attribute; the fields in braces vary per request.
REQUEST_TEMPLATE = "".join(
    f"{name}={value}\n"
    for name, value in (
        ("request", "smtpd_access_policy"),
        ("protocol_state", "RCPT"),
        ("protocol_name", "ESMTP"),
        ("client_address", "{client}"),
        ("client_name", "unknown"),
        ("client_port", "{port}"),
        ("reverse_client_name", "unknown"),
        ("server_address", "127.0.0.1"),
        ("server_port", "25"),
        ("helo_name", "mx.example.org"),
        ("sender", "{sender}"),
        ("recipient", "{recipient}"),
        ("recipient_count", "0"),
        ("queue_id", ""),
        ("instance", "{instance}"),
        ("size", "1234"),
        ("etrn_domain", ""),
        ("stress", ""),
        ("sasl_method", ""),
        ("sasl_username", ""),
        ("sasl_sender", ""),
        ("ccert_subject", ""),
        ("ccert_issuer", ""),
        ("ccert_fingerprint", ""),
        ("ccert_pubkey_fingerprint", ""),
        ("encryption_protocol", ""),
        ("encryption_cipher", ""),
        ("encryption_keysize", "0"),
        ("policy_context", ""),
        ("compatibility_level", "3.6"),
        ("mail_version", "3.7.11"),
    )
) + "\n"


T = TypeVar("T")


class BenchError(RuntimeError):
    """A run or a server failed; the message says which and where its log is."""


class Interrupted(Exception):
    """Ctrl-C, SIGTERM or SIGHUP: unwind like an error, so every child process is stopped on the way out."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StopRequest:
    """Where a stop signal is noted. The handlers only note it: an exception raised from a handler could
    land inside an event-loop or transport callback, where uvloop logs it and carries on. The script
    raises Interrupted itself at safe points (every wait polls ``check``); a run in progress ends at once
    through its future (see ``drive``)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def note(self, signum: int, _frame: FrameType | None = None) -> None:
        if self.signum is None:
            self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)

    def install(self) -> None:
        """(SIGINT is set explicitly: started in the background of a script, it would be ignored.)"""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self.note)


STOP = StopRequest()


# -- request streams ------------------------------------------------------------------------------------


def _letters(number: int) -> str:
    """``number`` in base 26 as letters: postgrey and policyd turn digits in a sender into '#', so digits
    would make distinct senders equal after normalisation."""
    out = []
    while True:
        number, digit = divmod(number, 26)
        out.append(chr(97 + digit))
        if number == 0:
            return "".join(reversed(out))


CLIENT_SPACE = 254 * 256 * 256
"""Triplet numbers map to client addresses in 10.0.0.0/8 (host byte 1-254): not loopback (trusted by
policyd), not in either whitelist, and always a valid address (postgrey dies on an invalid one)."""


def client_address(number: int) -> str:
    rest, host = divmod(number % CLIENT_SPACE, 254)
    high, mid = divmod(rest, 256)
    return f"10.{high}.{mid}.{host + 1}"


def encode_request(triplet: int, attempt: int) -> bytes:
    """The request for triplet ``triplet``; ``attempt`` makes each delivery attempt its own transaction
    (Postfix's ``instance``), as a retry from a real client would be."""
    name = _letters(triplet)
    return REQUEST_TEMPLATE.format(
        client=client_address(triplet),
        port=1024 + (attempt * 7919 + triplet) % 64000,
        sender=f"s-{name}@example.org",
        recipient=f"u-{name}@example.test",
        instance=f"{attempt:x}.{triplet:x}.b3c.0",
    ).encode()


class TripletNumbers:
    """Hands out ranges of triplet numbers that never overlap: one source for the whole benchmark, so no
    run of any server ever sees a triplet from another run as known."""

    def __init__(self) -> None:
        self._next = 0
        self._attempt = 0

    def take(self, count: int) -> range:
        start, self._next = self._next, self._next + count
        if self._next > CLIENT_SPACE:
            raise BenchError("too many requests for distinct client addresses; lower --requests or --runs")
        return range(start, self._next)

    def attempts(self, count: int) -> range:
        start, self._attempt = self._attempt, self._attempt + count
        return range(start, self._attempt)


@dataclass
class Workload:
    """The timed requests of one run, and the untimed ones that must be sent first."""

    timed: list[bytes]
    prime: list[bytes] = field(default_factory=list)


def make_workload(scenario: str, numbers: TripletNumbers, requests: int, pool: int) -> Workload:
    """"new": every request a never-seen triplet. "repeat": a pool of triplets sent once untimed (so the
    server holds them), then cycled through for the timed run: every timed request hits an entry."""
    if scenario == "new":
        triplets = numbers.take(requests)
        attempts = numbers.attempts(requests)
        return Workload([encode_request(t, a) for t, a in zip(triplets, attempts, strict=True)])
    pool_numbers = numbers.take(pool)
    prime = [encode_request(t, a) for t, a in zip(pool_numbers, numbers.attempts(pool), strict=True)]
    timed = [encode_request(pool_numbers[i % pool], a) for i, a in enumerate(numbers.attempts(requests))]
    return Workload(timed, prime)


# -- the load client ------------------------------------------------------------------------------------


class _Shared:
    """State shared by the client's connections: the requests, where they are, what came back."""

    __slots__ = ("active", "answers", "done", "latencies", "next", "requests", "total")

    def __init__(self, requests: list[bytes], done: asyncio.Future[None]) -> None:
        self.requests = requests
        self.total = len(requests)
        self.next = 0
        self.latencies: list[float] = []
        self.answers: dict[bytes, int] = {}
        self.active = 0
        self.done = done

    def fail(self, why: str) -> None:
        if not self.done.done():
            self.done.set_exception(BenchError(why))

    def interrupt(self, signum: int) -> None:
        STOP.note(signum)
        if not self.done.done():
            self.done.set_exception(Interrupted(signum))


class _ClientConnection(asyncio.Protocol):
    """One persistent connection that behaves like Postfix's smtpd: one request, wait for the answer,
    the next request. Plain callbacks and pre-encoded bytes keep the client's CPU per request low."""

    __slots__ = ("buf", "finished", "sent", "shared", "transport")

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.sent = 0.0
        self.finished = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def start(self) -> None:
        self.shared.active += 1
        self._send_next()

    def _send_next(self) -> None:
        shared = self.shared
        index = shared.next
        if index >= shared.total:
            self.finished = True
            shared.active -= 1
            if shared.active == 0 and not shared.done.done():
                shared.done.set_result(None)
            return
        shared.next = index + 1
        self.sent = time.perf_counter()
        assert self.transport is not None
        self.transport.write(shared.requests[index])

    def data_received(self, data: bytes) -> None:
        if self.buf:
            data = self.buf + data
        if not data.endswith(b"\n\n"):
            self.buf = data  # an answer split across reads
            return
        self.buf = b""
        shared = self.shared
        shared.latencies.append(time.perf_counter() - self.sent)
        answers = shared.answers
        answers[data] = answers.get(data, 0) + 1
        self._send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self.shared.fail(f"server closed a connection after {len(self.shared.latencies)} answers ({exc})")


@dataclass
class DriveResult:
    wall: float
    latencies: list[float]
    answers: dict[bytes, int]


async def drive(port: int, requests: list[bytes], connections: int, timeout: float) -> DriveResult:
    """Send ``requests`` over ``connections`` persistent connections (each takes the next request as soon
    as its previous one is answered) and time every answer. Bounded by ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    shared = _Shared(requests, loop.create_future())
    conns: list[_ClientConnection] = []
    # Inside the loop a signal must not raise from within a protocol callback (the transport would take it
    # as its own error): it ends the run through the future instead, and the connections close below.
    try:
        for signum in STOP_SIGNALS:
            loop.add_signal_handler(signum, shared.interrupt, signum)
        STOP.check()  # a signal that came before the loop's handlers were in place
        for _ in range(max(1, min(connections, len(requests)))):
            _transport, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _ClientConnection(shared), "127.0.0.1", port), 10)
            conns.append(conn)
        started = time.perf_counter()
        for conn in conns:  # all connected first, so the clock sees all of them at work from the start
            conn.start()
        try:
            await asyncio.wait_for(asyncio.shield(shared.done), timeout)
        except TimeoutError:
            raise BenchError(f"run timed out after {timeout:g}s with {len(shared.latencies)} of "
                             f"{len(requests)} answers") from None
        wall = time.perf_counter() - started
    finally:
        for conn in conns:
            conn.finished = True
            if conn.transport is not None:
                conn.transport.close()
        if not shared.done.done():
            shared.done.cancel()
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
        STOP.install()
    return DriveResult(wall, shared.latencies, shared.answers)


# -- processes ------------------------------------------------------------------------------------------


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when this script dies, even by SIGKILL. The kernel clears
    this when a process changes its user, so postgrey is started as user postgrey rather than left to
    switch to it itself (its behaviour is the same either way)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Child:
    """A process this script started and must stop: its log file, its readiness, a bounded stop."""

    name: str
    argv: list[str]
    log_path: Path
    user: str | None = None
    """Start as this user (and its group): a process that switched user itself would lose PDEATHSIG."""
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> Child:
        with self.log_path.open("ab") as log:
            # Own session: Ctrl-C reaches only this script, which then stops the children in order.
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                                         start_new_session=True, preexec_fn=_die_with_parent, user=self.user,
                                         group=self.user, extra_groups=[] if self.user else None)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise BenchError(f"{self.name} exited (code {code}); log {self.log_path}:\n{self.log_tail()}")

    def wait_port(self, port: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            STOP.check()
            self.check_alive()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise BenchError(f"{self.name} not listening on 127.0.0.1:{port} after {timeout:g}s; log {self.log_path}")

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Only ever this child's own pid."""
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(5)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class Target:
    """One benchmarked server: the process answering on ``port``, plus the Redis holding its state."""

    name: str
    port: int
    server: Child
    store: Child | None = None

    def check_alive(self) -> None:
        self.server.check_alive()
        if self.store:
            self.store.check_alive()


def start_redis(workdir: Path, stack: contextlib.ExitStack, name: str) -> tuple[Child, int]:
    port = free_port()
    folder = workdir / name
    folder.mkdir()
    child = Child(name, [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                         "--appendonly", "no", "--daemonize", "no", "--dir", str(folder),
                         "--logfile", str(folder / "redis.log")], folder / "stderr.log")
    stack.callback(child.stop)
    child.start()
    child.wait_port(port, 10)
    return child, port


def start_mailwarden(name: str, workdir: Path, stack: contextlib.ExitStack, python: str) -> Target:
    """policyd from a config file as an operator writes one; its own redis-server; decisions logged (as
    in production) to a file."""
    store, redis_port = start_redis(workdir, stack, f"{name}-redis")
    port = free_port()
    config = workdir / f"{name}.toml"
    checks = ", ".join(f'"{check}"' for check in MAILWARDEN_CHECKS[name])
    config.write_text(
        f'[redis]\nurl = "redis://127.0.0.1:{redis_port}/0"\n\n'
        "[logging]\ndecisions = true\n\n"
        f'[policyd]\nlisten = ["127.0.0.1:{port}"]\nchecks = [{checks}]\n'
    )
    env = {key: value for key, value in os.environ.items() if key != "MAILWARDEN_CONFIG"}
    server = Child(name, [python, "-m", "mailwarden.cli", "--config", str(config), "policyd"],
                   workdir / f"{name}.log")
    stack.callback(server.stop)  # registered after its Redis: stopped before it
    server.start(env)
    server.wait_port(port, 30)
    return Target(name, port, server, store)


def start_postgrey(workdir: Path, stack: contextlib.ExitStack, postgrey: str) -> Target:
    """postgrey as Debian runs it (its defaults, whitelists from /etc/postgrey, user postgrey), in the
    foreground so its decision lines go to stderr, with an empty database directory it owns."""
    folder = workdir / "postgrey"
    for sub in ("db", "run"):
        (folder / sub).mkdir(parents=True)
        shutil.chown(folder / sub, "postgrey", "postgrey")
    port = free_port()
    server = Child("postgrey", [postgrey, f"--inet=127.0.0.1:{port}", f"--dbdir={folder / 'db'}", "--delay=300"],
                   folder / "postgrey.log", user="postgrey")
    stack.callback(server.stop)
    server.start()
    server.wait_port(port, 30)
    return Target("postgrey", port, server)


# -- measurements ---------------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    fields = data[data.rfind(b")") + 2:].split()  # the command name may hold spaces and parentheses
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB from /proc/PID/status."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in values:
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def machine_busy_seconds() -> float:
    """CPU seconds all cores spent running processes (user, nice, system) or stolen by the hypervisor
    since boot (/proc/stat), to see what else ran during a run. Interrupt and softirq time is left out:
    loopback TCP is processed there and is nobody else's load."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = fields
    return (user + nice + system + steal) / CLK_TCK


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


@dataclass
class Snapshot:
    at: float
    server: float
    store: float
    client: float
    machine: float

    @classmethod
    def take(cls, target: Target) -> Snapshot:
        return cls(time.monotonic(), cpu_seconds(target.server.pid),
                   cpu_seconds(target.store.pid) if target.store else 0.0, self_cpu_seconds(),
                   machine_busy_seconds())


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return float("nan")
    rank = min(len(sorted_values), max(1, math.ceil(fraction * len(sorted_values))))
    return sorted_values[rank - 1]


@dataclass
class RunResult:
    """One timed run of one server on one scenario."""

    server: str
    scenario: str
    run: int
    """0 is the discarded warm-up."""
    requests: int
    wall_s: float
    rps: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    server_cpu_us: float
    """CPU of the server process per request (policyd, or postgrey with its in-process BerkeleyDB)."""
    store_cpu_us: float
    """CPU of the server's redis-server per request (0 for postgrey)."""
    client_cpu_pct: float
    """This client's CPU over the run, in % of one core: near 100 means the client set the pace."""
    client_cpu_us: float
    """This client's CPU per request: it does the same work in every run, so when it rises together with
    the server's, the machine itself was slower during the run (a busy VM host), not the server."""
    others_cpu_pct: float
    """CPU of every other process on the machine over the run, in % of one core (disturbance)."""
    rss_mb: float
    hwm_mb: float
    store_rss_mb: float
    unexpected_answers: int
    answers: dict[str, int]


def run_bounded(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` to completion; when Ctrl-C or SIGTERM interrupts it, cancel it and let it close its
    connections while the loop still runs, instead of leaving it to be collected after the loop closed."""
    task = loop.create_task(coro)
    try:
        return loop.run_until_complete(task)
    except BaseException:
        task.cancel()
        with contextlib.suppress(BaseException):  # we are unwinding already; the first error is the one to report
            loop.run_until_complete(task)
        raise


def measure(target: Target, scenario: str, run: int, workload: Workload, loop: asyncio.AbstractEventLoop,
            connections: int, timeout: float) -> RunResult:
    """Prime (repeat), then one timed run with CPU and memory read around it."""
    STOP.check()
    target.check_alive()
    if workload.prime:
        run_bounded(loop, drive(target.port, workload.prime, connections, timeout))
    time.sleep(0.2)  # let the server finish writing its log lines from priming before the CPU snapshot
    gc.collect()
    gc.disable()  # no collector pause inside the client's timed loop
    try:
        before = Snapshot.take(target)
        result = run_bounded(loop, drive(target.port, workload.timed, connections, timeout))
        time.sleep(0.05)  # the last decision lines are written one event-loop tick after the answers
        after = Snapshot.take(target)
    finally:
        gc.enable()
    STOP.check()
    target.check_alive()
    n = len(workload.timed)
    lat = sorted(result.latencies)
    window = after.at - before.at
    own = (after.server - before.server) + (after.store - before.store) + (after.client - before.client)
    rss, hwm = memory_mb(target.server.pid)
    store_rss = memory_mb(target.store.pid)[0] if target.store else 0.0
    answers: dict[str, int] = {}
    unexpected = 0
    for answer, count in result.answers.items():
        action = answer.removeprefix(b"action=").split(None, 1)[0] if answer.startswith(b"action=") else b"?"
        answers[action.decode(errors="replace")] = answers.get(action.decode(errors="replace"), 0) + count
        if action != EXPECTED_ACTION:
            unexpected += count
    return RunResult(
        server=target.name, scenario=scenario, run=run, requests=n, wall_s=result.wall,
        rps=n / result.wall, p50_ms=percentile(lat, 0.50) * 1000, p99_ms=percentile(lat, 0.99) * 1000,
        max_ms=lat[-1] * 1000,
        server_cpu_us=(after.server - before.server) / n * 1e6, store_cpu_us=(after.store - before.store) / n * 1e6,
        client_cpu_pct=(after.client - before.client) / result.wall * 100,
        client_cpu_us=(after.client - before.client) / n * 1e6,
        others_cpu_pct=max(0.0, (after.machine - before.machine) - own) / window * 100,
        rss_mb=rss, hwm_mb=hwm, store_rss_mb=store_rss, unexpected_answers=unexpected, answers=answers,
    )


# -- summary --------------------------------------------------------------------------------------------


@dataclass
class Row:
    """Medians across the measured runs of one server on one scenario, and the ratios to postgrey."""

    server: str
    scenario: str
    runs: int
    rps: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float
    store_cpu_us: float
    rss_mb: float
    hwm_mb: float
    store_rss_mb: float
    client_cpu_pct: float
    client_cpu_us: float
    others_cpu_pct: float
    unexpected_answers: int
    rps_vs_postgrey: float | None = None
    """req/s divided by postgrey's (same scenario): how many times more requests per second."""
    cpu_vs_postgrey: float | None = None
    """postgrey's CPU per request divided by this server's (Redis included): how many times less CPU."""


def summarise(results: list[RunResult], servers: Sequence[str], scenarios: Sequence[str]) -> list[Row]:
    rows: list[Row] = []
    for scenario in scenarios:
        for server in servers:
            runs = [r for r in results if r.server == server and r.scenario == scenario and r.run > 0]
            if not runs:
                continue

            def med(get: Callable[[RunResult], float], runs: list[RunResult] = runs) -> float:
                return statistics.median(get(r) for r in runs)

            rows.append(Row(
                server, scenario, len(runs), med(lambda r: r.rps), med(lambda r: r.p50_ms), med(lambda r: r.p99_ms),
                med(lambda r: r.server_cpu_us), med(lambda r: r.store_cpu_us), med(lambda r: r.rss_mb),
                max(r.hwm_mb for r in runs), med(lambda r: r.store_rss_mb), med(lambda r: r.client_cpu_pct),
                med(lambda r: r.client_cpu_us), med(lambda r: r.others_cpu_pct),
                sum(r.unexpected_answers for r in runs),
            ))
    for row in rows:
        ref = next((r for r in rows if r.server == REFERENCE and r.scenario == row.scenario), None)
        if ref is not None:
            row.rps_vs_postgrey = row.rps / ref.rps
            own = row.server_cpu_us + row.store_cpu_us
            row.cpu_vs_postgrey = (ref.server_cpu_us + ref.store_cpu_us) / own if own else None
    return rows


COLUMNS: list[tuple[str, str, Callable[[Row], object]]] = [
    ("server", "<19", lambda r: r.server),
    ("scenario", "<8", lambda r: r.scenario),
    ("req/s", ">7,.0f", lambda r: r.rps),
    ("p50 ms", ">6.2f", lambda r: r.p50_ms),
    ("p99 ms", ">6.2f", lambda r: r.p99_ms),
    ("CPU µs/req", ">10.0f", lambda r: r.server_cpu_us),
    ("+redis µs", ">9.0f", lambda r: r.store_cpu_us),
    ("RSS MB", ">6.1f", lambda r: r.rss_mb),
    ("+redis MB", ">9.1f", lambda r: r.store_rss_mb),
    ("client %", ">8.0f", lambda r: r.client_cpu_pct),
    ("client µs", ">9.0f", lambda r: r.client_cpu_us),
    ("other %", ">7.0f", lambda r: r.others_cpu_pct),
    ("req/s x pg", ">10", lambda r: "-" if r.rps_vs_postgrey is None else f"{r.rps_vs_postgrey:.2f}x"),
    ("CPU x pg", ">8", lambda r: "-" if r.cpu_vs_postgrey is None else f"{r.cpu_vs_postgrey:.2f}x"),
]


def render_table(rows: list[Row]) -> str:
    widths = [len(format(getter(rows[0]), spec)) if rows else len(title) for title, spec, getter in COLUMNS]
    widths = [max(w, len(title)) for w, (title, _spec, _getter) in zip(widths, COLUMNS, strict=True)]
    header = "  ".join(title.ljust(w) if spec.startswith("<") else title.rjust(w)
                       for w, (title, spec, _g) in zip(widths, COLUMNS, strict=True))
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = []
        for w, (_title, spec, getter) in zip(widths, COLUMNS, strict=True):
            text = format(getter(row), spec)
            cells.append(text.ljust(w) if spec.startswith("<") else text.rjust(w))
        lines.append("  ".join(cells) + ("  (!) unexpected answers" if row.unexpected_answers else ""))
    return "\n".join(lines)


# -- orchestration --------------------------------------------------------------------------------------


def pass_order(servers: Sequence[str], index: int) -> list[str]:
    """ABBA: the warm-up pass (0) and every even pass in the given order, odd passes reversed."""
    return list(servers) if index % 2 == 0 else list(reversed(servers))


def versions(postgrey: str, python: str) -> dict[str, str]:
    def output(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unknown ({exc})"
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else "unknown"

    return {
        "postgrey": output([postgrey, "--version"]),
        "redis": output([REDIS_SERVER, "--version"]),
        "python": output([python, "--version"]),
        "mailwarden": output(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
    }


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop when installed: the client's CPU per request is what limits the measurable ceiling."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_benchmark(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    """Start the servers, then per scenario: a warm-up pass and ``runs`` measured passes in ABBA order."""
    servers: list[str] = args.servers
    targets: dict[str, Target] = {}
    for name in servers:
        STOP.check()
        progress(f"starting {name} ...")
        if name == "postgrey":
            targets[name] = start_postgrey(workdir, stack, args.postgrey)
        else:
            targets[name] = start_mailwarden(name, workdir, stack, args.python)
    loop = new_event_loop()
    stack.callback(loop.close)
    numbers = TripletNumbers()
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
        "loadavg_before": load_average(), "args": dict(vars(args)),
        "versions": versions(args.postgrey, args.python), "event_loop": type(loop).__module__,
    }
    results: list[RunResult] = []
    for scenario in args.scenarios:
        for index in range(args.runs + 1):
            for name in pass_order(servers, index):
                workload = make_workload(scenario, numbers, args.requests, args.pool)
                result = measure(targets[name], scenario, index, workload, loop, args.connections, args.timeout)
                results.append(result)
                label = "warm-up" if index == 0 else f"run {index}/{args.runs}"
                progress(f"{scenario:6} {label:9} {name:19} {result.rps:8,.0f} req/s  p50 {result.p50_ms:5.2f} ms"
                         f"  p99 {result.p99_ms:6.2f} ms  cpu {result.server_cpu_us:4.0f}+{result.store_cpu_us:3.0f}"
                         f" µs/req  client {result.client_cpu_pct:3.0f}% {result.client_cpu_us:3.0f} µs/req"
                         f"  other {result.others_cpu_pct:3.0f}%"
                         + (f"  UNEXPECTED {result.answers}" if result.unexpected_answers else ""))
    meta["loadavg_after"] = load_average()
    rows = summarise(results, servers, args.scenarios)
    return {"meta": meta, "summary": [asdict(row) for row in rows], "runs": [asdict(r) for r in results],
            "table": render_table(rows)}


def _names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names or len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {','.join(allowed)}")
        return names
    return parse


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark mailwarden policyd against postgrey on the same request streams.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--servers", type=_names(SERVERS), default=list(SERVERS),
                        help="comma-separated servers to run (ratios need postgrey)")
    parser.add_argument("--scenarios", type=_names(SCENARIOS), default=list(SCENARIOS),
                        help="new: every request a never-seen triplet; repeat: a primed pool of triplets cycled")
    parser.add_argument("--connections", type=_positive, default=10, help="concurrent persistent connections")
    parser.add_argument("--requests", type=_positive, default=10000, help="timed requests per run")
    parser.add_argument("--runs", type=_positive, default=3, help="measured runs per server and scenario "
                        "(after one discarded warm-up run)")
    parser.add_argument("--pool", type=_positive, default=500, help="distinct triplets in the repeat scenario")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds allowed per run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, server logs)")
    parser.add_argument("--postgrey", default=POSTGREY, help="postgrey executable")
    parser.add_argument("--python", default=str(VENV_PYTHON if VENV_PYTHON.exists() else sys.executable),
                        help="Python that has mailwarden installed")
    return parser.parse_args(argv)


def stop_children(stack: contextlib.ExitStack) -> None:
    """Stop every child (each stop is bounded), with further stop signals ignored so that a second Ctrl-C
    cannot cut the clean-up short."""
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in STOP_SIGNALS}
    try:
        stack.close()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def print_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        print(json.dumps({k: v for k, v in report.items() if k != "table"}, indent=2))
        return
    meta = report["meta"]
    print(f"{meta['date']}  {meta['cpus']} cores  load average before {meta['loadavg_before']} "
          f"after {meta['loadavg_after']}  mailwarden {meta['versions']['mailwarden']}")
    print(f"{args.connections} connections, {args.requests} requests per run, median of {args.runs} runs "
          f"(ABBA order, warm-up run discarded)\n")
    print(report["table"])


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if "postgrey" in args.servers and not Path(args.postgrey).exists():
        progress(f"{args.postgrey} not found: install postgrey (make bench does) or leave it out of --servers")
        return 2
    STOP.install()
    workdir = Path(tempfile.mkdtemp(prefix="mailwarden-bench-"))
    workdir.chmod(0o755)  # postgrey runs as user postgrey and must reach its db directory in here
    keep = args.keep
    stack = contextlib.ExitStack()
    try:
        try:
            report = run_benchmark(args, workdir, stack)
        finally:
            progress("stopping servers ...")
            stop_children(stack)
    except Interrupted as exc:
        progress(f"interrupted ({exc}); every server stopped")
        return 128 + exc.signum
    except BenchError as exc:
        keep = True
        progress(f"benchmark failed: {exc}")
        return 1
    except Exception:
        keep = True  # an unforeseen failure: the servers' logs are the first thing to read
        raise
    finally:
        if keep:
            progress(f"work directory kept (configs, server logs): {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(report, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
