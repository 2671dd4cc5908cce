"""The README's set-up commands and what a newcomer meets first: the quick start run twice, the version."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart(run_dir: Path) -> subprocess.CompletedProcess[str]:
    """The quick start with its state in ``run_dir``. Its venv is a path that cannot be created, so that a
    quick start that goes past its already-running check stops at its first real step instead of
    starting a suite."""
    return subprocess.run(["bash", str(ROOT / "tools/quickstart.sh")], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "MAILWARDEN_RUN": str(run_dir), "VENV": "/proc/no-venv-here"})


def test_quickstart_run_twice_leaves_the_running_one_alone(tmp_path):
    # a live process that looks like a running quick start, recorded where the quick start keeps its pid
    running = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()", "quickstart"],
                               stdin=subprocess.PIPE)
    try:
        (tmp_path / "quickstart.pid").write_text(f"{running.pid}\n")
        second = quickstart(tmp_path)
        assert second.returncode == 0, second.stderr
        assert f"already running (pid {running.pid})" in second.stdout
        assert "left it alone" in second.stdout
        assert running.poll() is None
        assert (tmp_path / "quickstart.pid").read_text().strip() == str(running.pid)
        assert not (tmp_path / "postfix").exists() and not (tmp_path / "mailwarden.toml").exists()
    finally:
        running.kill()
        running.wait()


def test_a_stale_pid_file_does_not_count_as_running(tmp_path):
    # the pid of a process that is no quick start (this test's python) must not stop a new one
    (tmp_path / "quickstart.pid").write_text(f"{os.getpid()}\n")
    started = quickstart(tmp_path)
    assert "already running" not in started.stdout
    assert (tmp_path / "quickstart.pid").read_text().strip() != str(os.getpid())


def test_version_names_the_installed_release():
    shown = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--version"], capture_output=True, text=True,
                           timeout=30)
    assert shown.returncode == 0
    assert shown.stdout.strip() == f"mailwarden, version {version('mailwarden')}"
