"""The config file: validated once, errors name the file, the key and what is allowed."""

from __future__ import annotations

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
    monkeypatch.setattr("mailwarden.config.DEFAULT_PATH", tmp_path / "absent.toml")
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
