"""Redis health as policyd sees it: "connected" only once Redis answers, fail-fast while it is known down,
fail-mode answers counted once each, and a bounded master lookup whatever state each Sentinel is in."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest
from conftest import base_settings
from harness.net import free_port, wait_for
from harness.policyd_proc import render_toml, timed_ask
from harness.redis_server import SentinelSetup, start_sentinel_setup

DEFER = "DEFER_IF_PERMIT"


@pytest.fixture
def mute_listener() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel completes them) and never answers: a hung host."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    yield sock.getsockname()[1]
    sock.close()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + " ")
              or line.startswith(name + "{")]
    return sum(values)


def test_a_frozen_redis_is_detected_once_then_requests_take_the_fail_mode_at_once(policyd_factory, own_redis):
    timeout = 2.0
    settings = base_settings(own_redis.url, answer_within="10s")
    settings["redis"].update(timeout=f"{timeout:g}s", connect_timeout="1s")
    daemon = policyd_factory(settings)
    with daemon.connect() as client:
        assert client.ask(sender="before@example.org").startswith(DEFER)
        own_redis.pause()
        try:
            answer, took = timed_ask(client, sender="first@example.org")
            assert answer == "DUNNO"  # the first request waits out the timeout, then fails open
            assert took >= timeout * 0.9
            for n in range(5):
                answer, took = timed_ask(client, sender=f"during{n}@example.org")
                assert answer == "DUNNO"
                # Redis is known down: no request waits out the timeout again
                assert took < timeout / 2, f"request {n} took {took:.2f}s with Redis known down"
        finally:
            own_redis.resume()
        # recovery: the background probe finds Redis answering again and greylisting comes back
        wait_for(lambda: client.ask(sender=f"after{time.monotonic()}@example.org").startswith(DEFER), 15,
                 what="greylisting after SIGCONT")
    log = daemon.log_text()
    assert log.count("redis did not answer in time") == 1, log


def test_redis_counts_as_connected_only_once_it_answers_ping(policyd_factory, mute_listener):
    metrics_port = free_port()
    settings = base_settings(f"redis://127.0.0.1:{mute_listener}/0")
    settings["redis"].update(connect_timeout="300ms")
    settings["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    daemon = policyd_factory(settings)
    daemon.wait_log("redis connect failed")  # a probe went out and got no answer
    with daemon.connect() as client:
        answer, took = timed_ask(client)
        assert answer == "DUNNO" and took < 1.0  # known down: the fail mode at once, not after the timeout
    text = scrape(metrics_port)
    assert metric(text, "mailwarden_redis_connected") == 0.0
    assert "redis connected" not in daemon.log_text()


def test_fail_mode_total_counts_answers_not_failed_checks(policyd_factory, own_redis):
    metrics_port = free_port()
    settings = base_settings(own_redis.url)  # access, blocklist, ratelimit, greylist: three use Redis
    settings["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    daemon = policyd_factory(settings)
    own_redis.stop()
    wait_for(lambda: metric(scrape(metrics_port), "mailwarden_redis_connected") == 0.0, 10, what="redis down")
    with daemon.connect() as client:
        for n in range(3):
            assert client.ask(sender=f"s{n}@example.org", sasl_username="alice") == "DUNNO"
    text = scrape(metrics_port)
    assert metric(text, "mailwarden_policyd_fail_mode_total") == 3.0, text
    assert metric(text, "mailwarden_policyd_backend_errors_total") >= 6.0  # every failed check, still counted


def test_answers_at_the_answer_within_bound_give_one_warning_line_with_a_count(policyd_factory, own_redis):
    settings = base_settings(own_redis.url, answer_within="300ms")
    settings["redis"].update(timeout="30s")  # Redis stays "up": each request runs into answer_within
    daemon = policyd_factory(settings)
    with daemon.connect() as client:
        assert client.ask().startswith(DEFER)
        own_redis.pause()
        try:
            for n in range(4):
                assert client.ask(sender=f"late{n}@example.org") == "DUNNO"
        finally:
            own_redis.resume()
    log = daemon.wait_log("answered at the answer_within bound")
    lines = [line for line in log.splitlines() if "answered at the answer_within bound" in line]
    assert len(lines) == 1, lines  # the others are folded into the next line's count
    assert "count=1" in lines[0] and "waiting_on=" in lines[0]


@pytest.fixture
def three_sentinels(tmp_path) -> Iterator[SentinelSetup]:
    setup = start_sentinel_setup(tmp_path / "sentinel", sentinels=3)
    yield setup
    setup.stop()


@pytest.mark.parametrize("how", ["killed", "hung"])
def test_greylisting_returns_soon_after_promotion_when_the_first_sentinel_went_with_the_master(
        policyd_factory, three_sentinels, how):
    """One Sentinel per Redis host: losing the master's host loses the first listed Sentinel too."""
    setup = three_sentinels
    sentinel_timeout, connect_timeout = 1.0, 0.5
    settings = {
        "redis": {"url": "redis://127.0.0.1:1/0", "sentinels": setup.sentinels, "sentinel_service": setup.service,
                  "timeout": "300ms", "connect_timeout": f"{connect_timeout:g}s",
                  "sentinel_timeout": f"{sentinel_timeout:g}s"},
        "policyd": {"answer_within": "1s", "checks": ["greylist"], "greylist": {"delay": "1s"}},
    }
    daemon = policyd_factory(settings)
    old_master = setup.master.port
    promoted_at: list[float] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set() and not promoted_at:
            for survivor in setup.others:
                try:
                    if setup.current_master_port(survivor) != old_master:
                        promoted_at.append(time.monotonic())
                        return
                except Exception:  # a survivor busy failing over: ask again
                    pass
            time.sleep(0.02)

    with daemon.connect() as client:
        assert client.ask(sender="before@example.org").startswith(DEFER)
        if how == "killed":
            setup.sentinel.stop()
            setup.master.stop()
        else:
            setup.sentinel.pause()
            setup.master.pause()
        watcher = threading.Thread(target=watch)
        watcher.start()
        answers: list[tuple[str | None, float]] = []
        deadline = time.monotonic() + 40
        try:
            while time.monotonic() < deadline:
                answer, took = timed_ask(client, sender=f"after{len(answers)}@example.org")
                answers.append((answer, took))
                if promoted_at and answer and answer.startswith(DEFER):
                    back_at = time.monotonic()
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"greylisting did not come back (promoted: {bool(promoted_at)})")
        finally:
            stop.set()
            watcher.join(5)
    assert all(a == "DUNNO" or (a or "").startswith(DEFER) for a, _ in answers), answers
    assert max(took for _, took in answers) < 1.0 + 0.5  # answer_within bounds every answer
    # a lookup asks the sentinels in parallel and ends within sentinel_timeout: a few cycles at most
    bound = 2 * (sentinel_timeout + connect_timeout) + 2.0
    assert back_at - promoted_at[0] < bound, f"greylisting back {back_at - promoted_at[0]:.1f}s after promotion"
    log = daemon.log_text()
    assert f"sentinel=127.0.0.1:{setup.sentinel.port}" in log, log
    assert f"address=127.0.0.1:{setup.replica.port}" in log


def test_cli_finds_the_master_past_a_dead_and_a_hung_sentinel(tmp_path, mute_listener):
    setup = start_sentinel_setup(tmp_path / "sentinel")
    try:
        dead = f"127.0.0.1:{free_port()}"
        config = tmp_path / "mw.toml"
        sentinel_timeout = 1.0
        config.write_text(render_toml({"redis": {
            "url": "redis://127.0.0.1:1/0", "sentinel_service": setup.service,
            "sentinels": [dead, f"127.0.0.1:{mute_listener}", *setup.sentinels],
            "sentinel_timeout": f"{sentinel_timeout:g}s"}}))
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "block", "list"],
                              capture_output=True, text=True, timeout=60)
        took = time.monotonic() - started
        assert done.returncode == 0, done.stderr
        assert took < 10 * sentinel_timeout, f"the CLI took {took:.1f}s"  # start-up plus one bounded lookup
        # without any live sentinel: a clear error, within the bound too
        config.write_text(render_toml({"redis": {
            "url": "redis://127.0.0.1:1/0", "sentinel_service": setup.service,
            "sentinels": [dead, f"127.0.0.1:{mute_listener}"], "sentinel_timeout": f"{sentinel_timeout:g}s"}}))
        down = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "block", "list"],
                              capture_output=True, text=True, timeout=60)
        assert down.returncode == 69 and "cannot reach Redis" in down.stderr, down.stderr
        assert dead in down.stderr and str(mute_listener) in down.stderr
    finally:
        setup.stop()
