"""What an operator touches: the block-list CLI (for people and --json), metrics, syslog."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.request

from conftest import base_settings
from harness.net import free_port, wait_for
from harness.policyd_proc import render_toml


def cli(config_path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config_path), *args],
                          capture_output=True, text=True, timeout=30)


def test_block_cli_for_people_and_scripts(tmp_path, redis_server):
    config = tmp_path / "mw.toml"
    config.write_text(render_toml(base_settings(redis_server.url)))
    added = cli(config, "block", "add", "--user", "Mallory@Example.org", "--reason", "geo-velocity", "--json")
    assert added.returncode == 0, added.stderr
    assert json.loads(added.stdout)["value"] == "mallory@example.org"
    blocked = cli(config, "block", "add", "--client", "203.0.113.9", "--reason", "spam run", "--expires", "12h")
    assert blocked.returncode == 0
    listed = json.loads(cli(config, "block", "list", "--json").stdout)
    assert [(e["kind"], e["value"], e["reason"]) for e in listed] == [
        ("client", "203.0.113.9", "spam run"), ("user", "mallory@example.org", "geo-velocity")]
    client_entry = listed[0]
    assert 43000 < client_entry["expires_in"] <= 43200 and listed[1]["expires_in"] is None
    human = cli(config, "block", "list").stdout
    assert "mallory@example.org" in human and "expires never: geo-velocity" in human
    removed = cli(config, "block", "remove", "--user", "mallory@example.org", "--json")
    assert removed.returncode == 0 and json.loads(removed.stdout)["removed"] is True
    again = cli(config, "block", "remove", "--user", "mallory@example.org")
    assert again.returncode == 1 and "was not blocked" in again.stderr


def test_block_cli_errors_are_clear(tmp_path, redis_server):
    config = tmp_path / "mw.toml"
    config.write_text(render_toml(base_settings(redis_server.url)))
    bad_ip = cli(config, "block", "add", "--client", "not-an-ip", "--reason", "x")
    assert bad_ip.returncode == 2 and "does not appear to be an IPv4 or IPv6 address" in bad_ip.stderr
    both = cli(config, "block", "add", "--client", "192.0.2.1", "--user", "a", "--reason", "x")
    assert both.returncode == 2 and "exactly one of --user or --client" in both.stderr
    config.write_text(render_toml(base_settings(f"redis://127.0.0.1:{free_port()}/0")))
    down = cli(config, "block", "list")
    assert down.returncode == 69 and "cannot reach Redis" in down.stderr


def test_metrics_count_decisions_and_fail_modes(policyd_factory, own_redis):
    port = free_port()
    settings = base_settings(own_redis.url, check_histograms=True)
    settings["metrics"] = {"listen": f"127.0.0.1:{port}"}
    daemon = policyd_factory(settings)
    with daemon.connect() as client:
        assert client.ask().startswith("DEFER_IF_PERMIT")
        own_redis.stop()
        assert client.ask(sender="x@example.org") == "DUNNO"

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    text = wait_for(lambda: (t := scrape()) and "fail_mode_total" in t and t, 10, what="metrics")
    assert 'mailwarden_policyd_decisions_total{action="defer",check="greylist"} 1.0' in text
    assert 'mailwarden_policyd_backend_errors_total{backend="redis",check="greylist"}' in text
    assert 'mailwarden_policyd_fail_mode_total{backend="redis",mode="fail_open"}' in text
    assert "mailwarden_policyd_decision_seconds_bucket" in text
    assert 'mailwarden_policyd_check_seconds_count{check="greylist"} 2.0' in text
    assert "mailwarden_redis_connected 0.0" in text


def test_decisions_go_to_syslog_when_configured(policyd_factory, redis_server, tmp_path):
    path = tmp_path / "log.sock"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(10)
    settings = base_settings(redis_server.url)
    settings["logging"] = {"destination": "syslog", "syslog_socket": str(path)}
    daemon = policyd_factory(settings)
    with daemon.connect() as client:
        assert client.ask(queue_id="4F2A1210C4E").startswith("DEFER_IF_PERMIT")
    lines = []
    while not any(b"event=decision" in line for line in lines):
        lines.append(receiver.recv(65536))
    decision = next(line for line in lines if b"event=decision" in line).decode()
    assert decision.startswith("<")  # a syslog priority
    assert "]: level=info event=decision service=policyd stage=rcpt queue_id=4F2A1210C4E " in decision
    assert decision.split(">", 1)[1].startswith("mailwarden[")
    assert "queue_id=4F2A1210C4E" in decision and "action=defer" in decision
    receiver.close()
