"""policyd as a black box over a real socket: a request template copied from a real Postfix, byte-split
writes, garbage, stalled clients, and Redis failing underneath."""

from __future__ import annotations

import os
import random
import socket
import threading
import time

import pytest
from conftest import base_settings
from harness.net import wait_for
from harness.policyd_proc import PolicyClient, encode_request, timed_ask

GREYLIST_ONLY = {"checks": ["greylist"]}


@pytest.mark.parametrize(("attrs", "expected"), [
    ({}, "DEFER_IF_PERMIT Greylisted, please try again in 5 minutes"),
    ({"sasl_username": "alice", "sasl_method": "PLAIN"}, "DUNNO"),
    ({"client_address": "127.0.0.1"}, "DUNNO"),
    ({"recipient": "postmaster@example.test"}, "DUNNO"),
    ({"protocol_state": "CONNECT"}, "DUNNO"),
    ({"protocol_state": "END-OF-MESSAGE"}, "DUNNO"),
    ({"client_address": "2001:db8::25"}, "DEFER_IF_PERMIT Greylisted, please try again in 5 minutes"),
    ({"client_address": "::ffff:127.0.0.1"}, "DUNNO"),
    ({"client_address": "bogus"}, "DUNNO"),
    ({"sender": ""}, "DEFER_IF_PERMIT Greylisted, please try again in 5 minutes"),
])
def test_answers(policyd_factory, redis_server, attrs, expected):
    daemon = policyd_factory(base_settings(redis_server.url))
    with daemon.connect() as client:
        assert client.ask(**attrs) == expected


def test_requests_written_one_byte_at_a_time_and_back_to_back(policyd_factory, redis_server):
    daemon = policyd_factory(base_settings(redis_server.url))
    with daemon.connect() as client:
        for byte in encode_request(sender="slow@example.org"):
            client.send_raw(bytes([byte]))
        assert client.read_answer().startswith("DEFER_IF_PERMIT")
        client.send_raw(encode_request(sasl_username="a") + encode_request(sasl_username="b") + encode_request())
        assert [client.read_answer() for _ in range(3)] == ["DUNNO", "DUNNO", client_defer()]


def test_thousands_of_requests_pipelined_in_one_write_are_all_answered_in_order(policyd_factory, redis_server):
    """Requests decided at once (no Redis call: an authenticated client is not greylisted) are answered one
    after the other from the same data callback: this catches starting each next request from the previous
    one's answer (a recursion per request, which overflows the stack inside one read)."""
    daemon = policyd_factory(base_settings(redis_server.url, **GREYLIST_ONLY))  # no block list read to settle
    with daemon.connect() as client:
        burst = b"".join(encode_request(sasl_username=f"user{number}") for number in range(3000))
        client.send_raw(burst + encode_request(sender="after-the-burst@example.org"))
        answers = [client.read_answer() for _ in range(3001)]
    assert answers[:3000] == ["DUNNO"] * 3000
    assert answers[3000] == client_defer()
    assert "internal error" not in daemon.log_text()


def client_defer() -> str:
    return "DEFER_IF_PERMIT Greylisted, please try again in 5 minutes"


def test_garbage_closes_only_that_connection(policyd_factory, redis_server):
    daemon = policyd_factory(base_settings(redis_server.url))
    with daemon.connect() as good, daemon.connect() as bad:
        assert good.ask(sasl_username="x") == "DUNNO"
        bad.send_raw(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not a policy request\n\n")
        assert bad.read_answer() is None
        assert good.ask(sasl_username="x") == "DUNNO"
    log = daemon.wait_log("policy protocol error; closing connection")
    assert "NUL byte in request" in log


def test_missing_request_or_protocol_state_is_logged_and_closed(policyd_factory, redis_server):
    daemon = policyd_factory(base_settings(redis_server.url))
    with daemon.connect() as client:
        client.send_raw(b"protocol_state=RCPT\nsender=a@b\n\n")
        assert client.read_answer() is None
    with daemon.connect() as client:
        client.send_raw(b"request=smtpd_access_policy\nsender=a@b\n\n")
        assert client.read_answer() is None
    daemon.wait_log("expected smtpd_access_policy")
    daemon.wait_log("protocol_state missing")


def test_over_long_line_is_refused(policyd_factory, redis_server):
    daemon = policyd_factory(base_settings(redis_server.url))
    with daemon.connect() as client:
        client.send_raw(b"request=smtpd_access_policy\nsender=" + b"a" * 10000)
        assert client.read_answer() is None
    daemon.wait_log("line longer than 8192 bytes")


def test_stalled_client_is_disconnected_and_others_are_served(policyd_factory, redis_server):
    daemon = policyd_factory(base_settings(redis_server.url, request_timeout="1s"))
    with daemon.connect() as stalled, daemon.connect() as other:
        stalled.send_raw(b"request=smtpd_access_policy\nprotocol_state=RCPT\n")
        assert other.ask(sasl_username="u") == "DUNNO"
        started = time.monotonic()
        assert stalled.read_answer() is None
        assert time.monotonic() - started < 4
        assert other.ask(sasl_username="u") == "DUNNO"
    daemon.wait_log("client stalled inside a request; closing")


def test_fuzzed_connections_never_harm_well_formed_ones(policyd_factory, redis_server):
    """Random bytes, over-long lines, truncated requests and garbage interleaved with valid requests on
    many connections at once: the daemon survives and every well-formed request is answered correctly."""
    daemon = policyd_factory(base_settings(redis_server.url, **GREYLIST_ONLY, request_timeout="2s"))
    rng = random.Random(20261124)
    junk = [
        lambda: os.urandom(rng.randint(1, 3000)),
        lambda: b"x" * 20000,
        lambda: encode_request()[: rng.randint(1, 200)],
        lambda: b"request=smtpd_access_policy\n\n",
        lambda: b"\n",
        lambda: b"=" * 50 + b"\n\n",
        lambda: encode_request().replace(b"=", b"", 1),
    ]
    failures: list[str] = []

    def garbage_client(n: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", daemon.port), timeout=5) as sock:
                if rng.random() < 0.5:
                    sock.sendall(encode_request(sasl_username=f"g{n}"))
                    if b"action=DUNNO\n\n" not in sock.recv(100):
                        failures.append(f"garbage client {n}: bad answer before garbage")
                sock.sendall(rng.choice(junk)())
                sock.settimeout(5)
                while sock.recv(65536):
                    pass
        except OSError:
            pass  # the server may reset a connection it closes with unread input

    def good_client(n: int) -> None:
        with PolicyClient(("127.0.0.1", daemon.port)) as client:
            for k in range(20):
                answer = client.ask(sender=f"good{n}-{k}@example.org")
                if answer != client_defer():
                    failures.append(f"good client {n}: {answer!r}")
                if client.ask(sasl_username=f"u{n}") != "DUNNO":
                    failures.append(f"good client {n}: authenticated not DUNNO")

    threads = [threading.Thread(target=garbage_client, args=(n,)) for n in range(60)]
    threads += [threading.Thread(target=good_client, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures, failures[:5]
    assert daemon.proc.poll() is None, "policyd died"
    with daemon.connect() as client:
        assert client.ask(sasl_username="after") == "DUNNO"
    assert "Traceback" not in daemon.log_text()


def test_unix_socket_listener(policyd_factory, redis_server, tmp_path):
    path = tmp_path / "policyd.sock"
    policyd_factory(base_settings(redis_server.url, listen=[f"unix:{path}"]))
    wait_for(path.exists, 10, what="unix socket")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(str(path))
        sock.sendall(encode_request(sasl_username="x") + encode_request())
        answers = b""
        while answers.count(b"\n\n") < 2:
            answers += sock.recv(1000)
        assert answers == b"action=DUNNO\n\naction=" + client_defer().encode() + b"\n\n"


# -- Redis failing underneath ---------------------------------------------------------------------

def test_redis_down_at_start_fails_open_then_recovers_without_restart(policyd_factory, own_redis):
    own_redis.stop()
    daemon = policyd_factory(base_settings(own_redis.url))
    with daemon.connect() as client:
        answer, took = timed_ask(client)
        assert answer == "DUNNO" and took < 2.5
        own_redis.start()
        wait_for(lambda: client.ask(sender="later@example.org").startswith("DEFER_IF_PERMIT"), 10,
                 what="greylisting to resume")
    daemon.wait_log("fail mode dunno")
    daemon.wait_log("redis connected")


def test_paused_redis_answers_within_the_bound_and_recovers(policyd_factory, own_redis):
    daemon = policyd_factory(base_settings(own_redis.url, answer_within="1s"))
    with daemon.connect() as client:
        assert client.ask().startswith("DEFER_IF_PERMIT")
        own_redis.pause()
        try:
            for n in range(3):
                answer, took = timed_ask(client, sender=f"p{n}@example.org")
                assert answer == "DUNNO"
                assert took < 1.5
        finally:
            own_redis.resume()
        wait_for(lambda: client.ask(sender="resumed@example.org").startswith("DEFER_IF_PERMIT"), 10,
                 what="greylisting to resume")
    daemon.wait_log("redis did not answer in time; reconnecting")


def test_strict_fail_mode_defers_inbound_but_not_authenticated(policyd_factory, own_redis):
    settings = base_settings(own_redis.url, on_error={"redis": {"inbound": "defer_if_permit",
                                                                 "authenticated": "dunno"}})
    daemon = policyd_factory(settings)
    own_redis.stop()
    with daemon.connect() as client:
        assert client.ask() == "DEFER_IF_PERMIT 4.3.0 Temporary local problem, please try again later"
        assert client.ask(sasl_username="alice") == "DUNNO"


def test_blocklist_failure_uses_the_fail_mode_too(policyd_factory, own_redis):
    settings = base_settings(own_redis.url, checks=["blocklist"],
                             on_error={"redis": {"authenticated": "defer", "inbound": "dunno"}})
    daemon = policyd_factory(settings)
    own_redis.stop()
    with daemon.connect() as client:
        assert client.ask(sasl_username="alice") == "451 4.3.0 Temporary local problem, please try again later"
    daemon.wait_log("check=blocklist")


def test_sighup_reloads_whitelists_and_a_broken_file_keeps_the_old_ones(policyd_factory, redis_server, tmp_path):
    import signal

    clients = tmp_path / "whitelist_clients"
    clients.write_text("# none yet\n")
    daemon = policyd_factory(base_settings(redis_server.url, greylist={"whitelist_clients": [str(clients)]}))
    with daemon.connect() as client:
        assert client.ask(client_address="198.51.100.7").startswith("DEFER_IF_PERMIT")
        clients.write_text("198.51.100.0/24\n")
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: client.ask(client_address="198.51.100.7", sender="n@example.org") == "DUNNO", 10,
                 what="reloaded whitelist")
        clients.write_text("198.51.100.0/24\n/[broken/\n")
        daemon.proc.send_signal(signal.SIGHUP)
        daemon.wait_log("whitelist reload failed; keeping the previous lists")
        assert client.ask(client_address="198.51.100.8", sender="m@example.org") == "DUNNO"
    daemon.wait_log("whitelist_clients:2: bad regular expression")


def test_unreadable_or_broken_whitelist_stops_start_up_with_exit_78(tmp_path, redis_server):
    import subprocess
    import sys

    from harness.policyd_proc import render_toml

    broken = tmp_path / "clients"
    broken.write_text("ok.example\n300.1.2.3/8\n")
    config = tmp_path / "mw.toml"
    config.write_text(render_toml(base_settings(redis_server.url, greylist={"whitelist_clients": [str(broken)]})))
    result = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "policyd"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert f"{broken}:2: not an address or network" in result.stderr
