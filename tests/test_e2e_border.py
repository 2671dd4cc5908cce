"""End to end through the real Postfix with a DNS server on loopback serving test zones: DNSBL, SPF,
access rules and SPF-aware greylisting, as a sending client sees them."""

from __future__ import annotations

import time

import pytest
from conftest import base_settings, dns_settings
from test_e2e_policyd import send

pytestmark = pytest.mark.e2e

LISTS = [{"zone": "bl.test", "weight": 2}, {"zone": "weak.test", "weight": 1}]


@pytest.fixture
def border(stack_factory, redis_server, dns_server, tmp_path):
    rules = tmp_path / "access.toml"
    rules.write_text('[[rule]]\nname = "partner-net"\nclient = ["192.0.2.112/29"]\naction = "skip"\n'
                     'skip = ["dnsbl"]\n')
    config = base_settings(redis_server.url, checks=["access", "dnsbl", "spf", "greylist"],
                           access={"files": [str(rules)]}, dnsbl={"lists": LISTS, "threshold": 2},
                           greylist={"delay": "1s", "ipv4_prefix": 32}, hostname="mx.receiver.test")
    config["dns"] = dns_settings(dns_server)
    return stack_factory(config)


def test_listed_client_is_rejected_naming_the_list(border):
    refused = send(border, "from a listed host", client_address="192.0.2.99", sender="a@fail.test")
    code, text = refused["user@example.test"]
    assert code == 550 and "blocked using bl.test" in text
    assert border.sink.messages == []


def test_a_weight_below_the_threshold_passes_the_dnsbl(border):
    refused = send(border, "weakly listed", client_address="192.0.2.98", sender="a@nospf.test")
    code, text = refused["user@example.test"]
    assert code == 450 and "Greylisted" in text  # past the DNSBL, stopped by greylisting only


def test_a_trusted_network_from_the_rules_skips_the_dnsbl(border, dns_server):
    dns_server.set_zone(dns_server.zone_text + "\n113.2.0.192.bl.test. IN A 127.0.0.2\n")
    refused = send(border, "partner", client_address="192.0.2.113", sender="a@nospf.test")
    assert refused["user@example.test"][0] == 450  # greylisted, not rejected by bl.test
    assert not [q for q in dns_server.queries if q.name.startswith("113.2.0.192.")]


def test_spf_fail_is_rejected(border):
    refused = send(border, "forged", client_address="203.0.113.7", sender="ceo@example.test")
    code, text = refused["user@example.test"]
    assert code == 550 and text.startswith("5.7.23") and "does not allow 203.0.113.7" in text


def test_spf_pass_gets_received_spf_and_a_retry_from_the_senders_pool_is_accepted(border):
    refused = send(border, "newsletter", client_address="198.51.100.10", sender="news@example.test")
    assert refused["user@example.test"][0] == 450
    time.sleep(1.2)
    # the retry comes from another host of example.test's SPF pool: same triplet, accepted
    assert send(border, "newsletter", client_address="198.51.100.11", sender="news@example.test") is None
    [delivered] = border.sink.wait_for(1)
    message = delivered.message
    assert message["Received-SPF"].startswith("pass (mx.receiver.test: domain of example.test designates "
                                              "198.51.100.11 as permitted sender)")
    assert message["X-Greylist"].startswith("delayed ")
