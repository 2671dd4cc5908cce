"""The config file: validated once, errors name the file, the key and what is allowed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mailwarden.config import ConfigError, load_config
from mailwarden.units import parse_duration

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "etc" / "mailwarden.toml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mailwarden.toml"
    path.write_text(text)
    return path


def test_no_file_gives_postgrey_like_defaults(monkeypatch, tmp_path):
    monkeypatch.setenv("MAILWARDEN_ROOT", str(tmp_path))  # no etc/mailwarden/mailwarden.toml under it
    monkeypatch.delenv("MAILWARDEN_CONFIG", raising=False)
    config = load_config()
    assert config.source is None
    policyd = config.section("policyd")
    assert policyd.listen == ["127.0.0.1:10023"]
    assert policyd.checks == ["access", "blocklist", "ratelimit", "greylist"]
    assert policyd.greylist.delay == 300 and policyd.greylist.max_age == 35 * 86400
    assert policyd.greylist.auto_whitelist_clients == 5
    assert policyd.fail_modes("redis").inbound == "dunno"
    assert policyd.fail_modes("ldap").inbound == "defer_if_permit"


def test_unknown_key_names_file_key_and_allowed_keys(tmp_path):
    path = write(tmp_path, "[policyd.greylist]\ndealy = 10\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert str(path) in text
    assert "policyd.greylist.dealy: unknown key" in text
    assert "delay" in text.split("allowed here:")[1]


def test_bad_duration_and_bad_choice_are_explained(tmp_path):
    path = write(tmp_path, '[policyd.greylist]\ndelay = "five minutes"\n[policyd.on_error.redis]\ninbound = "maybe"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert "policyd.greylist.delay: 'five minutes' is not a duration" in text
    assert "policyd.on_error.redis.inbound" in text and "'dunno'" in text


def test_limit_list_errors_point_at_the_entry(tmp_path):
    path = write(tmp_path, '[[policyd.ratelimit.limits]]\nname = "x"\nkey = "sasl_user"\nmax = 0\nwindow = "1h"\n')
    with pytest.raises(ConfigError, match=r"policyd\.ratelimit\.limits\.0\.max"):
        load_config(path)


def test_inconsistent_windows_are_refused(tmp_path):
    path = write(tmp_path, '[policyd.greylist]\ndelay = "3d"\n')
    with pytest.raises(ConfigError, match="retry_window must be longer than delay"):
        load_config(path)


def test_template_with_unknown_placeholder_is_refused(tmp_path):
    path = write(tmp_path, '[policyd.greylist]\ntext = "come back in {minutes}"\n')
    with pytest.raises(ConfigError, match=r"unknown placeholder \{minutes\}"):
        load_config(path)


def test_invalid_toml_names_the_file(tmp_path):
    path = write(tmp_path, "[policyd\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(path)


def test_dropins_override_the_main_file(tmp_path):
    path = write(tmp_path, '[policyd.greylist]\ndelay = "5m"\n')
    (tmp_path / "mailwarden.d").mkdir()
    (tmp_path / "mailwarden.d" / "10-site.toml").write_text('[policyd.greylist]\ndelay = "1m"\n')
    assert load_config(path).section("policyd").greylist.delay == 60


def test_command_line_overrides_win(tmp_path):
    path = write(tmp_path, '[redis]\nurl = "redis://10.0.0.1:6379/0"\n')
    config = load_config(path, {"redis.url": "redis://127.0.0.1:6380/2", "policyd.listen": ["unix:/tmp/p.sock"]})
    assert config.section("redis").url == "redis://127.0.0.1:6380/2"
    assert config.section("policyd").listen == ["unix:/tmp/p.sock"]


def test_bad_listen_address_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        load_config(write(tmp_path, '[policyd]\nlisten = ["localhost"]\n'))


@pytest.mark.parametrize(("text", "seconds"), [(300, 300), ("300s", 300), ("5m", 300), ("1h", 3600),
                                               ("35d", 35 * 86400), ("500ms", 0.5), ("2w", 14 * 86400)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["", "5 minutes", "-1", True, "1y", None])
def test_bad_durations(bad):
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_example_config_is_valid_and_documents_every_key():
    config = load_config(EXAMPLE)
    documented = set(re.findall(r"^#?\s*([a-z_0-9]+)\s*=", EXAMPLE.read_text(), re.MULTILINE))
    for section in re.findall(r"^#?\s*\[+([a-z_0-9.]+)\]+", EXAMPLE.read_text(), re.MULTILINE):
        documented |= set(section.split("."))  # a section documented by its [header]

    def keys(model) -> set[str]:
        found = set()
        for name in type(model).model_fields:
            found.add(name)
            value = getattr(model, name)
            if hasattr(type(value), "model_fields") and not isinstance(value, type):
                found |= keys(value)
        return found

    missing = keys(config.settings) - documented - {"redis", "logging", "metrics", "policyd", "on_error",
                                                    "greylist", "ratelimit", "blocklist", "limits", "access", "dns",
                                                    "dnsbl", "lists", "spf", "recipients", "file",
                                                    "sql", "ldap", "quota", "overrides", "exempt", "notify",
                                                    "opt_out_sql"}
    assert not missing, f"keys not documented in etc/mailwarden.toml: {sorted(missing)}"
    limit_keys = {"name", "key", "count", "max", "window", "action", "stage", "applies_to", "zone", "weight",
                  "codes"}
    assert limit_keys <= documented | set(re.findall(r"([a-z_]+) = ", EXAMPLE.read_text()))


def test_config_check_command_exits_78_with_the_key(tmp_path):
    path = write(tmp_path, "[policyd]\nchecks = [\"greylist\", \"clamav\"]\n")
    result = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(path), "config", "check"],
                            capture_output=True, text=True)
    assert result.returncode == 78
    assert "policyd.checks.1" in result.stderr
    ok = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(EXAMPLE), "config", "check",
                         "--json"], capture_output=True, text=True)
    assert ok.returncode == 0 and '"ok": true' in ok.stdout


def test_policyd_refuses_to_start_on_bad_config(tmp_path):
    path = write(tmp_path, "[policyd]\nlisten = 10023\n")
    result = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(path), "policyd"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 78
    assert "policyd.listen" in result.stderr


def test_window_error_is_one_clear_line(tmp_path):
    path = write(tmp_path, '[[policyd.ratelimit.limits]]\nname = "x"\nkey = "sasl_user"\nmax = 5\nwindow = "1 hour"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    lines = str(err.value).splitlines()
    assert len(lines) == 2
    assert lines[1].startswith("  policyd.ratelimit.limits.0.window: '1 hour' is neither a duration")


# -- config check reports what start-up would refuse ---------------------------------------------------


def mailwarden(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden.cli", *args], capture_output=True, text=True,
                          timeout=60)


def test_config_check_reports_missing_and_unreadable_files_by_key(tmp_path):
    path = write(tmp_path, f'''
[policyd]
checks = ["access", "recipients", "quota", "ratelimit", "greylist"]
[policyd.access]
files = ["{tmp_path}/no-access.toml"]
[policyd.greylist]
whitelist_clients = ["{tmp_path}"]
whitelist_recipients = ["{tmp_path}/no-recipients"]
[policyd.recipients]
sources = ["file"]
file.paths = ["{tmp_path}/no-map"]
[policyd.quota]
sources = ["file"]
file = "{tmp_path}/no-overquota"
[policyd.ratelimit]
overrides_file = "{tmp_path}/no-overrides"
''')
    result = mailwarden("--config", str(path), "config", "check")
    assert result.returncode == 78, result.stderr
    errors = result.stderr
    assert f"{path}: invalid configuration" in errors
    assert f"policyd.access.files.0: {tmp_path}/no-access.toml: no such file" in errors
    assert f"policyd.greylist.whitelist_clients.0: {tmp_path}: cannot read" in errors
    assert "policyd.greylist.whitelist_recipients.0:" in errors
    assert "policyd.recipients.file.paths.0:" in errors
    # tolerated at start-up (read later, a missing file is logged): warnings, not errors
    assert "warning: policyd.ratelimit.overrides_file:" in errors
    assert "warning: policyd.quota.file:" in errors
    assert "problem(s)" in errors and "4 problem(s)" in errors


def test_config_check_reads_the_access_rules_as_start_up_does(tmp_path):
    rules = tmp_path / "access.toml"
    rules.write_text('[[rule]]\nname = "campus"\nclient = ["10.0.0.0/8"]\naction = "skip"\nskip = ["spamassassin"]\n')
    path = write(tmp_path, f'[policyd.access]\nfiles = ["{rules}"]\n')
    result = mailwarden("--config", str(path), "config", "check", "--json")
    assert result.returncode == 78
    assert "campus" in result.stdout and "spamassassin" in result.stdout


def test_policyd_refuses_to_start_on_a_missing_recipient_map(tmp_path):
    path = write(tmp_path, f'[redis]\nurl = "redis://127.0.0.1:1/0"\n[policyd]\nchecks = ["recipients"]\n'
                           f'[policyd.recipients.file]\npaths = ["{tmp_path}/absent"]\n')
    result = mailwarden("--config", str(path), "policyd")
    assert result.returncode == 78, result.stderr
    assert "policyd.recipients.file.paths.0" in result.stderr and "Traceback" not in result.stderr


def test_warnings_leave_the_exit_code_at_zero_and_go_under_warnings_in_json(tmp_path):
    path = write(tmp_path, '[policyd]\nchecks = ["greylist", "access", "ratelimit"]\n')
    human = mailwarden("--config", str(path), "config", "check")
    assert human.returncode == 0, human.stderr
    assert "warning: policyd.checks: greylist runs before access" in human.stderr
    as_json = mailwarden("--config", str(path), "config", "check", "--json")
    report = json.loads(as_json.stdout)
    assert as_json.returncode == 0 and report["ok"] is True
    assert any("greylist runs before access" in w for w in report["warnings"])


@pytest.mark.parametrize(("checks", "warning"), [
    (["recipients", "greylist"], None),
    (["greylist", "recipients"], "greylist runs before recipients"),
    (["quota", "recipients"], "quota runs before recipients"),
    (["blocklist", "access"], "blocklist runs before access"),
    (["greylist", "dnsbl"], "greylist runs before dnsbl"),
    (["access", "blocklist", "ratelimit", "dnsbl", "spf", "recipients", "quota", "greylist"], None),
])
def test_self_defeating_check_orders_are_warned_about(tmp_path, checks, warning):
    from policyd.preflight import order_warnings

    text = f'[policyd]\nchecks = {json.dumps(checks)}\n[policyd.recipients.file]\npaths = ["{tmp_path}/map"]\n'
    settings = load_config(write(tmp_path, text)).section("policyd")
    found = order_warnings(settings)
    if warning is None:
        assert found == []
    else:
        assert any(warning in problem.message for problem in found), found
        assert all(problem.key == ("policyd", "checks") for problem in found)


@pytest.mark.parametrize("url", ["redis://127.0.0.1:99999/0", "redis://127.0.0.1:0/0", "redis://127.0.0.1:sixty/0",
                                 "redis://127.0.0.1:6379/zero", "redis://127.0.0.1:6379/-1",
                                 "unix:///run/redis.sock?db=x"])
def test_bad_redis_port_or_database_is_refused(tmp_path, url):
    with pytest.raises(ConfigError, match=r"redis\.url: .*(port|database)"):
        load_config(write(tmp_path, f'[redis]\nurl = "{url}"\n'))


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "redis://:pw@[::1]:6380/15", "redis://localhost",
                                 "unix:///run/redis/redis.sock?db=2", "unix:///run/redis/redis.sock"])
def test_good_redis_urls_pass(tmp_path, url):
    assert load_config(write(tmp_path, f'[redis]\nurl = "{url}"\n')).section("redis").url == url


@pytest.mark.parametrize("listen", [":9745", "9745", "localhost", "127.0.0.1:", "127.0.0.1:70000"])
def test_metrics_listen_needs_host_and_port(tmp_path, listen):
    with pytest.raises(ConfigError, match=r"metrics\.listen: .*HOST:PORT"):
        load_config(write(tmp_path, f'[metrics]\nlisten = "{listen}"\n'))


def test_empty_check_list_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"policyd\.checks: at least one check"):
        load_config(write(tmp_path, "[policyd]\nchecks = []\n"))


# -- drop-ins -----------------------------------------------------------------------------------------


def test_an_error_set_in_a_dropin_names_the_dropin(tmp_path):
    path = write(tmp_path, '[policyd.greylist]\ndelay = "5m"\n[redis]\nurl = "redis://127.0.0.1:6379/0"\n')
    dropins = tmp_path / "mailwarden.d"
    dropins.mkdir()
    site = dropins / "10-site.toml"
    site.write_text('[policyd.greylist]\ndelay = "five"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(err.value).startswith(f"{site}: invalid configuration (1 problem(s)):\n  policyd.greylist.delay:")
    site.write_text('[policyd.greylist]\ndelay = "3d"\n')  # a model-level error caused by the drop-in's value
    with pytest.raises(ConfigError, match=re.escape(f"{site}: invalid configuration")):
        load_config(path)
    site.write_text("[policyd.greylist\n")
    with pytest.raises(ConfigError, match=re.escape(f"{site}: not valid TOML")):
        load_config(path)


def test_errors_in_main_file_and_dropin_are_each_named(tmp_path):
    path = write(tmp_path, '[policyd]\nlisten = ["nowhere"]\n')
    (tmp_path / "mailwarden.d").mkdir()
    (tmp_path / "mailwarden.d" / "20-x.toml").write_text('[metrics]\nlisten = "9745"\n')
    with pytest.raises(ConfigError) as err:
        load_config(path)
    text = str(err.value)
    assert f"{path}: invalid configuration (1 problem(s)):\n  policyd.listen" in text
    assert f"{tmp_path / 'mailwarden.d' / '20-x.toml'}: invalid configuration (1 problem(s)):\n  metrics.listen" in text


def test_dropins_apply_without_the_main_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MAILWARDEN_ROOT", str(tmp_path))
    monkeypatch.delenv("MAILWARDEN_CONFIG", raising=False)
    (tmp_path / "etc/mailwarden/mailwarden.d").mkdir(parents=True)
    dropin = tmp_path / "etc/mailwarden/mailwarden.d" / "10-site.toml"
    dropin.write_text('[policyd.greylist]\ndelay = "1m"\n')
    config = load_config()
    assert config.section("policyd").greylist.delay == 60
    assert config.source is None and config.dropins == (dropin,)


# -- config show ---------------------------------------------------------------------------------------


def test_config_show_masks_secrets_and_has_json(tmp_path):
    path = write(tmp_path, '''
[redis]
url = "redis://:redis-secret@127.0.0.1:6379/0"
sentinel_password = "sentinel-secret"
[policyd.recipients.sql]
url = "mysql+pymysql://mail:sql-secret@db.example.org/mail"
[policyd.recipients.ldap]
servers = ["ldaps://ldap.example.org"]
bind_dn = "cn=mw,dc=example,dc=org"
bind_password = "ldap-secret"
[policyd.greylist.opt_out_sql]
url = "postgresql://u:optout-secret@db/x?sslmode=require"
[phishhook.dovecot]
api_header = "X-API-Key: dovecot-secret"
[phishhook.intake]
tokens = { webmail = "intake-token-secret" }
[phishhook.review]
session_secret = "review-session-secret-0123456789abcdef"
accounts = { sam = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$hash-secret" }
[phishhook.actions]
run = [{ type = "webhook", url = "https://soc.example.org/hook", headers = { Authorization = "Bearer hook-secret" } }]
''')
    human = mailwarden("--config", str(path), "config", "show")
    as_json = mailwarden("--config", str(path), "config", "show", "--json")
    for result in (human, as_json):
        assert result.returncode == 0, result.stderr
        assert "-secret" not in result.stdout
    data = json.loads(as_json.stdout)
    assert data["redis"]["url"] == "redis://:***@127.0.0.1:6379/0"
    assert data["redis"]["sentinel_password"] == "***"
    assert data["policyd"]["recipients"]["sql"]["url"] == "mysql+pymysql://mail:***@db.example.org/mail"
    assert data["policyd"]["recipients"]["ldap"]["bind_password"] == "***"
    assert data["policyd"]["recipients"]["ldap"]["bind_dn"] == "cn=mw,dc=example,dc=org"
    assert "[policyd.greylist]" in human.stdout and 'url = "redis://:***@127.0.0.1:6379/0"' in human.stdout
    assert data["phishhook"]["intake"]["tokens"] == {"webmail": "***"}
    assert data["phishhook"]["review"]["accounts"] == {"sam": "***"}
    assert data["phishhook"]["actions"]["run"][0]["headers"] == {"Authorization": "***"}


# -- templates ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("section", "key", "text"), [
    ("policyd.ratelimit.notify", "user_text", "You sent more than {limt} messages.\\nStop.\\n"),
    ("policyd.ratelimit.notify", "user_subject", "Limit {nam}"),
    ("policyd.ratelimit.notify", "admin_subject", "Limit {name} reached by {user}"),
    ("policyd.ratelimit.notify", "admin_text", "{key} hit {0}\\n"),
    ("policyd.quota.notify", "text", "Mailbox {mailbox} full; {used} used\\n"),
    ("policyd.quota.notify", "subject", "Your mailbox {mbox} is full"),
    ("policyd.ratelimit", "hold_text", "held {name} {limt}"),
])
def test_notice_templates_with_unknown_placeholders_are_refused(tmp_path, section, key, text):
    with pytest.raises(ConfigError, match=rf"{re.escape(section)}\.{key}: unknown placeholder"):
        load_config(write(tmp_path, f'[{section}]\n{key} = "{text}"\n'))


def test_notice_templates_may_span_lines_and_use_every_field(tmp_path):
    config = load_config(write(tmp_path, '''
[policyd.ratelimit.notify]
user_text = "{name} {key} {max} {count} {window} {done}\\nsecond line\\n"
admin_subject = "{name} by {key}"
[policyd.quota.notify]
subject = "{mailbox} is full"
text = "{mailbox}\\nis full\\n"
'''))
    assert config.section("policyd").quota.notify.subject == "{mailbox} is full"


def test_quota_notice_subject_is_a_template_too(monkeypatch):
    import asyncio

    from policyd import quota
    from policyd.quota import QuotaSettings

    sent: list = []
    monkeypatch.setattr(quota, "send_later", lambda relay, messages, what, **context: sent.extend(messages))

    class FirstNotice:
        async def ask(self, *args: object) -> bool:
            return True

    settings = QuotaSettings(notify={"relay": "127.0.0.1:25", "subject": "{mailbox} is full"})
    check = quota.QuotaCheck(settings, redis_pipe=FirstNotice(), prefix="t:")  # type: ignore[arg-type]
    asyncio.run(check._notify("alice@example.org"))
    assert sent[0]["Subject"] == "alice@example.org is full"
    assert "Your mailbox alice@example.org is full" in sent[0].get_content()


def test_a_validation_error_does_not_echo_a_secret(tmp_path):
    path = write(tmp_path, '[redis]\nurl = "redis://:s3cret@127.0.0.1:99999/0"\n'
                           '[policyd.recipients.ldap]\nbind_password = 5\n')
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    report = str(raised.value)
    assert "redis.url: the port must be a number from 1 to 65535 (got 'redis://:***@127.0.0.1:99999/0')" in report
    assert "policyd.recipients.ldap.bind_password" in report
    assert "s3cret" not in report and "(got 5)" not in report
