"""Run pytest on a host whose mailwarden files would change every answer, to prove the suite never reads them.

    sudo .venv/bin/python tests/hostile_system_paths.py tests/test_greylist.py tests/test_e2e_policyd.py

Writes a managed whitelist and site rule files that let the test networks through (192.0.2.0/24,
198.51.100.0/24, 203.0.113.0/24, 127.0.0.0/8, ::1), and a mailwarden.toml and drop-in with an unknown
key (start-up would stop), then runs pytest with the given arguments. Whatever was at those paths before
is moved aside and put back afterwards, and the files and directories it created are removed, also when
pytest fails or is interrupted. The exit code is pytest's.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TEST_NETWORKS = ["192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "127.0.0.0/8", "::1"]
HOSTILE_WHITELIST = "# hostile: every test network skips greylisting\n" + "\n".join(TEST_NETWORKS) + "\n"
HOSTILE_FILES = {
    Path("/var/lib/mailwarden/whitelist_clients"): HOSTILE_WHITELIST,
    Path("/etc/mailwarden/rules/postgrey_whitelist_clients"): HOSTILE_WHITELIST,
    Path("/etc/mailwarden/rules/postgrey_whitelist_recipients"): "# hostile\nexample.test\nexample.org\n",
    Path("/etc/mailwarden/rules/access.toml"): (
        "# hostile: every test network is let through by the first rule\n"
        "[[rule]]\nclient = [" + ", ".join(f'"{net}"' for net in TEST_NETWORKS) + ']\naction = "permit"\n'),
    Path("/etc/mailwarden/mailwarden.toml"): '[policyd]\nhostile_unknown_key = true\n',
    Path("/etc/mailwarden/mailwarden.d/99-hostile.toml"): '[policyd.greylist]\nhostile_unknown_key = 1\n',
}


def plant(backup: Path) -> list[Path]:
    """Write the hostile files, moving what was there into ``backup``; the directories created, deepest
    first."""
    created: list[Path] = []
    for path, text in HOSTILE_FILES.items():
        missing = [parent for parent in reversed(path.parents) if not parent.exists()]
        path.parent.mkdir(parents=True, exist_ok=True)
        created += missing
        if path.exists() or path.is_symlink():
            saved = backup / path.relative_to("/")
            saved.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(path, saved)
        path.write_text(text)
    return sorted(created, key=lambda directory: len(directory.parts), reverse=True)


def restore(backup: Path, created: list[Path]) -> None:
    for path in HOSTILE_FILES:
        path.unlink(missing_ok=True)
        saved = backup / path.relative_to("/")
        if saved.exists() or saved.is_symlink():
            shutil.move(saved, path)
    for directory in created:
        if directory.exists() and not any(directory.iterdir()):
            directory.rmdir()


def main(args: list[str]) -> int:
    backup = Path(tempfile.mkdtemp(prefix="mw-hostile-backup-"))
    created: list[Path] = []
    try:
        created = plant(backup)
        # the planted files are live: a mailwarden without $MAILWARDEN_ROOT refuses its config
        check = subprocess.run([sys.executable, "-m", "mailwarden.cli", "config", "check"], capture_output=True,
                               text=True, env={"PATH": "/usr/bin:/bin"})
        assert check.returncode != 0 and "hostile_unknown_key" in check.stderr + check.stdout, check
        print("hostile files planted:", *HOSTILE_FILES, sep="\n  ", flush=True)
        return subprocess.run([sys.executable, "-m", "pytest", *args]).returncode
    finally:
        restore(backup, created)
        shutil.rmtree(backup, ignore_errors=True)
        print("hostile files removed; what was there before is back", flush=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
