"""A postmaster's first hour: start-up failures in one line with a documented exit code, and SIGHUP
re-reading the config file (what can change applies at once, the rest waits for a restart, a broken
file keeps the config in use)."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import base_settings
from harness.net import free_port, wait_for
from harness.policyd_proc import render_toml

EX_UNAVAILABLE = 69
EX_SOFTWARE = 70
EX_CONFIG = 78


@pytest.fixture
def occupied_port() -> Iterator[int]:
    """A TCP port some other program listens on (what Debian's postgrey does to 10023)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=60)


def failure_lines(stderr: str) -> list[str]:
    """The lines the CLI itself printed (``mailwarden: ...``), not the daemon's log lines."""
    return [line for line in stderr.splitlines() if line.startswith("mailwarden: ")]


def test_policyd_port_in_use_is_one_line_and_exit_69(tmp_path, redis_server, occupied_port):
    config = tmp_path / "mw.toml"
    config.write_text(render_toml(base_settings(redis_server.url)))
    result = run_cli(config, "policyd", "--listen", f"127.0.0.1:{occupied_port}")
    assert result.returncode == EX_UNAVAILABLE, result.stderr
    assert "Traceback" not in result.stderr
    [line] = failure_lines(result.stderr)
    assert f"cannot listen on 127.0.0.1:{occupied_port}" in line
    assert "address already in use" in line and "another policyd" in line


def test_metrics_port_in_use_says_it_is_the_metrics_listener(tmp_path, redis_server, occupied_port):
    settings = base_settings(redis_server.url, listen=[f"127.0.0.1:{free_port()}"])
    settings["metrics"] = {"listen": f"127.0.0.1:{occupied_port}"}
    config = tmp_path / "mw.toml"
    config.write_text(render_toml(settings))
    result = run_cli(config, "policyd")
    assert result.returncode == EX_UNAVAILABLE, result.stderr
    assert "Traceback" not in result.stderr
    [line] = failure_lines(result.stderr)
    assert f"cannot listen on 127.0.0.1:{occupied_port}" in line and "metrics" in line
    assert "address already in use" in line


def test_unix_socket_in_a_missing_directory_is_bad_config(tmp_path, redis_server):
    config = tmp_path / "mw.toml"
    config.write_text(render_toml(base_settings(redis_server.url)))
    missing = tmp_path / "no-such-dir" / "policyd.sock"
    result = run_cli(config, "policyd", "--listen", f"unix:{missing}")
    assert result.returncode == EX_CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    [line] = failure_lines(result.stderr)
    assert f"cannot listen on unix:{missing}" in line and "does not exist" in line


def test_redis_url_with_a_bad_port_is_bad_config(tmp_path):
    config = tmp_path / "mw.toml"
    config.write_text(render_toml(base_settings("redis://127.0.0.1:notaport/0")))
    result = run_cli(config, "policyd")
    assert result.returncode == EX_CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    assert "redis.url" in result.stderr


def test_an_unexpected_error_at_start_up_is_one_line_and_exit_70(capsys):
    from mailwarden.cli import startup_errors

    with pytest.raises(SystemExit) as exited, startup_errors():
        raise RuntimeError("the flux capacitor is missing")
    assert exited.value.code == EX_SOFTWARE
    err = capsys.readouterr().err
    assert err.strip() == "mailwarden: cannot start: RuntimeError: the flux capacitor is missing"


def greylist_settings(redis_url: str, text: str, **policyd: object) -> dict:
    return base_settings(redis_url, checks=["greylist"], greylist={"text": text, "whitelist_clients": []},
                         **policyd)


def test_sighup_rereads_the_config_file_and_keeps_it_when_broken(policyd_factory, redis_server):
    daemon = policyd_factory(greylist_settings(redis_server.url, "Old text, come back in {retry_in}"))
    assert daemon.proc is not None
    pid = daemon.proc.pid
    original = daemon.config_path.read_text()
    with daemon.connect() as client:
        assert "Old text, come back in" in client.ask()

        # a new reply text applies at once; a listener change waits for a restart and keeps its old value
        changed = original.replace("Old text", "New text").replace("[policyd]\n", "[policyd]\nmax_connections = 7\n")
        daemon.config_path.write_text(changed)
        daemon.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "New text, come back in" in (client.ask() or ""), 10, what="the new defer text")
        log = daemon.wait_log("SIGHUP: these keys need a restart: policyd.max_connections")
        assert "listen" not in log.split("need a restart:")[1].splitlines()[0]

        # a file that is not TOML: the config in use stays, the log names the file
        daemon.config_path.write_text(original.replace('{retry_in}"', "{retry_in}"))  # an unterminated string
        daemon.proc.send_signal(signal.SIGHUP)
        line = wait_for(lambda: _log_line(daemon.log_text(), "SIGHUP: config not reloaded", 1), 10,
                        what="the first refusal")
        assert str(daemon.config_path) in str(line) and "not valid TOML" in str(line)
        assert "New text, come back in" in (client.ask() or "")

        # a validation error: the log names the file and the key
        daemon.config_path.write_text(original.replace("[policyd.greylist]\n", "[policyd.greylist]\ndealy = 5\n"))
        daemon.proc.send_signal(signal.SIGHUP)
        line = wait_for(lambda: _log_line(daemon.log_text(), "SIGHUP: config not reloaded", 2), 10,
                        what="the second refusal")
        assert str(daemon.config_path) in str(line) and "policyd.greylist.dealy: unknown key" in str(line)
        assert "New text, come back in" in (client.ask() or "")

    assert daemon.proc.poll() is None and daemon.proc.pid == pid
    log = daemon.log_text()
    assert log.count("msg=ready") == 1 and f"pid={pid}" in log
    assert "Traceback" not in log


def _log_line(log: str, text: str, number: int) -> str | None:
    """The ``number``-th log line containing ``text`` (1-based), or None while there are fewer."""
    lines = [line for line in log.splitlines() if text in line]
    return lines[number - 1] if len(lines) >= number else None


def test_systemd_unit_reloads_with_sighup():
    unit = Path(__file__).parent.parent / "systemd" / "mailwarden-policyd.service"
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit.read_text()


@pytest.fixture
def mailwarden_log(caplog) -> Iterator[pytest.LogCaptureFixture]:
    """caplog for the ``mailwarden`` logger even when an earlier test's setup_logging stopped propagation."""
    logger = logging.getLogger("mailwarden")
    level = logger.level
    logger.addHandler(caplog.handler)
    logger.setLevel(logging.INFO)
    yield caplog
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)


def test_reloader_keeps_restart_keys_and_applies_the_rest(tmp_path, mailwarden_log):
    from mailwarden.config import load_config
    from mailwarden.reload import ConfigReloader

    path = tmp_path / "mw.toml"
    path.write_text(render_toml(greylist_settings("redis://127.0.0.1:6379/0", "Old {retry_in}")))
    reloader = ConfigReloader(load_config(path), lambda: load_config(path), ["policyd.listen"])
    changed = greylist_settings("redis://127.0.0.1:6380/1", "New {retry_in}", listen=["127.0.0.1:10099"])
    changed["logging"] = {"level": "debug"}
    changed["metrics"] = {"listen": "127.0.0.1:9999"}
    path.write_text(render_toml(changed))
    config = reloader.reread()
    assert config is not None
    settings = config.settings
    assert settings.policyd.greylist.text == "New {retry_in}" and settings.logging.level == "debug"
    assert settings.redis.url == "redis://127.0.0.1:6379/0" and settings.policyd.listen == ["127.0.0.1:10023"]
    assert settings.metrics.listen is None
    assert ("SIGHUP: these keys need a restart: redis.url, metrics.listen, policyd.listen; "
            "they keep their old values until then") in mailwarden_log.messages

    path.write_text("[policyd.greylist]\ntext = 42\n")
    assert reloader.reread() is None and reloader.current is config  # nothing changes
    assert any(f"{path}: invalid configuration" in str(r.__dict__.get("kv")) for r in mailwarden_log.records)


def test_reloaded_config_still_knows_which_drop_in_set_a_key(tmp_path):
    from mailwarden.config import load_config
    from mailwarden.reload import ConfigReloader

    path = tmp_path / "mw.toml"
    path.write_text(render_toml(greylist_settings("redis://127.0.0.1:6379/0", "Old {retry_in}")))
    dropin = tmp_path / "mw.d" / "50-site.toml"
    dropin.parent.mkdir()
    dropin.write_text("[policyd.greylist]\ntext = \"Site {retry_in}\"\n")
    reloader = ConfigReloader(load_config(path), lambda: load_config(path))
    config = reloader.reread()
    assert config is not None and config.settings.policyd.greylist.text == "Site {retry_in}"
    assert config.where(("policyd", "greylist", "text")) == str(dropin)
