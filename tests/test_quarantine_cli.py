"""``mailwarden quarantine`` as the postmaster runs it (a subprocess): list, show, release, delete, purge,
migrate, with --json, and the documented exit codes: 1 nothing matched, 2 bad usage, 69 store or listener
unreachable, never a traceback."""

from __future__ import annotations

import datetime
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from harness.net import free_port
from harness.policyd_proc import render_toml
from harness.sink import Sink

from quarantine.store import HeldEnvelope, Hold, QuarantineSettings, QuarantineStore

RAW = b"From: sender@example.org\r\nSubject: held\r\n\r\n.hello\r\n"


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "quarantine", *args],
                          capture_output=True, timeout=60, env={**os.environ, "TZ": "UTC"})


def out(result: subprocess.CompletedProcess[bytes]) -> object:
    return json.loads(result.stdout)


def write_config(tmp_path: Path, **quarantine: object) -> Path:
    path = tmp_path / "mw.toml"
    path.write_text(render_toml({"quarantine": quarantine}))
    return path


@pytest.fixture
def setup(tmp_path: Path, sink: Sink) -> tuple[Path, QuarantineSettings]:
    quarantine = {"database_url": f"sqlite:///{tmp_path / 'q.sqlite'}", "message_dir": str(tmp_path / "m"),
                  "inline_max_size": "1KB", "reinject": f"127.0.0.1:{sink.port}"}
    return write_config(tmp_path, **quarantine), QuarantineSettings(**quarantine)  # type: ignore[arg-type]


def hold(settings: QuarantineSettings, recipients: tuple[str, ...], kind: str = "banned",
         sender: str = "sender@example.org", raw: bytes = RAW, subject: str = "held") -> list[str]:
    store = QuarantineStore(settings)
    try:
        envelope = HeldEnvelope("4ZbQ000", sender, "192.0.2.10", "", "sender@example.org", subject, "",
                                datetime.datetime.now(datetime.UTC))
        return store.hold(io.BytesIO(raw), len(raw), envelope,
                          [Hold(r, r, "clamav" if kind == "virus" else "banned", kind, "why") for r in recipients])
    finally:
        store.close()


def test_migrate_then_list_show_release_delete_purge(setup, sink) -> None:
    config, settings = setup
    unmigrated = cli(config, "list", "--json")
    assert unmigrated.returncode == 69 and "quarantine migrate" in out(unmigrated)["error"]  # type: ignore[index]
    migrated = cli(config, "migrate", "--json")
    assert migrated.returncode == 0 and out(migrated)["before"] is None  # type: ignore[index]
    assert b"already at revision" in cli(config, "migrate").stdout

    empty = cli(config, "list", "--json")
    assert empty.returncode == 1 and out(empty) == {"ok": False, "error": "no quarantined message matches"}

    alice, bob = hold(settings, ("alice@example.test", "bob@example.test"))
    [virus] = hold(settings, ("alice@example.test",), kind="virus", sender="worm@bad.example")
    listed = cli(config, "list", "--mailbox", "alice@example.test", "--json")
    assert listed.returncode == 0
    assert [row["public_id"] for row in out(listed)] == [virus, alice]  # type: ignore[union-attr]
    assert [row["public_id"] for row in out(cli(config, "list", "--kind", "virus", "--json"))] == [virus]  # type: ignore[union-attr]
    assert [row["public_id"] for row in out(cli(config, "list", "--sender", "worm@bad.example", "--json"))] == [virus]  # type: ignore[union-attr]
    assert len(out(cli(config, "list", "--since", "1h", "--limit", "2", "--json"))) == 2  # type: ignore[arg-type]
    assert cli(config, "list", "--until", "1h").returncode == 1
    human = cli(config, "list", "--recipient", "bob@example.test")
    assert human.returncode == 0 and bob.encode() in human.stdout and alice.encode() not in human.stdout

    shown = cli(config, "show", alice, "--json")
    assert out(shown)["recipient"] == "alice@example.test" and out(shown)["state"] == "held"  # type: ignore[index]
    assert cli(config, "show", alice, "--raw").stdout == RAW
    assert cli(config, "show", "nosuchid").returncode == 1

    released = cli(config, "release", alice, "--by", "helpdesk", "--json")
    assert released.returncode == 0, released.stderr
    assert out(released)["ok"] is True  # type: ignore[index]
    [got] = sink.wait_for(1)
    assert got.data == RAW and got.rcpt_tos == ("alice@example.test",) and got.mail_from == "sender@example.org"
    state = out(cli(config, "show", alice, "--json"))
    assert (state["state"], state["state_by"]) == ("released", "helpdesk")  # type: ignore[index]
    again = cli(config, "release", alice)
    assert again.returncode == 1 and b"not held" in again.stderr

    refused = cli(config, "release", virus, "--json")
    assert refused.returncode == 1 and "--admin" in out(refused)["error"]  # type: ignore[index]
    assert cli(config, "release", virus, "--admin", "--by", "postmaster").returncode == 0
    assert len(sink.wait_for(2)) == 2

    deleted = cli(config, "delete", bob, "nosuchid", "--json")
    assert deleted.returncode == 1  # one of the two failed
    results = out(deleted)["results"]  # type: ignore[index]
    assert [r["ok"] for r in results] == [True, False]
    assert out(cli(config, "show", bob, "--json"))["state"] == "deleted"  # type: ignore[index]

    # the default retention (30d): nothing that young expires; the bytes nobody holds any more go (the
    # message of alice and bob, released to one and deleted by the other, and the released virus)
    kept = cli(config, "purge", "--json")
    assert kept.returncode == 0 and out(kept)["expired"] == 0 and out(kept)["raw_removed"] == 2  # type: ignore[index]
    purged = cli(config, "purge", "--older-than", "0s", "--json")
    assert purged.returncode == 0 and out(purged)["forgotten"] == 3  # type: ignore[index]


def test_the_login_name_is_recorded_by_default(setup, sink) -> None:
    config, settings = setup
    assert cli(config, "migrate").returncode == 0
    [public_id] = hold(settings, ("alice@example.test",))
    assert cli(config, "delete", public_id).returncode == 0
    state_by = out(cli(config, "show", public_id, "--json"))["state_by"]  # type: ignore[index]
    assert state_by and state_by != "banned"


def test_bad_usage_exits_2(setup) -> None:
    config, _settings = setup
    assert cli(config, "migrate").returncode == 0
    for args in (["list", "--since", "yesterday"], ["list", "--limit", "0"], ["list", "--state", "lost"],
                 ["purge", "--older-than", "soon"], ["release"], ["show", "x", "--raw", "--json"]):
        result = cli(config, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert b"Traceback" not in result.stderr


def test_unreachable_store_exits_69_in_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    config = write_config(tmp_path, database_url=f"sqlite:///{blocker / 'q.sqlite'}")
    for args in (["list"], ["migrate"], ["purge"], ["release", "someid"]):
        result = cli(config, *args)
        assert result.returncode == 69, (args, result.stderr)
        assert b"Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert b"blocker" in result.stderr


def test_stopped_mariadb_exits_69(mariadb, tmp_path: Path) -> None:
    url = mariadb.create_database("quarantine_cli", drop=True)
    config = write_config(tmp_path, database_url=url, db_timeout="2s")
    assert cli(config, "migrate").returncode == 0
    mariadb.stop()
    try:
        result = cli(config, "list", "--json")
        assert result.returncode == 69 and "check that it is running" in out(result)["error"]  # type: ignore[index]
    finally:
        mariadb.start()
    assert cli(config, "list").returncode == 1  # reachable again: nothing held


def test_unreachable_listener_exits_69_and_keeps_it_held(tmp_path: Path) -> None:
    quarantine = {"database_url": f"sqlite:///{tmp_path / 'q.sqlite'}", "reinject": f"127.0.0.1:{free_port()}",
                  "message_dir": str(tmp_path / "m")}
    config = write_config(tmp_path, **quarantine)
    assert cli(config, "migrate").returncode == 0
    [public_id] = hold(QuarantineSettings(**quarantine), ("alice@example.test",))  # type: ignore[arg-type]
    result = cli(config, "release", public_id)
    assert result.returncode == 69 and b"stays held" in result.stderr
    assert out(cli(config, "show", public_id, "--json"))["state"] == "held"  # type: ignore[index]


def test_config_check_warns_of_an_unusable_message_dir(tmp_path: Path) -> None:
    """A warning (exit 0): config check is also policyd's start check, and a site without a quarantine
    must not be refused for it."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    config = write_config(tmp_path, message_dir=str(blocker / "messages"),
                          database_url=f"sqlite:///{tmp_path / 'q.sqlite'}")
    result = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "config", "check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "quarantine.message_dir" in result.stderr and "not a directory" in result.stderr
    assert "cannot be held" in result.stderr


def test_hostile_headers_cannot_drive_the_terminal(setup) -> None:
    config, settings = setup
    assert cli(config, "migrate").returncode == 0
    [public_id] = hold(settings, ("alice@example.test",), subject="\x1b]0;owned\x07\x1b[2J invoice",
                       sender="x\x1b[31m@example.org")
    for args in (["list"], ["show", public_id]):
        result = cli(config, *args)
        assert result.returncode == 0 and b"\x1b" not in result.stdout and b"\x07" not in result.stdout
        assert b"invoice" in result.stdout and b"\\x1b" in result.stdout  # shown as an escape
    raw_json = json.loads(cli(config, "show", public_id, "--json").stdout)
    assert raw_json["subject"].startswith("\x1b]0;")  # JSON keeps the value (escaped by JSON itself)


def test_config_check_refuses_a_catalogue_the_milters_would_refuse(tmp_path: Path) -> None:
    """A catalogue at a revision this version cannot use stops the milters at start-up: config check says
    so first (exit 78, naming the key and the fix); policyd's own check (--for policyd) is not held up."""
    database = tmp_path / "q.sqlite"
    config = write_config(tmp_path, database_url=f"sqlite:///{database}", message_dir=str(tmp_path / "m"))

    def check(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "config", "check",
                               *args], capture_output=True, text=True, timeout=60)

    fresh = check()
    assert fresh.returncode == 0 and "not created yet" in fresh.stderr and not database.exists()
    assert cli(config, "migrate").returncode == 0
    assert check().returncode == 0
    with sqlite3.connect(database) as conn:
        conn.execute("UPDATE quarantine_alembic_version SET version_num = 'f00dfeed'")
    behind = check()
    assert behind.returncode == 78, behind.stderr
    assert "quarantine.database_url" in behind.stderr and "f00dfeed" in behind.stderr
    assert "milters refuse to start" in behind.stderr
    assert check("--for", "policyd").returncode == 0
    assert check("--for", "milters", "--for", "quarantine").returncode == 78
    assert check("--for", "nonsense").returncode == 2
