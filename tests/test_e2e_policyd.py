"""End to end: smtplib -> a real private Postfix -> check_policy_service -> policyd (own process) -> Redis.

Each test asserts on the SMTP replies Postfix gives and on what reached the sink.
"""

from __future__ import annotations

import smtplib
import subprocess
import sys
import time

import pytest
from conftest import base_settings, message

pytestmark = pytest.mark.e2e


def send(stack, subject: str, rcpt: str = "user@example.test", sender: str = "sender@example.org", **session):
    """Send one message; return None when accepted, else {recipient: (code, text)} of the refusal."""
    with stack.smtp(**session) as conn:
        try:
            conn.sendmail(sender, [rcpt], message(subject, sender, rcpt))
        except smtplib.SMTPRecipientsRefused as exc:
            return {r: (code, text.decode()) for r, (code, text) in exc.recipients.items()}
    return None


def test_new_triplet_is_deferred_and_a_retry_after_the_delay_is_delivered_with_x_greylist(stack_factory, redis_server):
    stack = stack_factory(base_settings(redis_server.url, greylist={"delay": "2s"}))
    refused = send(stack, "greylist me")
    assert refused is not None
    code, text = refused["user@example.test"]
    assert code == 450
    assert "Greylisted, please try again in 2 seconds" in text
    assert stack.sink.messages == []

    early = send(stack, "greylist me")  # inside the delay: deferred again
    assert early is not None and early["user@example.test"][0] == 450

    time.sleep(2.2)
    assert send(stack, "greylist me") is None
    [delivered] = stack.sink.wait_for(1)
    header = delivered.message["X-Greylist"]
    assert header is not None and header.startswith("delayed ") and " seconds by mailwarden-policyd" in header
    assert int(header.split()[1]) >= 2
    stack.policyd.wait_log('check=greylist action=defer reason="new triplet"')
    stack.policyd.wait_log("reason=\"retried after")


def test_authenticated_submission_is_not_greylisted(stack_factory, redis_server):
    stack = stack_factory(base_settings(redis_server.url, greylist={"delay": "1h"}))
    assert send(stack, "from alice", login="alice") is None
    [delivered] = stack.sink.wait_for(1)
    assert delivered.message["X-Greylist"] is None
    stack.policyd.wait_log('user=alice check=greylist action=accept reason="authenticated client"')


def test_user_over_its_message_limit_is_deferred_while_another_user_gets_through(stack_factory, redis_server):
    limits = [{"name": "user-msgs", "key": "sasl_user", "count": "messages", "max": 3, "window": "1h"}]
    stack = stack_factory(base_settings(redis_server.url, ratelimit={"limits": limits}))
    for n in range(3):
        assert send(stack, f"alice {n}", login="alice", rcpt=f"r{n}@example.test") is None
    refused = send(stack, "alice 3", login="alice")
    assert refused is not None
    code, text = refused["user@example.test"]
    assert code == 450 and "4.7.1" in text and "Sending limit reached" in text
    assert "user-msgs" not in text and "3" not in text.split("4.7.1", 1)[1]  # no internals for the client
    assert send(stack, "bob 0", login="bob") is None
    delivered = stack.sink.wait_for_subjects("alice 0", "alice 1", "alice 2", "bob 0")
    assert sorted(m.message["Subject"] for m in delivered) == ["alice 0", "alice 1", "alice 2", "bob 0"]
    assert stack.sink.with_subject("alice 3") == []
    stack.policyd.wait_log("rate limit user-msgs reached: sasl_user=alice at 3 of 3")


def test_message_to_many_recipients_counts_once_against_a_message_limit(stack_factory, redis_server):
    limits = [{"name": "user-msgs", "key": "sasl_user", "count": "messages", "max": 2, "window": "1h"}]
    stack = stack_factory(base_settings(redis_server.url, ratelimit={"limits": limits}))
    rcpts = [f"r{n}@example.test" for n in range(5)]
    with stack.smtp(login="carol") as conn:
        assert conn.sendmail("carol@example.org", rcpts, message("five rcpts", "carol@example.org")) == {}
    assert send(stack, "second", login="carol") is None  # the 5-recipient message counted as one
    refused = send(stack, "third", login="carol")
    assert refused is not None and refused["user@example.test"][0] == 450


def test_blocked_account_is_rejected_at_rcpt_with_the_help_desk_text(stack_factory, redis_server):
    stack = stack_factory(base_settings(redis_server.url))
    cli = [sys.executable, "-m", "mailwarden.cli", "--config", str(stack.policyd.config_path)]
    subprocess.run([*cli, "block", "add", "--user", "mallory", "--reason", "phished"], check=True)
    refused = send(stack, "from mallory", login="mallory")
    assert refused is not None
    code, text = refused["user@example.test"]
    assert code == 550 and text.startswith("5.7.1")
    assert "please contact the help desk" in text
    assert send(stack, "from alice", login="alice") is None
    subprocess.run([*cli, "block", "remove", "--user", "mallory"], check=True)
    assert send(stack, "mallory again", login="mallory") is None


def test_with_redis_stopped_mail_still_flows_and_the_log_says_why(stack_factory, own_redis):
    stack = stack_factory(base_settings(own_redis.url, greylist={"delay": "1h"}))
    assert send(stack, "while redis is up")["user@example.test"][0] == 450  # greylisting works
    own_redis.stop()
    started = time.monotonic()
    assert send(stack, "while redis is down", sender="other@example.org") is None
    assert time.monotonic() - started < 5
    [delivered] = stack.sink.wait_for(1)
    assert delivered.message["Subject"] == "while redis is down"
    log = stack.policyd.wait_log("fail mode dunno")
    assert "action=fail_open" in log
    assert "backend failed; applying fail mode" in log
