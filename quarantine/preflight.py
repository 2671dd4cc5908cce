"""What the store would trip over at its first hold, beyond the settings schema: a message directory or
SQLite catalogue directory it cannot create or write.

Warnings, not errors: ``mailwarden config check`` is also the start check of services that never touch
the quarantine (policyd's ExecStartPre), and a site without a quarantine must not be refused for its
defaults. Until it is fixed, holds fail (the milters answer with a temporary failure, so nothing is lost),
and the quarantine commands exit 69."""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa

from mailwarden.config import Loc, Problem
from quarantine.store import QuarantineSettings

CONSEQUENCE = "until it is fixed, messages cannot be held (the milters tempfail them)"


def preflight(settings: QuarantineSettings) -> list[Problem]:
    problems: list[Problem] = []
    why = writable_directory(settings.resolved_message_dir())
    if why:
        problems.append(Problem(("quarantine", "message_dir"), f"{why}; {CONSEQUENCE}", warning=True))
    url = sa.make_url(settings.resolved_database_url())  # validated with the settings
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        key: Loc = ("quarantine", "database_url")
        if (why := writable_directory(Path(url.database).parent)) is not None:
            problems.append(Problem(key, f"the SQLite catalogue's directory: {why}; {CONSEQUENCE}", warning=True))
    return problems


def writable_directory(path: Path) -> str | None:
    """Why the store could not create files in ``path`` (creating it, with its parents, if missing), or
    None."""
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{path}: {existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        action = "write in" if existing == path else f"create {path} in"
        return f"{path}: cannot {action} {existing} (permission denied)"
    return None
