"""The postmaster's greylist controls, through the real Postfix and the CLI: show, pass, flush, expect
windows, and allow-listed or SPF-trusted senders that skip greylisting."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from conftest import base_settings, dns_settings
from harness.net import wait_for
from test_e2e_policyd import send

pytestmark = pytest.mark.e2e


def cli(stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(stack.policyd.config_path),
                           "greylist", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def stack(stack_factory, redis_server):
    return stack_factory(base_settings(redis_server.url, checks=["greylist"]))


def test_show_then_pass_lets_the_next_attempt_through(stack):
    first = send(stack, "first", client_address="198.51.100.20", sender="news@example.org")
    assert first["user@example.test"][0] == 450
    shown = cli(stack, "show", "--client", "198.51.100.20", "--json")
    assert shown.returncode == 0, shown.stderr
    [triplet] = json.loads(shown.stdout)
    assert (triplet["origin"], triplet["sender"], triplet["recipient"]) == (
        "198.51.100.0/24", "news@example.org", "user@example.test")
    assert triplet["verdict"].startswith("deferred for ") and not triplet["passed"]
    human = cli(stack, "show", "--sender", "news@example.org")
    assert "198.51.100.0/24 news@example.org -> user@example.test" in human.stdout
    passed = cli(stack, "pass", "--client", "198.51.100.20", "--recipient", "user@example.test", "--json")
    assert passed.returncode == 0 and len(json.loads(passed.stdout)["triplets"]) == 1
    assert send(stack, "first", client_address="198.51.100.20", sender="news@example.org") is None
    stack.sink.wait_for(1)


def test_pass_creates_an_unseen_full_triplet(stack):
    result = cli(stack, "pass", "--client", "198.51.100.30", "--sender", "otp@bank.example",
                 "--recipient", "user@example.test")
    assert result.returncode == 0 and "1 triplet(s) will pass" in result.stdout
    assert send(stack, "code", client_address="198.51.100.31", sender="otp@bank.example") is None


def test_flush_of_a_client_makes_its_next_message_deferred_again(stack):
    assert cli(stack, "pass", "--client", "198.51.100.40", "--sender", "a@example.org",
               "--recipient", "user@example.test").returncode == 0
    assert send(stack, "one", client_address="198.51.100.40", sender="a@example.org") is None
    flushed = cli(stack, "flush", "--client", "198.51.100.40", "--json")
    assert flushed.returncode == 0 and json.loads(flushed.stdout)["removed"] >= 1
    assert send(stack, "two", client_address="198.51.100.40", sender="a@example.org")["user@example.test"][0] == 450


def test_expect_window_opens_and_closes_by_itself(stack):
    opened = cli(stack, "expect", "--sender-domain", "bank.example", "--for", "60s", "--reason", "OTP mails",
                 "--json")
    assert opened.returncode == 0 and json.loads(opened.stdout)["expires_in"] == 60
    windows = json.loads(cli(stack, "windows", "--json").stdout)
    assert [w["domain"] for w in windows] == ["bank.example"] and windows[0]["reason"] == "OTP mails"
    assert send(stack, "otp inside", client_address="203.0.113.50", sender="otp@bank.example") is None
    stack.policyd.wait_log("inside an expect window for bank.example")
    # a short window closes by itself: once it is no longer listed (a positive signal, however slow the
    # machine), mail from that domain is greylisted again
    assert cli(stack, "expect", "--sender-domain", "short.example", "--for", "1s").returncode == 0

    def closed() -> bool:
        listed = json.loads(cli(stack, "windows", "--json").stdout)
        return "short.example" not in [w["domain"] for w in listed]

    wait_for(closed, timeout=20, what="the 1 s expect window to close")
    after = send(stack, "otp after", client_address="203.0.113.51", sender="otp2@short.example")
    assert after["user@example.test"][0] == 450


def test_expect_window_for_one_recipient_only(stack):
    assert cli(stack, "expect", "--sender-domain", "bank.example", "--recipient", "ceo@example.test",
               "--for", "1h").returncode == 0
    assert send(stack, "to ceo", rcpt="ceo@example.test", client_address="203.0.113.60",
                sender="x@bank.example") is None
    assert send(stack, "to user", client_address="203.0.113.60", sender="x@bank.example")["user@example.test"][0] == 450


def test_selector_errors_are_clear(stack):
    bad = cli(stack, "show", "--client", "not-an-ip")
    assert bad.returncode == 2 and "does not appear to be an IPv4 or IPv6 address" in bad.stderr
    none = cli(stack, "flush")
    assert none.returncode == 2 and "give at least one of" in none.stderr
    assert cli(stack, "expect", "--sender-domain", "x.example", "--for", "soon").returncode == 2


def test_dnswl_listed_client_is_never_greylisted(stack_factory, redis_server, dns_server):
    config = base_settings(redis_server.url, checks=["dnsbl", "greylist"],
                           dnsbl={"lists": [{"zone": "wl.test", "weight": -5}], "threshold": 1})
    config["dns"] = dns_settings(dns_server)
    stack = stack_factory(config)
    assert send(stack, "from a listed friend", client_address="192.0.2.77", sender="x@nospf.test") is None
    stranger = send(stack, "from a stranger", client_address="192.0.2.78", sender="x@nospf.test")
    assert stranger["user@example.test"][0] == 450
    assert 'reason="client on allow list wl.test"' in stack.policyd.wait_log("allow list")


def test_spf_passing_senders_of_listed_domains_skip_greylisting(stack_factory, redis_server, dns_server):
    config = base_settings(redis_server.url, checks=["spf", "greylist"],
                           greylist={"skip_spf_domains": ["example.test"]})
    config["dns"] = dns_settings(dns_server)
    stack = stack_factory(config)
    assert send(stack, "reset link", client_address="198.51.100.10", sender="noreply@example.test") is None
    forged = send(stack, "forged", client_address="203.0.113.9", sender="x@softfail.test")
    assert forged["user@example.test"][0] == 450


def test_recipients_who_opted_out_in_sql_are_not_greylisted(policyd_factory, redis_server, mariadb):
    url = mariadb.create_database("optout", drop=True)
    mariadb.run_script("CREATE TABLE optout.greylist_opt_out (address VARCHAR(254) PRIMARY KEY);"
                       "INSERT INTO optout.greylist_opt_out VALUES ('ceo@example.test');")
    daemon = policyd_factory(base_settings(redis_server.url, checks=["greylist"], greylist={
        "opt_out_sql": {"url": url, "cache_ttl": "1s"}}))
    with daemon.connect() as c:
        assert c.ask(recipient="CEO@example.test") == "DUNNO"
        assert c.ask(recipient="user@example.test").startswith("DEFER_IF_PERMIT")
        mariadb.execute("INSERT INTO greylist_opt_out VALUES ('user@example.test')", database="optout")
        time.sleep(1.1)
        assert c.ask(recipient="user@example.test", sender="other@example.org") == "DUNNO"
        mariadb.stop()
        time.sleep(1.1)
        assert c.ask(recipient="ceo@example.test", sender="x@example.org").startswith("DEFER_IF_PERMIT")
        mariadb.start()
    daemon.wait_log('reason="recipient opted out of greylisting"')
    daemon.wait_log("greylist opt-out table unreadable; greylisting as usual")
