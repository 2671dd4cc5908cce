"""SPF against a real DNS server on loopback: results mapped to actions, Received-SPF, HELO for the null
sender, the time bound, and greylisting by the sender's SPF domain."""

from __future__ import annotations

import time

import pytest
from conftest import base_settings, dns_settings


def settings(redis_url, dns, checks=("spf",), **policyd):
    config = base_settings(redis_url, checks=list(checks), **policyd)
    config["dns"] = dns_settings(dns)
    return config


@pytest.fixture
def daemon(policyd_factory, redis_server, dns_server):
    return policyd_factory(settings(redis_server.url, dns_server, hostname="mx.receiver.test"))


def test_pass_gets_a_received_spf_header(daemon):
    with daemon.connect() as c:
        answer = c.ask(client_address="192.0.2.5", sender="alice@example.test", helo_name="out.example.test")
    assert answer.startswith("PREPEND Received-SPF: pass (mx.receiver.test: domain of example.test designates "
                             "192.0.2.5 as permitted sender)")
    assert "client-ip=192.0.2.5;" in answer and "envelope-from=" in answer


def test_include_passes_too(daemon):
    with daemon.connect() as c:
        assert c.ask(client_address="198.51.100.11", sender="bob@example.test").startswith("PREPEND Received-SPF: pass")


def test_fail_is_rejected(daemon):
    with daemon.connect() as c:
        answer = c.ask(client_address="203.0.113.7", sender="alice@example.test")
    assert answer == "550 5.7.23 SPF: example.test does not allow 203.0.113.7 to send its mail"
    assert 'check=spf action=reject reason="spf fail for mailfrom example.test"' in daemon.wait_log("check=spf")


@pytest.mark.parametrize(("sender", "result"), [("x@softfail.test", "softfail"), ("x@nospf.test", "none")])
def test_other_results_only_tag(daemon, sender, result):
    with daemon.connect() as c:
        assert c.ask(client_address="203.0.113.7", sender=sender).startswith(f"PREPEND Received-SPF: {result}")


def test_null_sender_checks_the_helo_name(daemon):
    with daemon.connect() as c:
        ok = c.ask(client_address="192.0.2.10", sender="", helo_name="mx.example.test", instance="a")
        bad = c.ask(client_address="203.0.113.9", sender="", helo_name="mx.example.test", instance="b")
        literal = c.ask(client_address="203.0.113.9", sender="", helo_name="[203.0.113.9]", instance="c")
    assert ok.startswith("PREPEND Received-SPF: pass") and "helo=mx.example.test" in ok
    assert bad == "550 5.7.23 SPF: mx.example.test does not allow 203.0.113.9 to send its mail"
    assert literal == "DUNNO"  # nothing to check: no sender and an address literal as HELO


def test_authenticated_and_trusted_clients_are_not_checked(daemon):
    with daemon.connect() as c:
        assert c.ask(client_address="203.0.113.7", sender="a@example.test", sasl_username="a") == "DUNNO"
        assert c.ask(client_address="127.0.0.1", sender="a@example.test") == "DUNNO"


def test_a_silent_dns_gives_temperror_within_the_bound(policyd_factory, redis_server, dns_server):
    dns_server.silent_names.add("example.test")
    config = settings(redis_server.url, dns_server, spf={"timeout": "1s", "on_temperror": "defer"})
    daemon = policyd_factory(config)
    with daemon.connect() as c:
        started = time.monotonic()
        answer = c.ask(client_address="192.0.2.5", sender="alice@example.test")
        took = time.monotonic() - started
    assert answer.startswith("451 4.7.24 SPF: temporary error")
    assert took < 2.0


def test_garbage_dns_answers_are_a_temperror_not_a_crash(policyd_factory, redis_server, dns_server):
    dns_server.garbage_names.add("example.test")
    daemon = policyd_factory(settings(redis_server.url, dns_server))
    with daemon.connect() as c:
        assert c.ask(client_address="192.0.2.5", sender="alice@example.test").startswith(
            "PREPEND Received-SPF: temperror")
        assert c.ask(client_address="192.0.2.5", sender="x@softfail.test", instance="2").startswith(
            "PREPEND Received-SPF: softfail")


def test_greylist_retry_from_another_host_of_the_senders_spf_pool_passes(policyd_factory, redis_server,
                                                                           dns_server):
    config = settings(redis_server.url, dns_server, checks=("spf", "greylist"),
                      greylist={"delay": "1s", "ipv4_prefix": 32})
    daemon = policyd_factory(config)
    with daemon.connect() as c:
        first = c.ask(client_address="198.51.100.10", sender="news@example.test", instance="m1")
        assert first.startswith("DEFER_IF_PERMIT")
        time.sleep(1.1)
        retry = c.ask(client_address="198.51.100.11", sender="news@example.test", instance="m2")
        assert retry.startswith("PREPEND ")  # passed: one header now ...
        other = c.ask(client_address="198.51.100.11", sender="news@example.test", instance="m2",
                      protocol_state="DATA", recipient="")
        assert other.startswith("PREPEND ")  # ... the other at DATA
        assert {retry.split(":")[0], other.split(":")[0]} == {"PREPEND Received-SPF", "PREPEND X-Greylist"}
        # without SPF pass the address counts: a softfail domain from two hosts is two triplets
        assert c.ask(client_address="203.0.113.1", sender="a@softfail.test", instance="m3").startswith("DEFER")
        time.sleep(1.1)
        assert c.ask(client_address="203.0.113.2", sender="a@softfail.test", instance="m4").startswith("DEFER")


def test_results_are_cached_per_client_and_domain_but_temperror_is_not(policyd_factory, redis_server, dns_server):
    daemon = policyd_factory(settings(redis_server.url, dns_server))
    with daemon.connect() as c:
        first = c.ask(client_address="192.0.2.5", sender="alice@example.test", instance="1")
        asked = len(dns_server.queries)
        second = c.ask(client_address="192.0.2.5", sender="bob@example.test", helo_name="other.example.test",
                       instance="2")
        assert len(dns_server.queries) == asked  # answered from Redis
        assert first.startswith("PREPEND Received-SPF: pass") and second.startswith("PREPEND Received-SPF: pass")
        assert 'envelope-from=bob@example.test; helo=other.example.test;' in second  # this request's identity
        assert c.ask(client_address="203.0.113.7", sender="x@example.test", instance="3").startswith("550 5.7.23")
        assert c.ask(client_address="203.0.113.7", sender="y@example.test", instance="4").startswith("550 5.7.23")
        dns_server.garbage_names.add("softfail.test")
        c.ask(client_address="192.0.2.6", sender="a@softfail.test", instance="5")
        dns_server.garbage_names.clear()
        assert c.ask(client_address="192.0.2.6", sender="a@softfail.test", instance="6").startswith(
            "PREPEND Received-SPF: softfail")
    assert 'reason="spf pass for mailfrom example.test (cached)"' in daemon.wait_log("(cached)")
    assert 290 <= max(redis_server.client().ttl(k) for k in redis_server.client().keys("mw:spf:*")) <= 300
