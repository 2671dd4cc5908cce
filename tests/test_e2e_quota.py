"""Over-quota through the real Postfix and Dovecot's quota-status: the message size counts, an alias is
judged by its mailbox, an outage lets mail in, and the full mailbox's owner gets one notice, not one per
refused message."""

from __future__ import annotations

import smtplib

import pytest
from conftest import base_settings, message
from harness.net import free_port

pytestmark = pytest.mark.e2e


@pytest.fixture
def quota_stack(stack_factory, redis_server, dovecot, tmp_path):
    recipients = tmp_path / "recipients"
    recipients.write_text("alice@example.org\nfull@example.org\nthree@example.org\n"
                          "threealias@example.org: three@example.org\n")
    smtp_port = free_port()
    config = base_settings(redis_server.url, checks=["recipients", "quota"], recipients={
        "domains": ["example.org"], "sources": ["file"], "file": {"paths": [str(recipients)]}},
        quota={"dovecot": f"127.0.0.1:{dovecot.quota_port}",
               "notify": {"relay": f"127.0.0.1:{smtp_port}", "sender": "postmaster@example.org"}})
    return stack_factory(config, smtp_port=smtp_port, relay_domains="example.org")


def sized(stack, rcpt: str, size: int, subject: str):
    """Send ``size`` bytes; smtplib announces SIZE= in MAIL FROM, so Postfix passes the size to policyd."""
    body = message(subject, "sender@example.net", rcpt) + ("x" * 998 + "\r\n") * (size // 1000)
    with stack.smtp() as conn:
        try:
            conn.sendmail("sender@example.net", [rcpt], body)
        except smtplib.SMTPRecipientsRefused as exc:
            return exc.recipients[rcpt]
    return None


def test_message_size_counts_and_an_alias_is_judged_by_its_mailbox(quota_stack):
    refused = sized(quota_stack, "three@example.org", 5_000_000, "five megabytes")
    assert refused is not None and refused[0] == 452 and refused[1].startswith(b"4.2.2")
    assert sized(quota_stack, "three@example.org", 1_000_000, "one megabyte") is None
    refused = sized(quota_stack, "threealias@example.org", 5_000_000, "five via alias")
    assert refused is not None and refused[0] == 452
    [delivered] = quota_stack.sink.wait_for(1)
    assert delivered.message["Subject"] == "one megabyte"


def test_the_full_mailbox_gets_one_notice_not_one_per_refused_message(quota_stack):
    for n in range(3):
        refused = sized(quota_stack, "full@example.org", 1000, f"to full {n}")
        assert refused is not None and refused[0] == 452
    # a marker sent after the three refusals: once it arrived, so did any notice they set off
    assert sized(quota_stack, "alice@example.org", 1000, "marker") is None
    arrived = quota_stack.sink.wait_for_subjects("marker", "Your mailbox is full: mail to you is being refused")
    [notice] = [m for m in arrived if m.message["Subject"] != "marker"]
    assert notice.rcpt_tos == ("full@example.org",)
    assert notice.message["Subject"] == "Your mailbox is full: mail to you is being refused"
    assert notice.message["Auto-Submitted"] == "auto-generated"
    # it went through Postfix and the policy, and passed
    quota_stack.policyd.wait_log('reason="our own over-quota notice"')


def test_with_quota_status_stopped_mail_is_accepted_and_the_log_says_why(quota_stack, dovecot):
    dovecot.stop()
    try:
        assert sized(quota_stack, "full@example.org", 1000, "while dovecot is down") is None
    finally:
        dovecot.start()
    quota_stack.sink.wait_for(1)
    log = quota_stack.policyd.wait_log("backend failed; applying fail mode")
    assert "backend=quota" in log
    quota_stack.policyd.wait_log("fail mode dunno")  # the decision line: up to [logging] decision_batch later


def test_a_message_without_announced_size_is_judged_at_end_of_data(quota_stack):
    """Without SIZE= in MAIL FROM the RCPT check sees size 0; the END-OF-MESSAGE check sees the real size."""
    body = message("unannounced", "sender@example.net", "three@example.org") + ("x" * 998 + "\r\n") * 5000
    with quota_stack.smtp() as conn:
        conn.mail("sender@example.net")  # no SIZE= parameter
        assert conn.rcpt("three@example.org")[0] == 250
        code, text = conn.data(body.encode())
    assert code == 452 and text.startswith(b"4.2.2")
    assert sized(quota_stack, "alice@example.org", 1000, "marker") is None
    assert [m.message["Subject"] for m in quota_stack.sink.wait_for_subjects("marker")] == ["marker"]
