"""One Redis round trip for the default checks (issue 14), over the real daemon and a real Redis.

The block list's read rides as a guard on the rate limit's or the greylist's script; these tests watch what
the daemon sends (MONITOR tells a client's commands from the ones its scripts run) and that the order of
the checks still holds: a blocked client is refused by the block list, and the script behind the guard
leaves no trace (no triplet remembered, no message counted)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from conftest import base_settings

from policyd.blocklist import BlockList, BlocklistSettings

CLIENT_TEXT = BlocklistSettings().client_text
USER_TEXT = BlocklistSettings().user_text
END = "mailwarden-test-end"


@contextmanager
def daemon_commands(redis_server) -> Iterator[list[str]]:
    """The names of the commands clients send while the block runs (not those run inside scripts, nor the
    end marker's connection)."""
    seen: list[str] = []
    ready = threading.Event()

    def watch() -> None:
        entries: list[tuple[str, str]] = []
        with redis_server.client().monitor() as monitor:
            ready.set()
            for entry in monitor.listen():
                client = f"{entry.get('client_address')}:{entry.get('client_port')}"
                if entry["command"] == f"ECHO {END}":
                    seen.extend(name for sender, name in entries if sender != client)
                    return
                if entry.get("client_type") != "lua":
                    entries.append((client, entry["command"].split(" ", 1)[0].upper()))

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    assert ready.wait(5)
    try:
        yield seen
    finally:
        redis_server.client().echo(END)
        thread.join(10)
        assert not thread.is_alive(), "MONITOR did not see the end marker"


def remembered(redis_server) -> set[str]:
    """The recipients of the triplets the greylist remembers."""
    client = redis_server.client()
    return {client.hget(key, "r").decode() for key in client.scan_iter("mw:gl:t:*")}


@pytest.fixture
def daemon(policyd_factory, redis_server):
    return policyd_factory(base_settings(redis_server.url, checks=["blocklist", "ratelimit", "greylist"]))


@pytest.fixture
def blocks(redis_server) -> BlockList:
    return BlockList(redis_server.client(), "mw:")


def test_a_new_triplet_costs_one_round_trip_with_the_default_checks(daemon, redis_server):
    with daemon.connect() as client:
        client.ask(client_address="192.0.2.200")  # the daemon is connected and has read block:nets once
        with daemon_commands(redis_server) as sent:
            for number in range(5):
                assert client.ask(client_address=f"192.0.2.{number + 1}").startswith("DEFER_IF_PERMIT")
    assert sent == ["EVALSHA"] * 5


def test_an_authenticated_message_costs_one_round_trip_through_the_rate_limit(daemon, redis_server):
    with daemon.connect() as client:
        client.ask(client_address="192.0.2.200")
        with daemon_commands(redis_server) as sent:
            assert client.ask(sasl_username="alice", sasl_method="PLAIN") == "DUNNO"
    assert sent == ["EVALSHA"]


def test_without_a_script_to_ride_on_the_block_list_reads_on_its_own(policyd_factory, redis_server, blocks):
    daemon = policyd_factory(base_settings(redis_server.url, checks=["blocklist", "ratelimit", "greylist"],
                                           trusted_networks=["192.0.2.0/24"]))
    with daemon.connect() as client:
        client.ask(client_address="198.51.100.1")
        with daemon_commands(redis_server) as sent:
            assert client.ask(client_address="192.0.2.7") == "DUNNO"  # trusted: not greylisted, no script
        blocks.add("client", "192.0.2.7", "spam run", by="test")
        assert client.ask(client_address="192.0.2.7") == f"550 5.7.1 {CLIENT_TEXT}"
    assert sent == ["MGET"]
    log = daemon.wait_log('client=192.0.2.7 helo=test.client sender=sender@example.org recipient=user@example.test '
                          'check=blocklist action=reject reason="client blocked: spam run"')
    assert "check=greylist action=reject" not in log


def test_a_blocked_client_is_refused_by_the_block_list_and_the_greylist_remembers_nothing(daemon, blocks,
                                                                                         redis_server):
    with daemon.connect() as client:
        client.ask(client_address="198.51.100.1")
        blocks.add("client", "192.0.2.66", "spam run", by="test")
        assert client.ask(client_address="192.0.2.66", recipient="c@example.test") == f"550 5.7.1 {CLIENT_TEXT}"
    daemon.wait_log('client=192.0.2.66 helo=test.client sender=sender@example.org recipient=c@example.test '
                    'check=blocklist action=reject reason="client blocked: spam run"')
    assert remembered(redis_server) == {"user@example.test"}  # the warm-up's, not the blocked client's


def test_a_blocked_account_is_refused_before_the_rate_limit_counts_it(daemon, blocks, redis_server):
    with daemon.connect() as client:
        assert client.ask(sasl_username="bob", sasl_method="PLAIN") == "DUNNO"
        counted_before = sorted(key.decode() for key in redis_server.client().scan_iter("mw:rl:*"))
        blocks.add("user", "mallory", "phished", by="test")
        assert client.ask(sasl_username="mallory", sasl_method="PLAIN", instance="m.1") == f"550 5.7.1 {USER_TEXT}"
    daemon.wait_log('user=mallory check=blocklist action=reject reason="account blocked: phished"')
    counted = sorted(key.decode() for key in redis_server.client().scan_iter("mw:rl:*"))
    assert counted_before and counted == counted_before, "mallory's message was counted"


def test_a_network_block_added_while_running_refuses_the_next_request(daemon, blocks, redis_server):
    with daemon.connect() as client:
        assert client.ask(client_address="203.0.113.9", recipient="a@example.test").startswith("DEFER_IF_PERMIT")
        blocks.add("client", "203.0.113.0/24", "botnet", by="test")  # block:nets changes: the guard trips
        assert client.ask(client_address="203.0.113.10", recipient="b@example.test") == f"550 5.7.1 {CLIENT_TEXT}"
        assert client.ask(client_address="203.0.113.11", recipient="c@example.test") == f"550 5.7.1 {CLIENT_TEXT}"
        assert client.ask(client_address="198.51.100.5", recipient="d@example.test").startswith("DEFER_IF_PERMIT")
        blocks.remove("client", "203.0.113.0/24")
        assert client.ask(client_address="203.0.113.12", recipient="e@example.test").startswith("DEFER_IF_PERMIT")
    daemon.wait_log('check=blocklist action=reject reason="client blocked (203.0.113.0/24): botnet"')
    assert remembered(redis_server) == {"a@example.test", "d@example.test", "e@example.test"}


def test_redis_down_fails_each_check_in_its_place(policyd_factory, own_redis):
    daemon = policyd_factory(base_settings(own_redis.url, checks=["blocklist", "ratelimit", "greylist"]))
    with daemon.connect() as client:
        assert client.ask(client_address="192.0.2.9").startswith("DEFER_IF_PERMIT")
        own_redis.stop()
        assert client.ask(client_address="192.0.2.10") == "DUNNO"  # inbound fail mode: dunno
    log = daemon.wait_log("client=192.0.2.10 ")
    line = next(line for line in log.splitlines() if "client=192.0.2.10 " in line)
    assert "check=greylist action=fail_open" in line, line
    assert "degraded=blocklist,greylist" in line, line
    assert 'notes="blocklist: redis failed' in line, line
