"""Several MX hosts, one state: two policyd processes on one Redis, and Redis behind Sentinel."""

from __future__ import annotations

import threading
import time

import pytest
from conftest import base_settings
from harness.net import wait_for
from harness.policyd_proc import PolicyClient
from harness.redis_server import start_sentinel_setup

DEFER = "DEFER_IF_PERMIT"


def test_greylist_triplet_passed_through_one_daemon_passes_through_the_other(policyd_factory, redis_server):
    settings = base_settings(redis_server.url, greylist={"delay": "1s"})
    first, second = policyd_factory(settings), policyd_factory(settings)
    with first.connect() as a, second.connect() as b:
        assert a.ask().startswith(DEFER)
        assert b.ask().startswith(DEFER)  # the same triplet, seen by the other host: still early
        time.sleep(1.1)
        assert a.ask(instance="m2").startswith("PREPEND X-Greylist: delayed")
        assert b.ask(instance="m3") == "DUNNO"


def test_rate_limit_counts_across_both_daemons(policyd_factory, redis_server):
    limits = [{"name": "user-msgs", "key": "sasl_user", "count": "messages", "max": 10, "window": "1h"}]
    settings = base_settings(redis_server.url, ratelimit={"limits": limits})
    daemons = [policyd_factory(settings), policyd_factory(settings)]
    answers: list[str] = []
    lock = threading.Lock()

    def client(daemon, n):
        with daemon.connect() as c:
            for k in range(5):
                answer = c.ask(sasl_username="alice", instance=f"{n}.{k}")
                with lock:
                    answers.append(answer)

    threads = [threading.Thread(target=client, args=(daemons[n % 2], n)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(answers) == 20
    assert answers.count("DUNNO") == 10
    assert sum(a.startswith("450 4.7.1 Sending limit reached") for a in answers) == 10


@pytest.fixture
def sentinel_setup(tmp_path):
    setup = start_sentinel_setup(tmp_path / "sentinel")
    yield setup
    setup.stop()


def test_sentinel_failover_needs_no_restart_and_every_request_is_answered_in_time(policyd_factory, sentinel_setup):
    settings = {
        "redis": {"url": "redis://127.0.0.1:1/0", "sentinels": sentinel_setup.sentinels,
                  "sentinel_service": sentinel_setup.service, "timeout": "300ms", "connect_timeout": "500ms"},
        "policyd": {"answer_within": "1s", "checks": ["greylist"], "greylist": {"delay": "1s"}},
    }
    daemon = policyd_factory(settings)
    old_master = sentinel_setup.master.port
    with daemon.connect() as client:
        assert client.ask(sender="before@example.org").startswith(DEFER)
        stop = threading.Event()
        slowest = [0.0]
        answered = [0]
        problems: list[str] = []

        def stream():
            with PolicyClient(("127.0.0.1", daemon.port)) as c:
                n = 0
                while not stop.is_set():
                    started = time.monotonic()
                    answer = c.ask(sender=f"stream{n}@example.org")
                    took = time.monotonic() - started
                    slowest[0] = max(slowest[0], took)
                    answered[0] += 1
                    if answer is None or not (answer == "DUNNO" or answer.startswith(DEFER)):
                        problems.append(repr(answer))
                    n += 1
                    time.sleep(0.01)

        streamer = threading.Thread(target=stream)
        streamer.start()
        time.sleep(0.5)
        sentinel_setup.master.stop()  # kill the master in the middle of the stream
        wait_for(lambda: sentinel_setup.current_master_port() != old_master, 30, what="sentinel failover")
        # greylisting works again on the promoted replica, without restarting policyd
        wait_for(lambda: client.ask(sender=f"after{time.monotonic()}@example.org").startswith(DEFER), 20,
                 what="greylisting on the new master")
        stop.set()
        streamer.join(10)
    assert not problems, problems[:5]
    assert answered[0] > 20
    assert slowest[0] < 1.5, f"a request took {slowest[0]:.2f}s"
    # a triplet seen before the failover was replicated: its retry passes on the new master
    time.sleep(1.1)
    with daemon.connect() as client:
        assert not client.ask(sender="before@example.org").startswith(DEFER)
    log = daemon.log_text()
    assert f"address=127.0.0.1:{sentinel_setup.replica.port}" in log
