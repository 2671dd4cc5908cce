"""Keeping the greylist client whitelist current: whitelist-update from a file or an http(s) URL, atomic
replacement, the daemon picking it up without a restart, and the warning when the list is out of date."""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest
from conftest import base_settings
from harness.net import free_port, wait_for
from harness.policyd_proc import render_toml

OLD_LIST = "# postgrey whitelist\n# postgrey version: 1.37, build date: 2016-09-22\nold.example\n"


def settings(redis_url: str, tmp_path: Path, **greylist) -> dict:
    shipped = tmp_path / "shipped_whitelist"
    shipped.write_text(OLD_LIST)
    return base_settings(redis_url, checks=["greylist"], greylist={
        "whitelist_clients": [str(shipped)], "managed_whitelist": str(tmp_path / "managed" / "whitelist_clients"),
        "whitelist_check_interval": "200ms", **greylist})


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "greylist", *args],
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def config(tmp_path, redis_server):
    path = tmp_path / "mw.toml"
    path.write_text(render_toml(settings(redis_server.url, tmp_path)))
    return path


def test_update_from_a_file_is_atomic_and_dated(config, tmp_path):
    source = tmp_path / "new_list"
    source.write_text("198.51.100.0/24\nmx.partner.example\n/^smtp\\d+\\.bank\\.example$/\n")
    done = cli(config, "whitelist-update", str(source), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["entries"] == 3
    managed = Path(result["file"])
    assert managed.read_text().startswith(f"# mailwarden whitelist-update: updated {result['updated']} from ")
    broken = tmp_path / "broken_list"
    broken.write_text("good.example\n/[broken/\n")
    refused = cli(config, "whitelist-update", str(broken))
    assert refused.returncode == 1 and "bad regular expression" in refused.stderr
    assert "198.51.100.0/24" in managed.read_text()  # the working list was kept
    assert not [p for p in managed.parent.iterdir() if p.name.startswith(".whitelist-")]


def test_update_from_an_http_url(config, tmp_path):
    body = b"203.0.113.0/24\n"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/list" else 404)
            self.end_headers()
            if self.path == "/list":
                self.wfile.write(body)

        def log_message(self, *args):
            pass

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        done = cli(config, "whitelist-update", f"http://127.0.0.1:{port}/list")
        assert done.returncode == 0 and "1 entries" in done.stdout
        missing = cli(config, "whitelist-update", f"http://127.0.0.1:{port}/nothing")
        assert missing.returncode == 1 and "HTTP Error 404" in missing.stderr
    finally:
        server.shutdown()


def test_daemon_picks_up_the_update_and_warns_while_the_list_is_stale(policyd_factory, redis_server, tmp_path):
    metrics_port = free_port()
    config = settings(redis_server.url, tmp_path)
    config["metrics"] = {"listen": f"127.0.0.1:{metrics_port}"}
    daemon = policyd_factory(config)
    log = daemon.wait_log("greylist client whitelist is out of date")
    assert "max_age_days=180" in log

    def gauge(name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                if line.startswith(name + " "):
                    return float(line.split()[1])
        raise AssertionError(name)

    assert gauge("mailwarden_policyd_greylist_whitelist_stale") == 1.0
    with daemon.connect() as client:
        assert client.ask(client_address="198.51.100.7").startswith("DEFER_IF_PERMIT")
        source = tmp_path / "fresh"
        source.write_text("198.51.100.0/24\n")
        assert cli(daemon.config_path, "whitelist-update", str(source)).returncode == 0
        wait_for(lambda: client.ask(client_address="198.51.100.7", sender="n@example.org") == "DUNNO", 10,
                 what="the updated whitelist")
    assert gauge("mailwarden_policyd_greylist_whitelist_stale") == 0.0
    assert gauge("mailwarden_policyd_greylist_whitelist_age_seconds") < 60


def serve_list(body: bytes, headers: dict[str, str]) -> http.server.ThreadingHTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_errors_name_the_source_and_its_line(config, tmp_path):
    broken = tmp_path / "broken_list"
    broken.write_text("# a comment\ngood.example\n/[broken/\n")
    refused = cli(config, "whitelist-update", str(broken), "--json")
    assert refused.returncode == 1
    assert f"{broken}:3: bad regular expression" in json.loads(refused.stdout)["error"]
    server = serve_list(b"192.0.2.0/24\n300.1.2.3/24\n", {})
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/list"
        bad = cli(config, "whitelist-update", url)
        assert bad.returncode == 1 and f"{url}:2: not an address or network: '300.1.2.3/24'" in bad.stderr
    finally:
        server.shutdown()


@pytest.mark.parametrize("scheme", ["ftp", "sftp", "data"])
def test_other_schemes_are_refused_by_name(config, scheme):
    refused = cli(config, "whitelist-update", f"{scheme}://lists.example/whitelist_clients")
    assert refused.returncode == 2
    assert f"{scheme}: scheme not supported; use a file path, file://, http:// or https://" in refused.stderr


def test_file_urls_are_read(config, tmp_path):
    source = tmp_path / "list"
    source.write_text("192.0.2.0/24\n")
    done = cli(config, "whitelist-update", source.as_uri(), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["entries"] == 1


def managed_age_days(result: dict) -> float:
    import time

    from policyd.whitelist import whitelist_date

    dated = whitelist_date(Path(result["file"]))
    assert dated is not None
    return (time.time() - dated) / 86400


def test_an_old_list_stays_stale_after_import_by_its_file_date(config, tmp_path):
    import os

    source = tmp_path / "old_list"
    source.write_text("192.0.2.0/24\n")
    os.utime(source, (1_474_502_400, 1_474_502_400))  # 2016-09-22
    done = cli(config, "whitelist-update", str(source), "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["dated"] == "2016-09-22T00:00:00Z"
    assert "older than policyd.greylist.whitelist_max_age (180d)" in done.stderr
    assert managed_age_days(result) > 3000


def test_an_old_list_stays_stale_after_import_by_its_own_comment(config, tmp_path):
    source = tmp_path / "postgrey_list"
    source.write_text(OLD_LIST)  # "build date: 2016-09-22", the file itself just written
    result = json.loads(cli(config, "whitelist-update", str(source), "--json").stdout)
    assert result["dated"] == "2016-09-22T00:00:00Z" and managed_age_days(result) > 3000


def test_an_old_list_stays_stale_after_import_by_its_last_modified_header(config):
    server = serve_list(b"192.0.2.0/24\n", {"Last-Modified": "Thu, 22 Sep 2016 10:00:00 GMT"})
    try:
        done = cli(config, "whitelist-update", f"http://127.0.0.1:{server.server_address[1]}/list", "--json")
    finally:
        server.shutdown()
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["dated"] == "2016-09-22T10:00:00Z" and managed_age_days(result) > 3000
    fresh = serve_list(b"192.0.2.0/24\n", {})
    try:
        again = json.loads(cli(config, "whitelist-update", f"http://127.0.0.1:{fresh.server_address[1]}/l",
                               "--json").stdout)
    finally:
        fresh.shutdown()
    assert managed_age_days(again) < 1  # no date anywhere: as old as the download
