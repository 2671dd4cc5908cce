"""The suite reads and writes none of the host's mailwarden files: every default system path (config file
and drop-ins, /etc/mailwarden/rules, the managed whitelist) is under the session's private root
(conftest.private_system_root sets $MAILWARDEN_ROOT for this process and every daemon and CLI it starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import SYSTEM_DIRS, base_settings
from harness.policyd_proc import PolicydProcess
from pydantic import BaseModel

from mailwarden.config import load_config
from policyd.greylist import GreylistSettings


def system_paths_in(value: object) -> list[str]:
    """Every path (or path-like string) in a settings tree that lies under the host's mailwarden dirs."""
    if isinstance(value, BaseModel):
        return [found for name in type(value).model_fields for found in system_paths_in(getattr(value, name))]
    if isinstance(value, dict):
        return [found for item in value.values() for found in system_paths_in(item)]
    if isinstance(value, list | tuple):
        return [found for item in value for found in system_paths_in(item)]
    if isinstance(value, Path | str):
        return [str(value)] if any(str(value).startswith(str(directory)) for directory in SYSTEM_DIRS) else []
    return []


def test_the_harness_policyd_config_names_no_system_path(tmp_path, private_system_root):
    config_path = PolicydProcess(tmp_path, base_settings("redis://127.0.0.1:6399/0")).write_config()
    text = config_path.read_text()
    assert not [directory for directory in SYSTEM_DIRS if str(directory) in text], text
    config = load_config(config_path)  # with the defaults the daemon would fill in
    assert system_paths_in(config.settings) == []
    assert config.section("policyd").greylist.managed_whitelist == \
        private_system_root / "var/lib/mailwarden/whitelist_clients"


def test_in_process_defaults_name_no_system_path(private_system_root):
    assert system_paths_in(GreylistSettings()) == []
    config = load_config()  # no --config: the default file, under the private root (absent)
    assert config.source is None and config.dropins == ()
    assert system_paths_in(config.settings) == []


def test_a_cli_without_config_reads_the_default_file_under_mailwarden_root(tmp_path, private_system_root):
    def show(env: dict[str, str]) -> dict:
        done = subprocess.run([sys.executable, "-m", "mailwarden.cli", "config", "show", "--json"],
                              capture_output=True, text=True, timeout=30, env=env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    inherited = show(dict(os.environ))
    assert inherited["policyd"]["greylist"]["managed_whitelist"] == \
        str(private_system_root / "var/lib/mailwarden/whitelist_clients")
    (tmp_path / "etc/mailwarden/mailwarden.d").mkdir(parents=True)
    (tmp_path / "etc/mailwarden/mailwarden.toml").write_text('[policyd.greylist]\ndelay = "7m"\n')
    (tmp_path / "etc/mailwarden/mailwarden.d/10-site.toml").write_text('[policyd.greylist]\nmax_age = "9d"\n')
    moved = show({**os.environ, "MAILWARDEN_ROOT": str(tmp_path)})
    assert moved["policyd"]["greylist"]["delay"] == 420 and moved["policyd"]["greylist"]["max_age"] == 9 * 86400
