"""policyd against clients that try to hold it: tricklers that never finish a request, more connections
than max_connections, a descriptor limit too small for the config, and a SIGTERM under full load.

Nothing here passes or fails on a wall-clock performance number: waits are bounded polls on a positive
signal; the times measured are printed (pytest -s) for the record."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from conftest import base_settings
from harness.lifecycle import terminate
from harness.net import free_port, wait_for, wait_port
from harness.policyd_proc import PolicyClient, encode_request, render_toml

GREYLIST_ONLY = {"checks": ["greylist"]}
DEFER = "DEFER_IF_PERMIT Greylisted, please try again in 5 minutes"
RESERVE = 64
"""Descriptors policyd keeps beside max_connections (policyd.server.DESCRIPTOR_RESERVE)."""


def metric(port: int, name: str, labels: str = "") -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def closed_by_server(sock: socket.socket) -> bool:
    """True once the server's end of the connection is closed (EOF or reset waiting to be read)."""
    timeout = sock.gettimeout()
    sock.settimeout(0)  # with a timeout, Python waits for the socket to be readable before recv
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


def served(port: int) -> bool:
    """One fresh connection asks one question; False when the server refuses the connection."""
    try:
        with PolicyClient(("127.0.0.1", port), timeout=5) as client:
            return client.ask(sasl_username="normal") == "DUNNO"
    except OSError:
        return False


# -- slow and hostile clients ---------------------------------------------------------------------

@dataclass
class Trickler:
    """Connects and sends a request one byte every 0.5 s, never finishing it; notes when it is cut."""

    port: int
    connected: threading.Event = field(default_factory=threading.Event)
    cut_after: float | None = None
    bytes_sent: int = 0

    def run(self, stop: threading.Event) -> None:
        data = encode_request()
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            self.connected.set()
            started = time.monotonic()
            while not stop.is_set() and self.bytes_sent < len(data) - 1:
                if closed_by_server(sock):
                    self.cut_after = time.monotonic() - started
                    return
                try:
                    sock.sendall(data[self.bytes_sent:self.bytes_sent + 1])
                except OSError:
                    self.cut_after = time.monotonic() - started
                    return
                self.bytes_sent += 1
                stop.wait(0.5)


def _trickle(tricklers: list[Trickler]) -> tuple[threading.Event, list[threading.Thread]]:
    stop = threading.Event()
    threads = [threading.Thread(target=t.run, args=(stop,), daemon=True) for t in tricklers]
    for thread in threads:
        thread.start()
    for trickler in tricklers:
        assert trickler.connected.wait(10)
    return stop, threads


def test_a_trickled_request_is_cut_at_its_deadline_from_the_first_byte(policyd_factory, redis_server):
    """A request sent one byte every 0.5 s is cut request_timeout after its first byte: the bytes that keep
    coming do not extend it."""
    deadline = 2.0
    daemon = policyd_factory(base_settings(redis_server.url, **GREYLIST_ONLY, max_connections=100,
                                           request_timeout=f"{deadline:g}s", idle_timeout="60s"))
    tricklers = [Trickler(daemon.port) for _ in range(5)]
    stop, threads = _trickle(tricklers)
    try:
        wait_for(lambda: all(t.cut_after is not None for t in tricklers), deadline + 10,
                 what="every trickler disconnected")
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    assert all(t.bytes_sent < len(encode_request()) - 1 for t in tricklers), "a trickler finished its request"
    daemon.wait_log('client stalled inside a request; closing')
    daemon.wait_log('after=2s since="its first byte"')


def test_tricklers_holding_every_slot_do_not_lock_out_normal_clients(policyd_factory, redis_server):
    """max_connections tricklers (one byte every 0.5 s, a request deadline far away): a new client takes the
    slot of the one trickling longest, so normal clients are served at once rather than after the deadline."""
    metrics_port = free_port()
    settings = base_settings(redis_server.url, **GREYLIST_ONLY, max_connections=20, request_timeout="60s",
                             idle_timeout="60s")
    settings["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    daemon = policyd_factory(settings)
    tricklers = [Trickler(daemon.port) for _ in range(20)]
    stop, threads = _trickle(tricklers)
    try:
        # a trickler counts as one once its request has been arriving for 0.1 s; from then on its slot goes
        # to the next new client (without that, only its 60 s request deadline would free it)
        wait_for(lambda: served(daemon.port), 5, interval=0.02, what="a normal client served")
        latencies = []
        for _ in range(15):
            started = time.monotonic()
            # within 5 s (the client's time-out): long before a trickler's 60 s deadline frees a slot
            assert served(daemon.port)
            latencies.append(time.monotonic() - started)
        evicted = metric(metrics_port, "mailwarden_policyd_connections_evicted_total", '{state="inside a request"}')
    finally:
        stop.set()
        for thread in threads:
            thread.join(5)
    latencies.sort()
    print(f"\nnormal clients beside 20 tricklers at max_connections=20: p50 {1000 * latencies[7]:.1f} ms, "
          f"max {1000 * latencies[-1]:.1f} ms; {evicted:g} tricklers evicted")
    assert evicted >= 1  # every slot was held: the first normal client took a trickler's
    daemon.wait_log('msg="connections closed to make room for new clients" state="inside a request"')


# -- refusals over max_connections ----------------------------------------------------------------

def test_refusals_are_logged_once_per_interval_with_a_count_and_all_counted(policyd_factory, redis_server):
    metrics_port = free_port()
    settings = base_settings(redis_server.url, max_connections=5)
    settings["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    daemon = policyd_factory(settings)
    held = [daemon.connect() for _ in range(5)]
    # the five slots are busy (a request every 0.2 s each), so none may be freed for a newcomer
    stop = threading.Event()
    answers: list[str | None] = []

    def keep_busy(client: PolicyClient) -> None:
        while not stop.is_set():
            answers.append(client.ask(sasl_username="held"))
            stop.wait(0.2)

    threads = [threading.Thread(target=keep_busy, args=(client,), daemon=True) for client in held]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: len(answers) >= 5, 10, what="the held connections answered")
        for _ in range(200):
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
                assert sock.recv(100) == b""  # refused: closed without a word
        name = "mailwarden_policyd_connections_refused_total"
        wait_for(lambda: metric(metrics_port, name, '{reason="max_connections"}') == 200, 10,
                 what="200 refusals counted")
        # the first refusal is logged at once, the rest in one line at the end of the interval
        wait_for(lambda: sum(_refusals_logged(daemon.log_text())) == 200, 15, what="200 refusals in the log")
        lines = _refusals_logged(daemon.log_text())
        assert lines == [1, 199], lines
        stop.set()
        for thread in threads:
            thread.join(5)
        assert set(answers) == {"DUNNO"}
    finally:
        stop.set()
        for client in held:
            client.close()


def _refusals_logged(log: str) -> list[int]:
    return [int(n) for n in re.findall(r'msg="connections refused" reason=max_connections .*count=(\d+)', log)]


# -- descriptor limits ------------------------------------------------------------------------------

def _start_limited(workdir: Path, settings: dict, soft: int, hard: int) -> tuple[subprocess.Popen[bytes], int]:
    """policyd as a process whose RLIMIT_NOFILE is (soft, hard), as `ulimit -n` or LimitNOFILE= set it."""
    port = free_port()
    policyd = {**settings["policyd"], "listen": [f"127.0.0.1:{port}"]}
    config = workdir / "policyd.toml"
    config.write_text(render_toml({**settings, "policyd": policyd}))
    log = (workdir / "policyd.log").open("ab")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mailwarden.cli", "--config", str(config), "policyd"],
        stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)),
    )
    return proc, port


def test_max_connections_beyond_the_descriptor_limit_refuses_to_start(tmp_path, redis_server):
    proc, _port = _start_limited(tmp_path, base_settings(redis_server.url, max_connections=256), 256, 256)
    try:
        assert proc.wait(15) == os.EX_CONFIG
    finally:
        terminate(proc)
    lines = [line for line in (tmp_path / "policyd.log").read_text().splitlines() if "max_connections" in line]
    assert len(lines) == 1, lines
    assert "256" in lines[0] and "open files" in lines[0] and f"{256 + RESERVE}" in lines[0]


def test_soft_limit_raised_to_hard_and_redis_reconnects_with_every_slot_taken(tmp_path, own_redis):
    """Soft 256, hard 1024: policyd raises its soft limit, holds max_connections clients, and with all of
    them connected still has the descriptors to reconnect to a restarted Redis."""
    max_connections = 400
    settings = base_settings(own_redis.url, **GREYLIST_ONLY, max_connections=max_connections)
    proc, port = _start_limited(tmp_path, settings, 256, 1024)
    clients: list[PolicyClient] = []
    try:
        wait_port(port, 15)
        for n in range(max_connections):
            client = PolicyClient(("127.0.0.1", port))
            clients.append(client)
            assert client.ask(sasl_username=f"c{n}") == "DUNNO", f"connection {n + 1} not served"
        own_redis.stop()
        assert clients[0].ask(sender="down@example.org") == "DUNNO"  # fail open while Redis is away
        own_redis.start()
        wait_for(lambda: clients[0].ask(sender=f"up{time.monotonic()}@example.org") == DEFER, 15,
                 what="greylisting to resume after the Redis restart")
        assert clients[-1].ask(sender="last@example.org") == DEFER
    finally:
        for client in clients:
            client.close()
        terminate(proc)
    log = (tmp_path / "policyd.log").read_text()
    assert "Too many open files" not in log
    assert "open files limit raised" in log


# -- shutdown under load ----------------------------------------------------------------------------

@dataclass
class LoadClient:
    """Sends requests back to back, one at a time as Postfix does, until the server closes the connection."""

    port: int
    answered: int = 0
    waiting: bool = False
    unanswered: list[str] = field(default_factory=list)

    def run(self, n: int) -> None:
        with PolicyClient(("127.0.0.1", self.port)) as client:
            k = 0
            while not closed_by_server(client.sock):  # written only while the server had not closed
                k += 1
                try:
                    client.send_raw(encode_request(sender=f"load{n}-{k}@example.org"))
                except OSError:
                    return  # the server's close arrived between the check and the write
                self.waiting = True
                try:
                    answer = client.read_answer()
                except OSError:
                    answer = None
                self.waiting = False
                if answer is None:
                    self.unanswered.append(f"client {n} request {k}")
                    return
                self.answered += 1


def test_sigterm_under_full_load_answers_every_request_and_exits(policyd_factory, own_redis):
    """10 clients back to back; Redis freezes so that every connection has a request in flight, then
    SIGTERM: each is answered (in the fail mode, at answer_within: the deadline sweeper runs through the
    drain), no new request is read, every connection is closed and the process exits 0."""
    settings = base_settings(own_redis.url, **GREYLIST_ONLY, answer_within="1s")
    settings["redis"]["timeout"] = "10s"  # only the server's own time bound can answer
    daemon = policyd_factory(settings)
    loads = [LoadClient(daemon.port) for _ in range(10)]
    threads = [threading.Thread(target=load.run, args=(n,)) for n, load in enumerate(loads)]
    for thread in threads:
        thread.start()
    try:
        wait_for(lambda: all(load.answered >= 20 for load in loads), 30, what="every client under way")
        own_redis.pause()
        wait_for(lambda: all(load.waiting for load in loads), 10, what="a request in flight on every connection")
        signalled = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(1 + 1 + 10) == 0
        exited = time.monotonic() - signalled
    finally:
        own_redis.resume()
        for thread in threads:
            thread.join(10)
    unanswered = [item for load in loads for item in load.unanswered]
    print(f"\nSIGTERM under load: exit after {exited:.2f}s, {sum(load.answered for load in loads)} answered, "
          f"{len(unanswered)} unanswered")
    assert not unanswered, unanswered
    daemon.wait_log("draining")


def test_answer_within_is_enforced_while_draining(policyd_factory, own_redis):
    settings = base_settings(own_redis.url, **GREYLIST_ONLY, answer_within="1s")
    settings["redis"]["timeout"] = "10s"  # only the server's own time bound can answer
    daemon = policyd_factory(settings)
    with daemon.connect() as client:
        assert client.ask() == DEFER
        own_redis.pause()
        try:
            client.send_raw(encode_request(sender="in-flight@example.org"))
            daemon.proc.send_signal(signal.SIGTERM)
            assert client.read_answer() == "DUNNO"  # the fail mode, at the bound, during the drain
            assert client.read_answer() is None
            assert daemon.proc.wait(1 + 1 + 10) == 0
        finally:
            own_redis.resume()
