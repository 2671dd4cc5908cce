"""The postmaster's rate-limit controls through the CLI and the real Postfix: show, reset, override."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import base_settings
from harness.net import wait_for
from test_e2e_policyd import send

pytestmark = pytest.mark.e2e

LIMITS = [{"name": "user-msgs", "key": "sasl_user", "count": "messages", "max": 2, "window": "1h"},
          {"name": "all-users", "key": "global", "count": "messages", "max": 6, "window": "1h"}]


def cli(stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(stack.policyd.config_path),
                           "ratelimit", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def stack(stack_factory, redis_server):
    return stack_factory(base_settings(redis_server.url, checks=["ratelimit"], ratelimit={"limits": LIMITS}))


def test_show_then_reset_lets_the_user_send_again_at_once(stack):
    assert send(stack, "a1", login="alice") is None
    assert send(stack, "a2", login="alice") is None
    assert send(stack, "a3", login="alice")["user@example.test"][0] == 450
    shown = json.loads(cli(stack, "show", "alice", "--json").stdout)
    assert {s["limit"]: (s["count"], s["max"]) for s in shown} == {"user-msgs": (2, 2), "all-users": (2, 6)}
    human = cli(stack, "show", "alice", "--limit", "user-msgs").stdout
    assert human.strip() == "user-msgs: alice at 2 of 2 per 1h"
    reset = cli(stack, "reset", "alice", "--limit", "user-msgs", "--json")
    assert reset.returncode == 0 and json.loads(reset.stdout)["counters_removed"] == 1
    assert send(stack, "a4", login="alice") is None


def test_override_raises_one_users_limit_and_nobody_elses(stack):
    done = cli(stack, "override", "alice", "--limit", "user-msgs", "--max", "4", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["override"] == "4"
    for n in range(4):
        assert send(stack, f"alice {n}", login="alice") is None
    assert send(stack, "alice 5", login="alice")["user@example.test"][0] == 450
    assert send(stack, "bob 1", login="bob") is None
    assert send(stack, "bob 2", login="bob") is None
    assert send(stack, "bob 3", login="bob")["user@example.test"][0] == 450
    assert "(override 4)" in cli(stack, "show", "alice", "--limit", "user-msgs").stdout
    assert cli(stack, "override", "alice", "--limit", "user-msgs", "--remove").returncode == 0


def test_the_server_wide_cap_stops_a_burst_spread_over_many_users(stack):
    results = [send(stack, f"burst {n}", login=f"user{n}") for n in range(8)]
    assert [r is None for r in results] == [True] * 6 + [False] * 2
    stack.policyd.wait_log("rate limit all-users reached")


def test_usage_errors(stack):
    assert cli(stack, "override", "alice", "--limit", "user-msgs").returncode == 2
    unknown = cli(stack, "show", "alice", "--limit", "nope")
    assert unknown.returncode == 2 and "no windowed limit named 'nope'" in unknown.stderr


def test_hold_action_parks_mail_and_notifies_user_and_admin_once(stack_factory, redis_server, sink):
    limits = [{"name": "user-msgs", "key": "sasl_user", "count": "messages", "max": 2, "window": "1h",
               "action": "hold"}]
    notify = {"relay": f"127.0.0.1:{sink.port}", "admin": "postmaster@example.test",
              "user_domain": "example.test", "sender": "mailwarden@example.test"}
    stack = stack_factory(base_settings(redis_server.url, checks=["ratelimit"],
                                        ratelimit={"limits": limits, "notify": notify}))
    for n in range(2):
        assert send(stack, f"ok {n}", login="alice") is None
    for n in range(3):
        assert send(stack, f"over {n}", login="alice") is None  # accepted by Postfix ...
    # ... into the hold queue: nothing lost, nothing sent
    wait_for(lambda: len([m for m in stack.postfix.queue() if m["queue_name"] == "hold"]) == 3, 15,
             what="three messages on hold")
    # a marker from bob after the three refusals: once it arrived, so did any notice they set off
    assert send(stack, "marker", login="bob") is None
    received = stack.sink.wait_for_subjects("marker", "ok 0", "ok 1", "Rate limit user-msgs reached by alice",
                                            "Your outgoing mail has been held back")
    notices = [m for m in received if m.message["Auto-Submitted"] == "auto-generated"]
    assert sorted(m.rcpt_tos[0] for m in notices) == ["alice@example.test", "postmaster@example.test"]
    assert sorted(m.message["Subject"] for m in received if m not in notices) == ["marker", "ok 0", "ok 1"]
    admin = next(m for m in notices if m.rcpt_tos[0] == "postmaster@example.test").message
    assert admin["Subject"] == "Rate limit user-msgs reached by alice"
    assert "held for review" in admin.get_content()
    stack.policyd.wait_log('action=hold reason="rate limit user-msgs reached')
    assert cli(stack, "reset", "alice").returncode == 0
    assert send(stack, "after reset", login="alice") is None
    after = stack.sink.wait_for_subjects("after reset")
    assert len([m for m in after if m.message["Auto-Submitted"]]) == 2  # still one each
