"""phishhook's configuration as a postmaster meets it: ``config check`` names every file and key start-up
would refuse (a missing or corrupt geo database, a broken relay file, a password where a hash belongs), and
the service refuses to start on them with exit 78 and the same words; with ``on_error = "alert-only"`` a
broken database is a warning and every snag is alert-only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from harness.net import free_port
from harness.policyd_proc import render_toml
from harness.redis_server import RedisProcess
from phish_places import BROKEN_NODES_DB, CITY_TEST_DB, COUNTRY_TEST_DB, TEST_CHANGCHUN, TEST_MILTON

EX_CONFIG = 78


def write(tmp_path: Path, settings: dict) -> Path:
    path = tmp_path / "mailwarden.toml"
    path.write_text(render_toml(settings))
    return path


def run(config: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout)


def base(tmp_path: Path, redis_url: str = "redis://127.0.0.1:1/0", **phishhook: object) -> dict:
    return {"redis": {"url": redis_url, "key_prefix": "phcfg:"},
            "quarantine": {"database_url": f"sqlite:///{tmp_path / 'q.sqlite'}", "message_dir": str(tmp_path / "held")},
            "phishhook": {"listen": f"127.0.0.1:{free_port()}", **phishhook}}


@pytest.mark.parametrize(("database", "words"), [
    ("missing.mmdb", "does not exist"),
    (str(BROKEN_NODES_DB), "GeoIP2-City-Test-Invalid-Node-Count.mmdb"),
    (str(COUNTRY_TEST_DB), "City"),
])
def test_a_bad_geo_database_is_named_by_config_check_and_refused_at_start(tmp_path: Path, database: str,
                                                                           words: str) -> None:
    path = database if database.startswith("/") else str(tmp_path / database)
    config = write(tmp_path, base(tmp_path, geo={"city_database": path}))
    checked = run(config, "config", "check", "--for", "phishhook")
    assert checked.returncode == EX_CONFIG, checked
    assert "phishhook.geo" in checked.stderr and words in checked.stderr and str(config) in checked.stderr
    started = run(config, "phish", "serve", timeout=60)
    assert started.returncode == EX_CONFIG, started
    assert words in started.stderr and "city_database" in started.stderr


def test_alert_only_starts_on_a_broken_database_and_locates_nothing(tmp_path: Path,
                                                                      redis_server: RedisProcess) -> None:
    broken = tmp_path / "City.mmdb"
    broken.write_bytes(b"not a maxmind database at all" * 100)
    config = write(tmp_path, base(tmp_path, redis_server.url, geo={"city_database": str(broken),
                                                                   "on_error": "alert-only"},
                                  history={"learning_period": "0s"}))
    checked = run(config, "config", "check", "--for", "phishhook")
    assert checked.returncode == 0 and "warning" in checked.stderr and "alert-only" in checked.stderr, checked
    assert run(config, "quarantine", "migrate").returncode == 0
    judged = run(config, "phish", "login", "--user", "zoe", "--address", TEST_MILTON, "--json")
    assert judged.returncode == 0, judged
    assert json.loads(judged.stdout)["place"] is None  # no lookups: nothing located, nothing compared


def test_geo_velocity_with_maxminds_test_database(tmp_path: Path, redis_server: RedisProcess) -> None:
    """The small City test database in the fixtures: Milton (US) then Changchun (CN) an hour later."""
    config = write(tmp_path, base(tmp_path, redis_server.url, geo={"city_database": str(CITY_TEST_DB)},
                                  history={"learning_period": "0s"}))
    assert run(config, "quarantine", "migrate").returncode == 0
    assert run(config, "phish", "login", "--user", "yan", "--address", TEST_MILTON, "--at", "1h").returncode == 0
    judged = json.loads(run(config, "phish", "login", "--user", "yan", "--address", TEST_CHANGCHUN, "--json").stdout)
    assert judged["snag"] and judged["place"] == "Changchun, CN", judged
    [snag] = json.loads(run(config, "phish", "list", "--json").stdout)
    assert snag["user"] == "yan" and snag["state"] == "open"


def test_config_check_names_a_password_where_a_hash_belongs_and_a_shared_listener(tmp_path: Path) -> None:
    settings = base(tmp_path)
    settings["phishhook"]["review"] = {"listen": settings["phishhook"]["listen"], "accounts": {"bob": "hunter2"}}
    checked = run(write(tmp_path, settings), "config", "check", "--for", "phishhook")
    assert checked.returncode == EX_CONFIG
    assert "phishhook.review.accounts.bob: not an argon2 hash" in checked.stderr
    assert "phishhook.review.listen: the same address" in checked.stderr
    assert "hunter2" not in checked.stderr


def test_a_broken_site_relay_file_is_named(tmp_path: Path) -> None:
    relays = tmp_path / "relays.toml"
    relays.write_text('[[group]]\nname = "vpn"\ndescription = ""\nsource = ""\nnetworks = ["10.0.0.0/33"]\n')
    checked = run(write(tmp_path, base(tmp_path, networks={"relay_file": str(relays)})), "config", "check")
    assert checked.returncode == EX_CONFIG and str(relays) in checked.stderr and "10.0.0.0/33" in checked.stderr
