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
- ``mailwarden-border`` (policyd with every border check: DNSBL, SPF, recipients from LDAP, quota from
  Dovecot) has nothing to compare with in postgrey. It runs after the greylisting comparison, against the
  test harness's real DNS server, slapd and Dovecot, on a request mix whose every request has a known
  right answer (listed client, SPF fail, unknown, disabled or full recipient, or greylisted), which is
  checked. Each stream is timed twice: "cold" against an emptied Redis, then "warm" as retries, when
  the Redis caches answer. Its table adds the CPU of the DNS server, slapd and Dovecot. See border.py.

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
import select
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

from procstat import CLK_TCK, cpu_seconds, group_cpu_seconds, load_average, memory_mib

REPO = Path(__file__).resolve().parents[1]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
POSTGREY = "/usr/sbin/postgrey"
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
PR_SET_PDEATHSIG = 1

BORDER = "mailwarden-border"
SERVERS = ("mailwarden-greylist", "mailwarden-all", "postgrey", BORDER)
"""Benchmarked servers: policyd with greylisting only (what postgrey does), policyd with its default
pipeline (blocklist, ratelimit, greylist), and postgrey itself (the reference for the ratios); and policyd
with every border check (DNSBL, SPF, recipients from LDAP, quota from Dovecot), which postgrey has no
counterpart for: it is measured on its own request mix and shown in a table of its own (see border.py)."""
MAILWARDEN_CHECKS = {
    "mailwarden-greylist": ["greylist"],
    "mailwarden-all": ["access", "blocklist", "ratelimit", "greylist"],
    BORDER: ["access", "blocklist", "ratelimit", "dnsbl", "spf", "recipients", "quota", "greylist"],
}
SCENARIOS = ("new", "repeat")
CACHE_STATES = ("cold", "warm")
"""The border scenarios: "cold", a stream against an empty Redis (every DNSBL and recipient lookup goes to
DNS or LDAP, except repeats within the stream); "warm", the same stream again right after, as the
retries of the same transactions (new ``instance``), so the Redis caches answer."""
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
    expected: list[bytes] | None = None
    """Per timed request, what its answer must start with (border mix); None: EXPECTED_ACTION for all."""
    outcomes: list[str] | None = None
    """Per timed request, the name of its expected outcome (border mix), for the per-outcome counts."""


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

    __slots__ = ("active", "answers", "done", "latencies", "next", "replies", "requests", "total")

    def __init__(self, requests: list[bytes], done: asyncio.Future[None], keep_replies: bool = False) -> None:
        self.requests = requests
        self.total = len(requests)
        self.next = 0
        self.latencies: list[float] = []
        self.answers: dict[bytes, int] = {}
        self.replies: list[bytes] | None = [b""] * self.total if keep_replies else None
        """Each request's answer, by index (the border mix has a different expected answer per request)."""
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

    __slots__ = ("buf", "finished", "index", "sent", "shared", "transport")

    def __init__(self, shared: _Shared) -> None:
        self.shared = shared
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.sent = 0.0
        self.index = 0
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
        self.index = index
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
        if shared.replies is not None:
            shared.replies[self.index] = data
        self._send_next()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished:
            self.shared.fail(f"server closed a connection after {len(self.shared.latencies)} answers ({exc})")


@dataclass
class DriveResult:
    wall: float
    latencies: list[float]
    answers: dict[bytes, int]
    replies: list[bytes] | None = None


async def drive(port: int, requests: list[bytes], connections: int, timeout: float,
                keep_replies: bool = False) -> DriveResult:
    """Send ``requests`` over ``connections`` persistent connections (each takes the next request as soon
    as its previous one is answered) and time every answer. Bounded by ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    shared = _Shared(requests, loop.create_future(), keep_replies)
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
    return DriveResult(wall, shared.latencies, shared.answers, shared.replies)


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
    control: bool = False
    """stdin and stdout are pipes to this script (a line protocol: the border benchmark's DNS child)."""
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> Child:
        with self.log_path.open("ab") as log:
            # Own session: Ctrl-C reaches only this script, which then stops the children in order.
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.PIPE if self.control else subprocess.DEVNULL,
                                         stdout=subprocess.PIPE if self.control else log, stderr=log, env=env,
                                         start_new_session=True, preexec_fn=_die_with_parent, user=self.user,
                                         group=self.user, extra_groups=[] if self.user else None)
        return self

    def ask(self, line: str | None, timeout: float = 10.0) -> str:
        """Send ``line`` (if any) on the control pipe and read one line back, within ``timeout`` seconds."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        if line is not None:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while not select.select([self.proc.stdout], [], [], 0.1)[0]:
            STOP.check()
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name} did not answer {line!r} within {timeout:g}s; log {self.log_path}")
        answer = self.proc.stdout.readline().decode(errors="replace").strip()
        if not answer:
            self.check_alive()
            raise BenchError(f"{self.name} closed its control pipe; log {self.log_path}")
        return answer

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
        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
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
    helpers: dict[str, Callable[[], float]] = field(default_factory=dict)
    """CPU seconds so far of each further process the server depends on (border: DNS, slapd, Dovecot)."""
    alive: list[Callable[[], None]] = field(default_factory=list)
    """Checks that raise BenchError when one of those processes died."""
    queries: Callable[[], dict[str, int]] | None = None
    """DNS queries answered so far, by kind (border: the DNS child's counts)."""
    redis_port: int = 0

    def check_alive(self) -> None:
        self.server.check_alive()
        if self.store:
            self.store.check_alive()
        for check in self.alive:
            check()


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


def start_mailwarden(name: str, workdir: Path, stack: contextlib.ExitStack, python: str,
                     more_config: str = "", checks_run: Sequence[str] | None = None,
                     start_within: float = 30.0) -> Target:
    """policyd from a config file as an operator writes one; its own redis-server; decisions logged (as
    in production) to a file. ``more_config``: further tables (the border checks' settings);
    ``checks_run``: the checks, if not MAILWARDEN_CHECKS[name]."""
    store, redis_port = start_redis(workdir, stack, f"{name}-redis")
    port = free_port()
    config = workdir / f"{name}.toml"
    checks = ", ".join(f'"{check}"' for check in (checks_run or MAILWARDEN_CHECKS[name]))
    config.write_text(
        f'[redis]\nurl = "redis://127.0.0.1:{redis_port}/0"\n\n'
        "[logging]\ndecisions = true\n\n"
        f'[policyd]\nlisten = ["127.0.0.1:{port}"]\nchecks = [{checks}]\n'
        + more_config
    )
    env = {key: value for key, value in os.environ.items() if key != "MAILWARDEN_CONFIG"}
    server = Child(name, [python, "-m", "mailwarden.cli", "--config", str(config), "policyd"],
                   workdir / f"{name}.log")
    stack.callback(server.stop)  # registered after its Redis: stopped before it
    server.start(env)
    server.wait_port(port, start_within)
    return Target(name, port, server, store, redis_port=redis_port)


def start_border(workdir: Path, stack: contextlib.ExitStack, python: str, streams: Sequence[Sequence[Any]],
                 users: int, without: Sequence[str] = ()) -> Target:
    """policyd with every border check, and what they ask: the harness's DNS server in a child process
    (the test zones, plus an entry for each listed client of ``streams``), a private slapd (the test
    directory, plus full@example.org and ``users`` generated mailboxes) and a private Dovecot with its
    quota-status service (the harness's users and the generated mailboxes). See border.py."""
    import border  # the harness (tests/harness/) is needed for this server only

    zone = workdir / "border-zone.txt"
    zone.write_text(border.zone_text(streams))
    dns = Child("dns", [python, str(Path(__file__).with_name("border.py")), "serve-dns", str(zone)],
                workdir / "border-dns.log", control=True)
    stack.callback(dns.stop)
    dns.start()
    reply = dns.ask(None, timeout=60)
    if not reply.startswith("port "):
        raise BenchError(f"the DNS child said {reply!r}; log {dns.log_path}")
    dns_port = int(reply.split()[1])

    ldif = workdir / "border-directory.ldif"
    ldif.write_text(border.ldif_text(users))
    (workdir / "slapd").mkdir()
    slapd = border.BenchSlapd(directory=workdir / "slapd", ldif=ldif, preexec=_die_with_parent)
    stack.callback(slapd.stop)
    slapd.start()
    (workdir / "dovecot").mkdir()
    dovecot = border.BenchDovecot(directory=workdir / "dovecot", users=border.mail_users(users),
                                  preexec=_die_with_parent)
    stack.callback(dovecot.stop)
    dovecot.start()

    lists = "".join(f'\n[[policyd.dnsbl.lists]]\nzone = "{lst["zone"]}"\nweight = {lst["weight"]}\n'
                    for lst in border.LISTS)
    more_config = (
        f'\n[policyd.dnsbl]\nthreshold = {border.THRESHOLD}\n{lists}'
        f'\n[policyd.recipients]\ndomains = ["{border.DOMAIN}"]\nsources = ["ldap"]\n'
        f'\n[policyd.recipients.ldap]\nservers = ["{slapd.url}"]\nbase = "{slapd.base}"\n'
        f'\n[policyd.quota]\ndovecot = "127.0.0.1:{dovecot.quota_port}"\n'
        f'\n[dns]\nnameservers = ["127.0.0.1"]\nport = {dns_port}\ntimeout = "1s"\ntries = 1\n'
    )
    target = start_mailwarden(BORDER, workdir, stack, python, more_config, border.checks(without))
    assert slapd.proc is not None and dovecot.proc is not None
    slapd_pid, dovecot_pid = slapd.proc.pid, dovecot.proc.pid

    def components_alive() -> None:
        dns.check_alive()
        for what, proc, log in (("slapd", slapd.proc, workdir / "slapd" / "slapd.log"),
                                ("dovecot", dovecot.proc, workdir / "dovecot" / "dovecot.log")):
            if proc is None or proc.poll() is not None:
                raise BenchError(f"{what} exited; log {log}")

    def query_counts() -> dict[str, int]:
        return {key: int(value) for key, value in json.loads(dns.ask("stats")).items()}

    target.helpers = {"dns": lambda: cpu_seconds(dns.pid), "slapd": lambda: cpu_seconds(slapd_pid),
                      "dovecot": lambda: group_cpu_seconds(dovecot_pid)}
    target.alive = [components_alive]
    target.queries = query_counts
    return target


def redis_command(port: int, command: bytes, timeout: float = 10.0) -> bytes:
    """One inline command to a redis-server, its one-line reply (FLUSHALL: b"+OK")."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(command + b"\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            reply += chunk
    return reply.strip()


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




@dataclass
class Snapshot:
    at: float
    server: float
    store: float
    client: float
    machine: float
    helpers: dict[str, float] = field(default_factory=dict)

    @classmethod
    def take(cls, target: Target) -> Snapshot:
        return cls(time.monotonic(), cpu_seconds(target.server.pid),
                   cpu_seconds(target.store.pid) if target.store else 0.0, self_cpu_seconds(),
                   machine_busy_seconds(), {name: read() for name, read in target.helpers.items()})


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
    helper_cpu_us: dict[str, float] = field(default_factory=dict)
    """CPU per request of each process the server depends on (border: dns, slapd, dovecot)."""
    dns_queries: dict[str, float] = field(default_factory=dict)
    """DNS queries per request the DNS server answered during the run, by kind (bl.test, ..., spf) and total."""
    outcomes: dict[str, list[int]] = field(default_factory=dict)
    """Border mix: per expected outcome, [requests, answers that did not match]."""
    mismatches: list[str] = field(default_factory=list)
    """Border mix: a few requests whose answer did not match, with what came back."""


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


def check_replies(workload: Workload, replies: list[bytes]) -> tuple[int, dict[str, list[int]], list[str]]:
    """Each reply against what its request's category must get: (mismatches, per outcome [requests,
    mismatches], a few mismatched requests with their answers)."""
    assert workload.expected is not None and workload.outcomes is not None
    outcomes: dict[str, list[int]] = {}
    examples: list[str] = []
    bad = 0
    for request, expected, outcome, reply in zip(workload.timed, workload.expected, workload.outcomes, replies,
                                                 strict=True):
        counts = outcomes.setdefault(outcome, [0, 0])
        counts[0] += 1
        if not reply.startswith(expected):
            counts[1] += 1
            bad += 1
            if len(examples) < 5:
                attrs = dict(line.split("=", 1) for line in request.decode().splitlines() if "=" in line)
                examples.append(f"{outcome}: client={attrs['client_address']} sender={attrs['sender']} "
                                f"recipient={attrs['recipient']} -> {reply.decode(errors='replace').strip()}")
    return bad, outcomes, examples


def measure(target: Target, scenario: str, run: int, workload: Workload, loop: asyncio.AbstractEventLoop,
            connections: int, timeout: float) -> RunResult:
    """Prime (repeat), then one timed run with CPU and memory read around it."""
    STOP.check()
    target.check_alive()
    if workload.prime:
        run_bounded(loop, drive(target.port, workload.prime, connections, timeout))
    time.sleep(0.2)  # let the server finish writing its log lines from priming before the CPU snapshot
    queries_before = target.queries() if target.queries else {}
    gc.collect()
    gc.disable()  # no collector pause inside the client's timed loop
    try:
        before = Snapshot.take(target)
        result = run_bounded(loop, drive(target.port, workload.timed, connections, timeout,
                                         keep_replies=workload.expected is not None))
        time.sleep(0.1)  # the last decision lines are written up to [logging] decision_batch (50 ms) after the answers
        after = Snapshot.take(target)
    finally:
        gc.enable()
    STOP.check()
    target.check_alive()
    n = len(workload.timed)
    queries_after = target.queries() if target.queries else {}
    lat = sorted(result.latencies)
    window = after.at - before.at
    helpers = {name: after.helpers[name] - before.helpers[name] for name in before.helpers}
    own = (after.server - before.server) + (after.store - before.store) + (after.client - before.client) \
        + sum(helpers.values())
    rss, hwm = memory_mib(target.server.pid)
    store_rss = memory_mib(target.store.pid)[0] if target.store else 0.0
    answers: dict[str, int] = {}
    unexpected = 0
    for answer, count in result.answers.items():
        action = answer.removeprefix(b"action=").split(None, 1)[0] if answer.startswith(b"action=") else b"?"
        answers[action.decode(errors="replace")] = answers.get(action.decode(errors="replace"), 0) + count
        if workload.expected is None and action != EXPECTED_ACTION:
            unexpected += count
    outcomes: dict[str, list[int]] = {}
    examples: list[str] = []
    if workload.expected is not None:
        assert result.replies is not None
        unexpected, outcomes, examples = check_replies(workload, result.replies)
    return RunResult(
        server=target.name, scenario=scenario, run=run, requests=n, wall_s=result.wall,
        rps=n / result.wall, p50_ms=percentile(lat, 0.50) * 1000, p99_ms=percentile(lat, 0.99) * 1000,
        max_ms=lat[-1] * 1000,
        server_cpu_us=(after.server - before.server) / n * 1e6, store_cpu_us=(after.store - before.store) / n * 1e6,
        client_cpu_pct=(after.client - before.client) / result.wall * 100,
        client_cpu_us=(after.client - before.client) / n * 1e6,
        others_cpu_pct=max(0.0, (after.machine - before.machine) - own) / window * 100,
        rss_mb=rss, hwm_mb=hwm, store_rss_mb=store_rss, unexpected_answers=unexpected, answers=answers,
        helper_cpu_us={name: value / n * 1e6 for name, value in helpers.items()},
        dns_queries={kind: (queries_after[kind] - queries_before.get(kind, 0)) / n for kind in queries_after},
        outcomes=outcomes, mismatches=examples,
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


COLUMNS: list[tuple[str, str, Callable[[Any], object]]] = [
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


def render_table(rows: Sequence[Any], columns: list[tuple[str, str, Callable[[Any], object]]] = COLUMNS) -> str:
    widths = [len(format(getter(rows[0]), spec)) if rows else len(title) for title, spec, getter in columns]
    widths = [max(w, len(title)) for w, (title, _spec, _getter) in zip(widths, columns, strict=True)]
    header = "  ".join(title.ljust(w) if spec.startswith("<") else title.rjust(w)
                       for w, (title, spec, _g) in zip(widths, columns, strict=True))
    lines = [header, "-" * len(header)]
    for row in rows:
        cells = []
        for w, (_title, spec, getter) in zip(widths, columns, strict=True):
            text = format(getter(row), spec)
            cells.append(text.ljust(w) if spec.startswith("<") else text.rjust(w))
        lines.append("  ".join(cells) + ("  (!) unexpected answers" if row.unexpected_answers else ""))
    return "\n".join(lines)


@dataclass
class BorderRow:
    """Medians across the measured runs of the border server in one cache state (no postgrey ratio:
    postgrey does none of these checks)."""

    server: str
    cache: str
    runs: int
    rps: float
    p50_ms: float
    p99_ms: float
    server_cpu_us: float
    store_cpu_us: float
    helper_cpu_us: dict[str, float]
    total_cpu_us: float
    """policyd + Redis + DNS server + slapd + Dovecot, per request."""
    rss_mb: float
    store_rss_mb: float
    client_cpu_pct: float
    client_cpu_us: float
    others_cpu_pct: float
    dns_queries: dict[str, float]
    unexpected_answers: int
    """Over all measured runs: answers that did not match their request's category."""
    outcomes: dict[str, list[int]]
    """Over all measured runs: per outcome, [requests, mismatches]."""


def summarise_border(results: list[RunResult]) -> list[BorderRow]:
    rows: list[BorderRow] = []
    for cache in CACHE_STATES:
        runs = [r for r in results if r.scenario == cache and r.run > 0]
        if not runs:
            continue

        def med(get: Callable[[RunResult], float], runs: list[RunResult] = runs) -> float:
            return statistics.median(get(r) for r in runs)

        helpers = {name: med(lambda r, name=name: r.helper_cpu_us[name]) for name in runs[0].helper_cpu_us}
        outcomes: dict[str, list[int]] = {}
        for run in runs:
            for outcome, (count, bad) in run.outcomes.items():
                total = outcomes.setdefault(outcome, [0, 0])
                total[0] += count
                total[1] += bad
        rows.append(BorderRow(
            BORDER, cache, len(runs), med(lambda r: r.rps), med(lambda r: r.p50_ms), med(lambda r: r.p99_ms),
            med(lambda r: r.server_cpu_us), med(lambda r: r.store_cpu_us), helpers,
            med(lambda r: r.server_cpu_us + r.store_cpu_us + sum(r.helper_cpu_us.values())),
            med(lambda r: r.rss_mb), med(lambda r: r.store_rss_mb), med(lambda r: r.client_cpu_pct),
            med(lambda r: r.client_cpu_us), med(lambda r: r.others_cpu_pct),
            {kind: med(lambda r, kind=kind: r.dns_queries.get(kind, 0.0)) for kind in runs[0].dns_queries},
            sum(r.unexpected_answers for r in runs), outcomes,
        ))
    return rows


BORDER_COLUMNS: list[tuple[str, str, Callable[[Any], object]]] = [
    ("server", "<17", lambda r: r.server),
    ("cache", "<5", lambda r: r.cache),
    ("req/s", ">7,.0f", lambda r: r.rps),
    ("p50 ms", ">6.2f", lambda r: r.p50_ms),
    ("p99 ms", ">6.2f", lambda r: r.p99_ms),
    ("CPU µs/req", ">10.0f", lambda r: r.server_cpu_us),
    ("+redis µs", ">9.0f", lambda r: r.store_cpu_us),
    ("+dns µs", ">7.0f", lambda r: r.helper_cpu_us.get("dns", 0.0)),
    ("+slapd µs", ">9.0f", lambda r: r.helper_cpu_us.get("slapd", 0.0)),
    ("+dovecot µs", ">11.0f", lambda r: r.helper_cpu_us.get("dovecot", 0.0)),
    ("total µs", ">8.0f", lambda r: r.total_cpu_us),
    ("RSS MB", ">6.1f", lambda r: r.rss_mb),
    ("client %", ">8.0f", lambda r: r.client_cpu_pct),
    ("client µs", ">9.0f", lambda r: r.client_cpu_us),
    ("other %", ">7.0f", lambda r: r.others_cpu_pct),
    ("DNS q/req", ">9.2f", lambda r: r.dns_queries.get("total", 0.0)),
]


def render_border(rows: list[BorderRow], results: list[RunResult]) -> str:
    """The border table, then per expected outcome: its requests per run, its answer, the mismatches."""
    lines = ["border checks (mailwarden-border; no postgrey ratio: postgrey does none of these checks)", "",
             render_table(rows, BORDER_COLUMNS), ""]
    import border

    per_run = next((r.outcomes for r in results if r.run > 0), {})
    width = max(len(name) for name in border.OUTCOMES)
    lines.append(f"{'outcome':{width}}  {'req/run':>7}  " + "  ".join(f"{row.cache + ' bad':>8}" for row in rows)
                 + "  expected answer")
    for outcome in border.OUTCOMES:
        expected = border.EXPECTED[outcome].decode().removeprefix("action=").rstrip("\n")
        lines.append(f"{outcome:{width}}  {per_run.get(outcome, [0])[0]:>7}  "
                     + "  ".join(f"{row.outcomes.get(outcome, [0, 0])[1]:>8}" for row in rows)
                     + f"  {expected}...")
    examples = [f"  {row.cache} run {r.run}: {text}" for row in rows for r in results
                if r.scenario == row.cache and r.run > 0 for text in r.mismatches]
    if examples:
        lines += ["", "(!) answers that did not match their request's category (first few):", *examples[:10]]
    return "\n".join(lines)


def border_workload(stream: Sequence[Any], attempts: range) -> Workload:
    """The stream's requests as one delivery attempt each (``attempts``: a new Postfix ``instance``)."""
    import border

    timed = [REQUEST_TEMPLATE.format(client=request.client, port=1024 + (attempt * 7919 + index) % 64000,
                                     sender=request.sender, recipient=request.recipient,
                                     instance=f"{attempt:x}.{index:x}.b3c.0").encode()
             for index, (request, attempt) in enumerate(zip(stream, attempts, strict=True))]
    return Workload(timed, expected=[border.EXPECTED[request.outcome] for request in stream],
                    outcomes=[request.outcome for request in stream])


def run_border(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack,
               loop: asyncio.AbstractEventLoop) -> list[RunResult]:
    """policyd with the border checks: per stream (a warm-up stream, then ``runs`` measured ones), Redis
    flushed, the stream timed ("cold"), then timed again as retries ("warm")."""
    import border

    assert border.checks() == MAILWARDEN_CHECKS[BORDER]
    requests = args.border_requests
    numbers = TripletNumbers()
    streams = [border.make_stream(index, numbers.take(requests), border.directory_size(requests), client_address,
                                  args.border_without)
               for index in range(args.runs + 1)]
    progress(f"starting {BORDER} (DNS child, slapd with {border.directory_size(requests):,} generated users, "
             f"Dovecot, Redis, policyd with checks {','.join(border.checks(args.border_without))}) ...")
    target = start_border(workdir, stack, args.python, streams, border.directory_size(requests),
                          args.border_without)
    results: list[RunResult] = []
    for index, stream in enumerate(streams):
        reply = redis_command(target.redis_port, b"FLUSHALL")
        if reply != b"+OK":
            raise BenchError(f"FLUSHALL answered {reply!r}")
        for cache in CACHE_STATES:
            workload = border_workload(stream, numbers.attempts(len(stream)))
            result = measure(target, cache, index, workload, loop, args.connections, args.timeout)
            results.append(result)
            label = "warm-up" if index == 0 else f"run {index}/{args.runs}"
            helpers = "+".join(f"{result.helper_cpu_us[name]:.0f}" for name in ("dns", "slapd", "dovecot"))
            progress(f"{cache:6} {label:9} {BORDER:19} {result.rps:8,.0f} req/s  p50 {result.p50_ms:5.2f} ms"
                     f"  p99 {result.p99_ms:6.2f} ms  cpu {result.server_cpu_us:4.0f}+{result.store_cpu_us:3.0f}"
                     f"+{helpers} µs/req (policyd+redis+dns+slapd+dovecot)  client {result.client_cpu_pct:3.0f}%"
                     f" {result.client_cpu_us:3.0f} µs/req  other {result.others_cpu_pct:3.0f}%"
                     f"  dns {result.dns_queries.get('total', 0.0):.2f} q/req"
                     + (f"  MISMATCHED {result.unexpected_answers}: {result.mismatches[:2]}"
                        if result.unexpected_answers else ""))
    return results


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
    """Start the servers, then per scenario: a warm-up pass and ``runs`` measured passes in ABBA order; then
    the border server (its own environment, its own request mix), cold and warm."""
    servers: list[str] = [name for name in args.servers if name != BORDER]
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
    for scenario in args.scenarios if servers else ():
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
    report: dict[str, Any] = {"meta": meta}
    if servers:
        rows = summarise(results, servers, args.scenarios)
        report.update(summary=[asdict(row) for row in rows], runs=[asdict(r) for r in results],
                      table=render_table(rows))
        meta["loadavg_after_greylisting"] = load_average()
    if BORDER in args.servers:
        border_results = run_border(args, workdir, stack, loop)
        border_rows = summarise_border(border_results)
        report.update(border_summary=[asdict(row) for row in border_rows],
                      border_runs=[asdict(r) for r in border_results],
                      border_table=render_border(border_rows, border_results))
    meta["loadavg_after"] = load_average()
    return report


def _names(allowed: Sequence[str], empty: bool = False) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or (not names and not empty) or len(set(names)) != len(names):
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
    parser.add_argument("--border-requests", type=_positive, default=3000,
                        help="timed requests per run of mailwarden-border (cold, and again warm)")
    parser.add_argument("--border-without", type=_names(("dnsbl", "spf", "recipients", "quota"), empty=True),
                        default=[], help="leave these checks out of mailwarden-border (what does each cost?)")
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
        print(json.dumps({k: v for k, v in report.items() if k not in ("table", "border_table")}, indent=2))
        return
    meta = report["meta"]
    print(f"{meta['date']}  {meta['cpus']} cores  load average before {meta['loadavg_before']} "
          f"after {meta['loadavg_after']}  mailwarden {meta['versions']['mailwarden']}")
    if "table" in report:
        print(f"{args.connections} connections, {args.requests} requests per run, median of {args.runs} runs "
              f"(ABBA order, warm-up run discarded)\n")
        print(report["table"])
    if "border_table" in report:
        print(f"\n{args.connections} connections, {args.border_requests} requests per run, median "
              f"of {args.runs} runs (each: Redis flushed, the stream cold, then again warm; warm-up stream "
              f"discarded)" + (f"; WITHOUT {','.join(args.border_without)}" if args.border_without else "") + "\n")
        print(report["border_table"])


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
