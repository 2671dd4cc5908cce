"""Access rules: matching, order, skip/permit/reject/defer, validation errors, reload without a restart."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest
from conftest import base_settings
from harness.net import wait_for

from mailwarden.config import ConfigError
from policyd.access import AccessCheck, load_rules
from policyd.check import ALL_CHECKS
from policyd.request import PolicyRequest
from policyd.settings_types import CheckName

CHECKS = {"access", "blocklist", "ratelimit", "greylist"}

RULES = r'''
[[rule]]
name = "campus"
client = ["137.143.0.0/16", "2001:db8:17::/48"]
action = "skip"
skip = ["greylist"]

[[rule]]
name = "bad-host"
client_name = ["*.spam.example", '/^dyn-\d+\.isp\.example$/']
action = "reject"
text = "Go away"
code = "554 5.7.1"

[[rule]]
name = "busy-partner"
helo = ["mx.partner.example"]
sender = ["@partner.example"]
action = "defer"
text = "Slow down"

[[rule]]
name = "monitoring"
sender = ["<>", "nagios@"]
recipient = ["@.monitor.example"]
action = "permit"

[[rule]]
name = "service-accounts"
sasl_user = ["/^svc-/", "Backup"]
authenticated = true
action = "skip"
skip = ["ratelimit"]
'''


def request(**attrs: str) -> PolicyRequest:
    base = {"protocol_state": "RCPT", "client_address": "192.0.2.1", "client_name": "unknown",
            "helo_name": "client.example", "sender": "a@example.org", "recipient": "u@example.test"}
    return PolicyRequest.from_attrs({**base, **attrs})


@pytest.fixture
def check(tmp_path: Path) -> AccessCheck:
    path = tmp_path / "access.toml"
    path.write_text(RULES)
    return AccessCheck([path], CHECKS, check_interval=0)


@pytest.mark.parametrize(("attrs", "reply", "skip"), [
    ({}, None, set()),
    ({"client_address": "137.143.9.9"}, "DUNNO", {"greylist"}),
    ({"client_address": "2001:db8:17:1::5"}, "DUNNO", {"greylist"}),
    ({"client_address": "137.144.0.1"}, None, set()),
    ({"client_name": "a.b.spam.example"}, "554 5.7.1 Go away", set()),
    ({"client_name": "spam.example"}, "554 5.7.1 Go away", set()),
    ({"client_name": "notspam.example"}, None, set()),
    ({"client_name": "DYN-42.isp.example."}, "554 5.7.1 Go away", set()),
    ({"helo_name": "mx.partner.example", "sender": "x@partner.example"}, "450 4.7.1 Slow down", set()),
    ({"helo_name": "mx.partner.example", "sender": "x@other.example"}, None, set()),
    ({"sender": "", "recipient": "ops@alerts.monitor.example"}, "DUNNO", {ALL_CHECKS}),
    ({"sender": "nagios+x@host.example", "recipient": "ops@monitor.example"}, "DUNNO", {ALL_CHECKS}),
    ({"sender": "", "recipient": "ops@monitor.example.org"}, None, set()),
    ({"sasl_username": "svc-web"}, "DUNNO", {"ratelimit"}),
    ({"sasl_username": "backup"}, "DUNNO", {"ratelimit"}),
    ({"sasl_username": "backup2"}, None, set()),
])
def test_rules(check, attrs, reply, skip):
    r = request(**attrs)
    verdict = check.evaluate(r)
    assert (verdict.reply if verdict else None) == reply
    assert r.skip == skip


def test_skip_rules_accumulate_and_a_later_reject_still_applies(check):
    r = request(client_address="137.143.1.1", client_name="x.spam.example")
    verdict = check.evaluate(r)
    assert verdict.decisive and verdict.reason == "access rule bad-host: reject"
    assert r.skip == {"greylist"}


@pytest.mark.parametrize(("text", "error"), [
    ('[[rule]]\nname = "x"\naction = "skip"\n', 'needs skip = ["check", ...]'),
    ('[[rule]]\nname = "x"\naction = "nuke"\n', 'rule "x".action'),
    ('[[rule]]\nname = "x"\nclient = ["300.1.1.1"]\naction = "permit"\n', 'rule "x".client.0'),
    ('[[rule]]\nname = "x"\nhelo = ["/[oops/"]\naction = "permit"\n', "bad regular expression"),
    ('[[rule]]\nname = "x"\naction = "skip"\nskip = ["spamassassin"]\n', 'rule "x".skip.0: Input should be'),
    ('[[rule]]\nname = "x"\naction = "reject"\ncode = "450 4.7.1"\n', "does not fit action"),
    ('[[rule]]\nname = "x"\naction = "permit"\nsendr = ["a@b"]\n', 'rule "x".sendr: unknown key'),
    ('[[rule]]\naction = "permit"\n', "rule.0.name: Field required"),
    ("[[rule]\n", "not valid TOML"),
])
def test_bad_rules_are_explained(tmp_path, text, error):
    path = tmp_path / "access.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=None) as err:
        load_rules(path, CHECKS)
    assert error in str(err.value) and str(path) in str(err.value)


def test_errors_name_the_rule_by_its_name_and_a_bad_network_once(tmp_path):
    path = tmp_path / "access.toml"
    path.write_text('[[rule]]\nname = "campus"\nclient = ["10.0.0.0/8"]\naction = "permit"\n'
                    '[[rule]]\nname = "lab"\nclient = ["10.1.0.0/33"]\naction = "skip"\nskip = ["greylist", "nope"]\n')
    with pytest.raises(ConfigError) as err:
        load_rules(path, CHECKS)
    lines = str(err.value).splitlines()
    assert lines[0] == f"{path}: invalid configuration (2 problem(s)):"
    assert lines[1].startswith('  rule "lab".client.0: not a network: ')
    assert lines[2].startswith('  rule "lab".skip.1: Input should be ')
    assert "rule.1" not in str(err.value)


def test_skip_names_only_checks_that_exist(tmp_path):
    path = tmp_path / "access.toml"
    path.write_text('[[rule]]\nname = "partners"\nclient = ["192.0.2.0/24"]\naction = "skip"\nskip = ["grey"]\n')
    with pytest.raises(ConfigError, match=r'rule "partners"\.skip\.0: Input should be .*\'greylist\''):
        load_rules(path, set(get_args(CheckName)))


def test_changed_file_is_reloaded_and_a_broken_one_keeps_the_old_rules(check, tmp_path):
    path = check.files[0]
    assert check.evaluate(request(client_address="198.51.100.1")) is None
    path.write_text('[[rule]]\nname = "new"\nclient = ["198.51.100.0/24"]\naction = "reject"\n')
    assert check.poll()
    assert check.evaluate(request(client_address="198.51.100.1")).decisive
    path.write_text("[[rule]]\nname = 'broken'\naction = 'skip'\n# a longer file, so the size changes\n")
    assert check.poll()
    assert check.evaluate(request(client_address="198.51.100.1")).decisive
    assert not check.poll()


def test_access_check_command(tmp_path):
    good = tmp_path / "good.toml"
    good.write_text(RULES)
    bad = tmp_path / "bad.toml"
    bad.write_text('[[rule]]\nname = "x"\naction = "skip"\n')
    ok = subprocess.run([sys.executable, "-m", "mailwarden.cli", "access", "check", str(good)],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "5 rule(s), valid" in ok.stdout
    broken = subprocess.run([sys.executable, "-m", "mailwarden.cli", "access", "check", str(bad)],
                            capture_output=True, text=True)
    assert broken.returncode == 78 and "needs skip" in broken.stderr


def test_daemon_applies_rules_and_picks_up_changes_without_restart(policyd_factory, redis_server, tmp_path):
    path = tmp_path / "access.toml"
    path.write_text('[[rule]]\nname = "trusted"\nclient = ["198.51.100.0/24"]\naction = "skip"\nskip = ["greylist"]\n')
    daemon = policyd_factory(base_settings(redis_server.url, access={"files": [str(path)], "check_interval": "100ms"}))
    with daemon.connect() as client:
        assert client.ask(client_address="198.51.100.7") == "DUNNO"
        assert client.ask(client_address="203.0.113.7").startswith("DEFER_IF_PERMIT")
        path.write_text('[[rule]]\nname = "blocked"\nclient = ["198.51.100.0/24"]\naction = "reject"\n'
                        'text = "No mail from you"\n')
        wait_for(lambda: client.ask(client_address="198.51.100.7") == "550 5.7.1 No mail from you", 10,
                 what="changed rules")
        path.write_text("[[rule]]\nname = 'oops'\naction = 'skip'\n")
        daemon.wait_log("access rules not reloaded; keeping the rules in use")
        assert client.ask(client_address="198.51.100.7") == "550 5.7.1 No mail from you"
    daemon.wait_log('check=access action=reject reason="access rule blocked: reject"')
    daemon.wait_log('rule \\"oops\\": action = \\"skip\\" needs skip = [')  # the broken file's error, named


def test_bad_rules_file_stops_start_up(tmp_path, redis_server):
    from harness.policyd_proc import render_toml

    rules = tmp_path / "access.toml"
    rules.write_text('[[rule]]\nname = "x"\nclient = ["not-a-net"]\naction = "permit"\n')
    config = tmp_path / "mw.toml"
    config.write_text(render_toml(base_settings(redis_server.url, access={"files": [str(rules)]})))
    result = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "policyd"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78 and 'rule "x".client.0' in result.stderr
