"""The postmaster's first hour with the command line: durations and times people can read, one set of exit
codes, --json errors, client passes, bounded expect windows, network blocks, and rate-limit controls
without Postfix (the daemon over its socket, the CLI as a subprocess)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import base_settings
from harness.net import free_port
from harness.policyd_proc import render_toml

from mailwarden.units import format_duration, format_time

CLIENT = "198.51.100.20"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=30, env={**os.environ, "TZ": "UTC"})


def config_file(tmp_path: Path, settings: dict) -> Path:
    path = tmp_path / "mw.toml"
    path.write_text(render_toml(settings))
    return path


@pytest.fixture
def config(tmp_path, redis_server) -> Path:
    return config_file(tmp_path, base_settings(redis_server.url, checks=["blocklist", "greylist"]))


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.5, "500ms"), (59, "59s"), (303, "5m 3s"), (3600, "1h"), (15150, "4h 12m"),
    (5400, "1h 30m"), (35 * 86400, "35d"), (3023950, "35d"), (86390, "1d"), (90061, "1d 1h"),
])
def test_durations_read_as_people_write_them(seconds, text):
    assert format_duration(seconds) == text


def test_times_name_their_zone(monkeypatch):
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        assert format_time(1_800_000_000) == "2027-01-15 08:00:00 UTC"
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


# -- exit codes and --json errors ----------------------------------------------------------------------

def test_errors_are_json_with_the_documented_exit_codes_when_json_is_given(config, tmp_path):
    absent = cli(config, "block", "remove", "--user", "nobody", "--json")
    assert absent.returncode == 1
    assert json.loads(absent.stdout) == {"ok": False, "error": "user nobody was not blocked"}
    human = cli(config, "block", "remove", "--user", "nobody")
    assert human.returncode == 1 and "user nobody was not blocked" in human.stderr and not human.stdout
    usage = cli(config, "block", "add", "--user", "x", "--json")  # --reason missing: click's own usage error
    assert usage.returncode == 2 and json.loads(usage.stdout)["ok"] is False
    assert "--reason" in json.loads(usage.stdout)["error"]
    both = cli(config, "block", "add", "--user", "a", "--client", "192.0.2.1", "--reason", "x", "--json")
    assert both.returncode == 2 and "exactly one of --user or --client" in json.loads(both.stdout)["error"]
    (tmp_path / "down").mkdir()
    down = config_file(tmp_path / "down", base_settings(f"redis://127.0.0.1:{free_port()}/0"))
    unreachable = cli(down, "greylist", "windows", "--json")
    assert unreachable.returncode == 69 and "cannot reach Redis" in json.loads(unreachable.stdout)["error"]
    bad = tmp_path / "bad.toml"
    bad.write_text("[policyd.greylist]\ndealy = 5\n")
    broken = cli(bad, "block", "list", "--json")
    assert broken.returncode == 78 and "dealy" in json.loads(broken.stdout)["error"]


def test_nothing_matched_exits_1(config):
    show = cli(config, "greylist", "show", "--client", "192.0.2.1", "--json")
    assert show.returncode == 1 and json.loads(show.stdout) == {"ok": False, "error": "no triplet matches"}
    flush = cli(config, "greylist", "flush", "--sender", "nobody@example.org")
    assert flush.returncode == 1 and "nothing to flush" in flush.stderr
    unexpect = cli(config, "greylist", "unexpect", "--sender-domain", "bank.example")
    assert unexpect.returncode == 1 and "no open window for bank.example" in unexpect.stderr


# -- greylist: client pass, real first sighting, expect windows ----------------------------------------

def test_pass_of_an_unseen_client_lets_its_next_attempt_through(policyd_factory, redis_server):
    daemon = policyd_factory(base_settings(redis_server.url, checks=["greylist"]))
    passed = cli(daemon.config_path, "greylist", "pass", "--client", CLIENT, "--json")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    result = json.loads(passed.stdout)
    assert result["triplets"] == [] and result["client"]["network"] == "198.51.100.0/24"
    assert result["client"]["expires_in"] == 86400
    assert "client network 198.51.100.0/24 passes for 1d" in cli(daemon.config_path, "greylist", "pass",
                                                                 "--client", CLIENT).stdout
    with daemon.connect() as client:
        assert client.ask(client_address="198.51.100.21", sender="first@example.org") == "DUNNO"
        assert client.ask(client_address="203.0.113.5", sender="first@example.org").startswith("DEFER_IF_PERMIT")
    daemon.wait_log("client let through by 'greylist pass'")
    # the triplet it let through is remembered as passed by hand, with its real first sighting
    [triplet] = json.loads(cli(daemon.config_path, "greylist", "show", "--client", CLIENT, "--json").stdout)
    assert triplet["passed"] and triplet["passed_by_hand"] and triplet["first_seen"] is not None
    # flushing the client closes the pass
    assert cli(daemon.config_path, "greylist", "flush", "--client", CLIENT).returncode == 0
    with daemon.connect() as client:
        assert client.ask(client_address=CLIENT, sender="second@example.org").startswith("DEFER_IF_PERMIT")


def test_pass_keeps_the_real_first_seen_time(policyd_factory, redis_server):
    daemon = policyd_factory(base_settings(redis_server.url, checks=["greylist"]))
    with daemon.connect() as client:
        assert client.ask(client_address=CLIENT, sender="news@example.org").startswith("DEFER_IF_PERMIT")
    [before] = json.loads(cli(daemon.config_path, "greylist", "show", "--client", CLIENT, "--json").stdout)
    passed = cli(daemon.config_path, "greylist", "pass", "--client", CLIENT, "--sender", "news@example.org",
                 "--recipient", "user@example.test", "--json")
    assert passed.returncode == 0, passed.stderr
    [after] = json.loads(passed.stdout)["triplets"]
    assert after["first_seen"] == before["first_seen"] and after["last_seen"] == before["last_seen"]
    assert after["passed"] and after["verdict"] == "passes (let through by 'greylist pass')"
    with daemon.connect() as client:
        assert client.ask(client_address=CLIENT, sender="news@example.org") == "DUNNO"
    human = cli(daemon.config_path, "greylist", "show", "--client", CLIENT).stdout
    assert f"first seen {format_time_utc(before['first_seen'])}, " in human and "passed by hand" in human


def format_time_utc(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def test_show_prints_durations_and_zoned_times(policyd_factory, redis_server):
    daemon = policyd_factory(base_settings(redis_server.url, checks=["greylist"]))
    with daemon.connect() as client:
        assert client.ask(client_address=CLIENT).startswith("DEFER_IF_PERMIT")
    human = cli(daemon.config_path, "greylist", "show").stdout
    assert " UTC, last seen " in human and "forgotten in 2d:" in human
    assert re.search(r"next attempt deferred for (4m \d+s|5m) more", human), human


def test_expect_windows_are_bounded_closable_and_keep_their_reason(policyd_factory, redis_server):
    daemon = policyd_factory(base_settings(redis_server.url, checks=["greylist"],
                                           greylist={"expect_max": "1d"}))
    too_long = cli(daemon.config_path, "greylist", "expect", "--sender-domain", "bank.example", "--for", "2d")
    assert too_long.returncode == 2 and "longer than policyd.greylist.expect_max (1d)" in too_long.stderr
    zero = cli(daemon.config_path, "greylist", "expect", "--sender-domain", "bank.example", "--for", "0")
    assert zero.returncode == 2 and "greylist unexpect" in zero.stderr
    opened = cli(daemon.config_path, "greylist", "expect", "--sender-domain", "bank.example", "--for", "4h",
                 "--reason", "OTP mails", "--json")
    assert opened.returncode == 0 and json.loads(opened.stdout)["expires_in"] == 4 * 3600
    cli(daemon.config_path, "greylist", "expect", "--sender-domain", "shop.example", "--recipient",
        "CEO@example.test", "--for", "30m", "--reason", "order confirmations")
    windows = json.loads(cli(daemon.config_path, "greylist", "windows", "--json").stdout)
    assert [(w["domain"], w["recipient"], w["reason"]) for w in windows] == [
        ("bank.example", None, "OTP mails"), ("shop.example", "ceo@example.test", "order confirmations")]
    human = cli(daemon.config_path, "greylist", "windows").stdout
    assert re.search(r"^bank\.example -> anyone: (4h|3h 59m) left, opened [-\d]+ [:\d]+ UTC by \S+: OTP mails$",
                     human, re.MULTILINE), human
    assert re.search(r"^shop\.example -> ceo@example\.test: (30m|29m \d+s) left", human, re.MULTILINE), human
    with daemon.connect() as client:
        assert client.ask(client_address="203.0.113.50", sender="otp@bank.example") == "DUNNO"
        closed = cli(daemon.config_path, "greylist", "unexpect", "--sender-domain", "bank.example", "--json")
        assert closed.returncode == 0 and json.loads(closed.stdout)["reason"] == "OTP mails"
        assert client.ask(client_address="203.0.113.51", sender="otp2@bank.example").startswith("DEFER_IF_PERMIT")
    daemon.wait_log('reason="inside an expect window for bank.example: OTP mails"')


# -- block list: networks, expiry ------------------------------------------------------------------------

def test_block_add_expires_0_is_refused(config):
    refused = cli(config, "block", "add", "--client", "192.0.2.1", "--reason", "x", "--expires", "0")
    assert refused.returncode == 2 and "block remove" in refused.stderr
    assert cli(config, "block", "list", "--json").stdout.strip() == "[]"


def test_blocked_network_refuses_every_address_in_it(policyd_factory, redis_server):
    daemon = policyd_factory(base_settings(redis_server.url, checks=["blocklist"]))
    with daemon.connect() as client:
        assert client.ask(client_address="203.0.113.77") == "DUNNO"  # the check has seen no network yet
        added = cli(daemon.config_path, "block", "add", "--client", "203.0.113.9/24", "--reason", "spam run",
                    "--json")
        assert added.returncode == 0, added.stderr
        assert json.loads(added.stdout)["value"] == "203.0.113.0/24"
        assert cli(daemon.config_path, "block", "add", "--client", "2001:db8:5::/48", "--reason", "v6 spam",
                   "--expires", "12h").returncode == 0
        assert client.ask(client_address="203.0.113.77").startswith("550 5.7.1")
        assert client.ask(client_address="203.0.113.200").startswith("550 5.7.1")
        assert client.ask(client_address="203.0.114.1") == "DUNNO"
        assert client.ask(client_address="2001:db8:5:1::9").startswith("550 5.7.1")
        assert client.ask(client_address="2001:db8:6::9") == "DUNNO"
        listed = cli(daemon.config_path, "block", "list").stdout
        assert "203.0.113.0/24" in listed and " UTC by " in listed and "expires in 12h: v6 spam" in listed
        assert cli(daemon.config_path, "block", "remove", "--client", "203.0.113.0/24").returncode == 0
        assert client.ask(client_address="203.0.113.77") == "DUNNO"
    daemon.wait_log('reason="client blocked (203.0.113.0/24): spam run"')


# -- rate-limit controls -----------------------------------------------------------------------------------

LIMITS = [{"name": "user-msgs", "key": "sasl_user", "count": "messages", "max": 2, "window": "1h"}]


def test_ratelimit_controls_print_durations_and_exit_codes(tmp_path, redis_server):
    config = config_file(tmp_path, base_settings(redis_server.url, ratelimit={"limits": LIMITS}))
    shown = cli(config, "ratelimit", "show", "alice")
    assert shown.returncode == 0 and shown.stdout.strip() == "user-msgs: alice at 0 of 2 per 1h"
    assert cli(config, "ratelimit", "reset", "alice").returncode == 1
    assert cli(config, "ratelimit", "override", "alice", "--limit", "user-msgs", "--remove").returncode == 1
    zero = cli(config, "ratelimit", "override", "alice", "--limit", "user-msgs", "--max", "5", "--for", "0")
    assert zero.returncode == 2 and "--for 0" in zero.stderr
    assert cli(config, "ratelimit", "override", "alice", "--limit", "user-msgs", "--max", "5",
               "--for", "90m").returncode == 0
    assert "(override 5, 1h 30m left)" in cli(config, "ratelimit", "show", "alice").stdout
    unknown = cli(config, "ratelimit", "show", "alice", "--limit", "nope", "--json")
    assert unknown.returncode == 2 and "no windowed limit named 'nope'" in json.loads(unknown.stdout)["error"]
