"""Hostile and malformed request values through every border check at once: each gets a valid, safe
answer, the log says why, and the daemon keeps serving."""

from __future__ import annotations

import re

import pytest
from conftest import base_settings, dns_settings

VALID = re.compile(r"^(DUNNO|OK|PREPEND \S.*|DEFER_IF_PERMIT .+|[45]\d\d [45]\.\d+\.\d+ .+)$")

ODD_REQUESTS = [
    {"sender": '"john smith"@example.test'},
    {"sender": "no-domain"},
    {"sender": "@"},
    {"sender": "user@"},
    {"sender": "jörg@exämple.test"},
    {"sender": "a" * 300 + "@example.test"},
    {"sender": "x@" + "sub." * 80 + "example.test"},
    {"sender": "x@[192.0.2.1]"},
    {"sender": "<weird>@example.test"},
    {"recipient": '"quoted local"@example.org'},
    {"recipient": "no-domain"},
    {"recipient": "ünï@example.org"},
    {"recipient": "x" * 70 + "@example.org"},
    {"recipient": "a@" + "b" * 300},
    {"recipient": "*)(objectClass=*"},
    {"recipient": "alice@example.org\\00"},
    {"client_address": "::ffff:192.0.2.99"},
    {"client_address": "2001:db8::99"},
    {"client_address": "999.1.2.3"},
    {"client_address": ""},
    {"client_address": "fe80::1%eth0"},
    {"helo_name": ""},
    {"helo_name": "[192.0.2.1]"},
    {"helo_name": "..."},
    {"helo_name": "x" * 500},
    {"size": "-5"},
    {"size": "99999999999999999999999"},
    {"size": "lots"},
    {"recipient_count": "many", "protocol_state": "END-OF-MESSAGE"},
    {"protocol_state": "VRFY"},
    {"protocol_state": "rcpt"},
    {"instance": ""},
    {"sasl_username": "x" * 1000},
]


@pytest.fixture
def all_checks(policyd_factory, redis_server, dns_server, slapd, dovecot, tmp_path):
    rules = tmp_path / "access.toml"
    rules.write_text("[[rule]]\nname = 'r'\nsender = ['/^never$/']\naction = 'reject'\n")
    config = base_settings(
        redis_server.url,
        checks=["access", "blocklist", "ratelimit", "dnsbl", "spf", "recipients", "quota", "greylist"],
        access={"files": [str(rules)]},
        dnsbl={"lists": [{"zone": "bl.test", "weight": 2}], "threshold": 2},
        recipients={"domains": ["example.org"], "sources": ["ldap"],
                    "ldap": {"servers": [slapd.url], "base": "dc=example,dc=org"}},
        quota={"dovecot": f"127.0.0.1:{dovecot.quota_port}"},
    )
    config["dns"] = dns_settings(dns_server)
    return policyd_factory(config)


def test_every_odd_request_gets_a_valid_answer_and_the_daemon_lives(all_checks):
    with all_checks.connect() as client:
        for n, attrs in enumerate(ODD_REQUESTS):
            answer = client.ask(**{"recipient": "alice@example.org", "instance": f"odd{n}", **attrs})
            assert answer is not None and VALID.match(answer), (attrs, answer)
        assert client.ask(client_address="192.0.2.99", instance="last", queue_id="LAST").startswith("550 5.7.1")
    # decision lines are written in order, up to [logging] decision_batch after their answer: the last
    # request's line says every earlier one is in too
    log = all_checks.wait_log(" queue_id=LAST ")
    assert "Traceback" not in log and "internal error" not in log
    assert all_checks.proc.poll() is None
    decisions = [line for line in log.splitlines() if "event=decision" in line]
    assert len(decisions) >= len(ODD_REQUESTS)


def test_ipv4_mapped_client_is_looked_up_as_ipv4(all_checks):
    with all_checks.connect() as client:
        answer = client.ask(client_address="::ffff:192.0.2.99", recipient="alice@example.org")
    assert answer == "550 5.7.1 Service unavailable; client [::ffff:192.0.2.99] blocked using bl.test"
