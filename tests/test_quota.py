"""Over-quota rejection against Dovecot's real quota-status service, and the over-quota file."""

from __future__ import annotations

import time

import pytest
from conftest import base_settings
from harness.net import free_port, wait_for


@pytest.fixture
def quota_settings(tmp_path, redis_server, dovecot):
    """Recipient verification (a map with aliases) in front of the quota check, as a site runs them."""
    recipients = tmp_path / "recipients"
    recipients.write_text("alice@example.org\nfull@example.org\nthree@example.org\n"
                          "fullalias@example.org: full@example.org\nboth@example.org: alice@example.org, "
                          "full@example.org\n")

    def settings(**quota) -> dict:
        return base_settings(redis_server.url, checks=["recipients", "quota"], recipients={
            "sources": ["file"], "file": {"paths": [str(recipients)]}},
            quota={"dovecot": f"127.0.0.1:{dovecot.quota_port}", **quota})

    return settings


@pytest.mark.parametrize(("recipient", "size", "answer"), [
    ("alice@example.org", "1000", "DUNNO"),
    ("full@example.org", "1000", "452 4.2.2 Mailbox is full"),
    ("full@example.org", "0", "452 4.2.2 Mailbox is full"),
    ("three@example.org", "1000000", "DUNNO"),          # 1 MB fits in the 3 MB left
    ("three@example.org", "5000000", "452 4.2.2 Mailbox is full"),  # 5 MB does not
    ("fullalias@example.org", "1000", "452 4.2.2 Mailbox is full"),  # judged by its target mailbox
    ("both@example.org", "1000", "DUNNO"),              # one full target does not refuse the alias
])
def test_dovecot_quota_status(policyd_factory, quota_settings, recipient, size, answer):
    daemon = policyd_factory(quota_settings())
    with daemon.connect() as c:
        assert c.ask(recipient=recipient, size=size) == answer


def test_permanent_answer_when_configured(policyd_factory, quota_settings):
    daemon = policyd_factory(quota_settings(permanent=True, text="Over quota"))
    with daemon.connect() as c:
        assert c.ask(recipient="full@example.org") == "552 5.2.2 Over quota"
    assert 'check=quota action=reject reason="mailbox full@example.org over quota (quota-status: 552 5.2.2' \
        in daemon.wait_log("check=quota")


def test_quota_service_down_fails_open_and_says_why(policyd_factory, quota_settings):
    daemon = policyd_factory(quota_settings(dovecot=f"127.0.0.1:{free_port()}"))
    with daemon.connect() as c:
        started = time.monotonic()
        assert c.ask(recipient="full@example.org") == "DUNNO"
        assert time.monotonic() - started < 2
    daemon.wait_log("backend failed; applying fail mode")
    # each part waited for: the lines are written as they happen, not all at once
    daemon.wait_log("backend=quota")
    daemon.wait_log("fail mode dunno")


def test_over_quota_file_with_grace(policyd_factory, redis_server, dovecot, tmp_path):
    over = tmp_path / "overquota"
    over.write_text("# written by the site's quota job\nalice@example.org 1000000 1000000\n"
                    "three@example.org\n")
    daemon = policyd_factory(base_settings(redis_server.url, checks=["quota"], quota={
        "sources": ["file"], "file": str(over), "grace_percent": 10}))
    with daemon.connect() as c:
        assert c.ask(recipient="alice@example.org", size="50000") == "DUNNO"     # inside the 10% grace
        assert c.ask(recipient="alice@example.org", size="200000") == "452 4.2.2 Mailbox is full"
        assert c.ask(recipient="three@example.org", size="1") == "452 4.2.2 Mailbox is full"
        assert c.ask(recipient="carol@example.org", size="1") == "DUNNO"
        over.write_text("carol@example.org\n")
        wait_for(lambda: c.ask(recipient="carol@example.org", size="1") == "452 4.2.2 Mailbox is full", 5,
                 what="the changed over-quota file re-read")
        assert c.ask(recipient="three@example.org", size="1") == "DUNNO"


def test_connections_are_reused_and_a_restarted_service_is_reconnected(policyd_factory, quota_settings, dovecot):
    daemon = policyd_factory(quota_settings())
    with daemon.connect() as c:
        for n in range(3):
            assert c.ask(recipient="full@example.org", instance=f"a{n}") == "452 4.2.2 Mailbox is full"
        dovecot.restart()  # the kept connection is now dead: the next request must open a new one, not fail
        assert c.ask(recipient="full@example.org", instance="b") == "452 4.2.2 Mailbox is full"
    assert "backend=quota" not in daemon.log_text()
