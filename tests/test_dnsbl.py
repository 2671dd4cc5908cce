"""DNSBL/DNSWL against a real DNS server on loopback serving test zones: weights, thresholds, return-code
filters, time budget, garbage answers, the Redis cache."""

from __future__ import annotations

import time

import pytest
from conftest import base_settings, dns_settings

LISTS = [
    {"zone": "bl.test", "weight": 2},
    {"zone": "weak.test", "weight": 1, "name": "Weak List"},
    {"zone": "wl.test", "weight": -5},
]


def settings(redis_url, dns, **dnsbl):
    config = base_settings(redis_url, checks=["dnsbl"], dnsbl={"lists": LISTS, "threshold": 2, **dnsbl})
    config["dns"] = dns_settings(dns)
    return config


@pytest.fixture
def daemon(policyd_factory, redis_server, dns_server):
    return policyd_factory(settings(redis_server.url, dns_server))


@pytest.mark.parametrize(("client", "answer"), [
    ("192.0.2.99", "550 5.7.1 Service unavailable; client [192.0.2.99] blocked using bl.test"),
    ("2001:db8::99", "550 5.7.1 Service unavailable; client [2001:db8::99] blocked using bl.test"),
    ("192.0.2.98", "DUNNO"),  # weak.test alone: weight 1 < threshold 2
    ("192.0.2.77", "DUNNO"),  # allow-listed
    ("192.0.2.1", "DUNNO"),
    ("127.0.0.2", "DUNNO"),  # loopback is never looked up
])
def test_listing_and_weights(daemon, client, answer):
    with daemon.connect() as c:
        assert c.ask(client_address=client) == answer


def test_log_line_names_lists_and_score(daemon):
    with daemon.connect() as c:
        c.ask(client_address="192.0.2.99", queue_id="ABC123")
        c.ask(client_address="192.0.2.98")
    log = daemon.wait_log("check=dnsbl action=accept")
    assert 'queue_id=ABC123 client=192.0.2.99' in log and "score 2 reached 2: bl.test=127.0.0.2 (+2)" in log
    assert 'score 1 below 2: Weak List=127.0.0.5 (+1)' in log


def test_two_lists_add_up_and_an_allow_list_outweighs_them(policyd_factory, redis_server, dns_server):
    # 192.0.2.98 and 192.0.2.77 both on bl.test and weak.test (2 + 1 = 3, the threshold); .77 also on wl.test
    zone = dns_server.zone_text + "\n77.2.0.192.bl.test. IN A 127.0.0.2\n77.2.0.192.weak.test. IN A 127.0.0.5\n" \
        "98.2.0.192.bl.test. IN A 127.0.0.3\n"
    dns_server.set_zone(zone)
    daemon = policyd_factory(settings(redis_server.url, dns_server, threshold=3))
    with daemon.connect() as c:
        assert c.ask(client_address="192.0.2.98") == \
            "550 5.7.1 Service unavailable; client [192.0.2.98] blocked using bl.test, Weak List"  # 2 + 1 = 3
        assert c.ask(client_address="192.0.2.77") == "DUNNO"  # 2 + 1 - 5
    daemon.wait_log("score -2 below 3: bl.test=127.0.0.2 (+2), Weak List=127.0.0.5 (+1), wl.test=127.0.10.1 (-5)")


def test_return_code_filter(policyd_factory, redis_server, dns_server):
    lists = [{"zone": "weak.test", "weight": 5, "codes": ["127.0.0.2-127.0.0.4"]}]
    daemon = policyd_factory(settings(redis_server.url, dns_server, lists=lists))
    with daemon.connect() as c:
        assert c.ask(client_address="192.0.2.98") == "DUNNO"  # 127.0.0.5 is outside the filter
        assert c.ask(client_address="127.0.0.2") == "DUNNO"
    assert "dnsbl answered with codes outside its filter" in daemon.wait_log("outside its filter")


def test_a_silent_list_counts_as_not_listed_within_the_budget(policyd_factory, redis_server, dns_server):
    dns_server.silent_names.add("bl.test")
    daemon = policyd_factory(settings(redis_server.url, dns_server, budget="800ms"))
    with daemon.connect() as c:
        started = time.monotonic()
        assert c.ask(client_address="192.0.2.99") == "DUNNO"
        assert time.monotonic() - started < 1.5
        # the other lists still count
        assert c.ask(client_address="192.0.2.98", instance="x2") == "DUNNO"
    log = daemon.wait_log("no answer from bl.test")
    assert "counted as not listed" in log


def test_garbage_answers_count_as_not_listed(policyd_factory, redis_server, dns_server):
    dns_server.garbage_names.add("bl.test")
    daemon = policyd_factory(settings(redis_server.url, dns_server))
    with daemon.connect() as c:
        assert c.ask(client_address="192.0.2.99") == "DUNNO"
    assert "dnsbl lookup failed; counted as not listed" in daemon.wait_log("lookup failed")
    assert daemon.proc.poll() is None


def test_answers_are_cached_in_redis_for_their_ttl(daemon, dns_server, redis_server):
    dns_server.set_zone(dns_server.zone_text + "\n55.2.0.192.bl.test. 60 IN A 127.0.0.2\n")
    with daemon.connect() as c:
        assert c.ask(client_address="192.0.2.55", instance="1").startswith("550")
        asked = len(dns_server.queries)
        assert c.ask(client_address="192.0.2.55", instance="2").startswith("550")
        assert c.ask(client_address="192.0.2.5", instance="3") == "DUNNO"
        assert c.ask(client_address="192.0.2.5", instance="4") == "DUNNO"
        assert len(dns_server.queries) == asked + 3  # only the new client's three lookups
        assert c.ask(client_address="192.0.2.99", instance="5").startswith("550")  # only the new client's three lookups
    assert 50 <= redis_server.client().ttl("mw:dnsbl:bl.test:192.0.2.55") <= 60  # the answer's TTL
    assert 290 <= redis_server.client().ttl("mw:dnsbl:bl.test:192.0.2.5") <= 300  # negative_ttl
    assert redis_server.client().exists("mw:dnsbl:bl.test:192.0.2.99") == 0  # TTL 0: not cached


def test_an_access_rule_skips_the_dnsbl(policyd_factory, redis_server, dns_server, tmp_path):
    rules = tmp_path / "access.toml"
    rules.write_text('[[rule]]\nname = "partner"\nclient = ["192.0.2.96/28"]\naction = "skip"\nskip = ["dnsbl"]\n')
    config = settings(redis_server.url, dns_server)
    config["policyd"]["checks"] = ["access", "dnsbl"]
    config["policyd"]["access"] = {"files": [str(rules)]}
    daemon = policyd_factory(config)
    with daemon.connect() as c:
        assert c.ask(client_address="192.0.2.99") == "DUNNO"
    assert not [q for q in dns_server.queries if q.name.endswith("bl.test")]


def test_a_lookup_url_is_offered_only_when_the_site_sets_one(policyd_factory, redis_server, dns_server):
    daemon = policyd_factory(settings(redis_server.url, dns_server,
                                      lookup_url="https://mx.example.org/blocked?ip={client}"))
    with daemon.connect() as c:
        assert c.ask(client_address="192.0.2.99") == ("550 5.7.1 Service unavailable; client [192.0.2.99] blocked "
                                                      "using bl.test; see https://mx.example.org/blocked?ip=192.0.2.99")


def test_an_authenticated_client_is_not_looked_up_by_default(daemon, dns_server):
    """A user sending from a home address on a list of dynamic addresses (Spamhaus PBL) is not refused:
    policyd runs before permit_sasl_authenticated, and authenticated clients skip the DNSBL check."""
    with daemon.connect() as c:
        assert c.ask(client_address="192.0.2.99", sasl_method="PLAIN", sasl_username="alice") == "DUNNO"
        assert c.ask(client_address="192.0.2.99", instance="x2").startswith("550 5.7.1")  # not logged in: refused
    log = daemon.wait_log("authenticated client, not looked up")
    assert "check=dnsbl action=accept" in log
    assert len([q for q in dns_server.queries if q.name.endswith("99.2.0.192.bl.test")]) == 1  # the second only


def test_check_authenticated_looks_authenticated_clients_up_too(policyd_factory, redis_server, dns_server):
    daemon = policyd_factory(settings(redis_server.url, dns_server, check_authenticated=True))
    with daemon.connect() as c:
        assert c.ask(client_address="192.0.2.99", sasl_method="PLAIN", sasl_username="alice") == (
            "550 5.7.1 Service unavailable; client [192.0.2.99] blocked using bl.test")
