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


@pytest.fixture
def directory_stack(stack_factory, redis_server, slapd, dovecot):
    """Postfix -> policyd with recipient verification from slapd and over-quota from Dovecot's quota-status."""
    config = base_settings(redis_server.url, checks=["recipients", "quota"], recipients={
        "domains": ["example.org"], "sources": ["ldap"], "negative_cache_ttl": 0, "cache_ttl": 0,
        "ldap": {"servers": [slapd.url], "base": "dc=example,dc=org", "timeout": "1s"}},
        quota={"dovecot": f"127.0.0.1:{dovecot.quota_port}"})
    stack = stack_factory(config)
    stack.postfix.relay_domains = "example.org"
    stack.postfix.stop()
    stack.postfix.start()
    return stack


def test_unknown_recipient_is_refused_at_rcpt_and_nothing_reaches_the_sink(directory_stack):
    refused = send(directory_stack, "to nobody", rcpt="nobody@example.org")
    code, text = refused["nobody@example.org"]
    assert code == 550 and text.startswith("5.1.1") and "User unknown" in text
    assert send(directory_stack, "to carol's alias", rcpt="c.smith@example.org") is None
    [delivered] = directory_stack.sink.wait_for(1)
    assert delivered.rcpt_tos == ("c.smith@example.org",)
    assert directory_stack.sink.with_subject("to nobody") == []


def test_disabled_account_is_refused(directory_stack):
    code, text = send(directory_stack, "to bob", rcpt="bob@example.org")["bob@example.org"]
    assert code == 550 and text.startswith("5.2.1")


def test_over_quota_recipient_gets_452(directory_stack, slapd):
    admin = slapd.admin_connection()
    admin.add("uid=full,ou=people,dc=example,dc=org", ["inetOrgPerson", "qmailUser"],
              {"uid": "full", "cn": "Full Mailbox", "sn": "Mailbox", "mail": "full@example.org",
               "accountStatus": "active"})
    code, text = send(directory_stack, "to full", rcpt="full@example.org")["full@example.org"]
    assert code == 452 and text.startswith("4.2.2")
    assert send(directory_stack, "to alice", rcpt="alice@example.org") is None


def test_directory_outage_gives_temporary_failures_and_recovers(directory_stack, slapd):
    assert send(directory_stack, "before", rcpt="alice@example.org") is None
    slapd.stop()
    for rcpt in ("alice@example.org", "nobody@example.org"):
        code, text = send(directory_stack, "during", rcpt=rcpt)[rcpt]
        assert code == 450 and text.startswith("4.3.0"), (rcpt, code, text)  # never a 550
    slapd.start()
    assert send(directory_stack, "after", rcpt="alice@example.org") is None
    assert send(directory_stack, "after", rcpt="nobody@example.org")["nobody@example.org"][0] == 550
