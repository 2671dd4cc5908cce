"""What the store would trip over at its first hold, beyond the settings schema: a message directory or
SQLite catalogue directory it cannot create or write; a catalogue behind the schema this version needs;
digests that are stale (a warning).

A catalogue at an older (or unknown) revision is an error: the milters refuse to start on it, so
``config check`` says so first (the forgotten ``migrate`` after an upgrade; policyd's unit checks
``--for policyd`` and is not held up by it). Everything else is a warning: a site that runs only policyd
must not be refused by a bare ``config check`` for the quarantine's defaults. Until it is fixed, holds
fail (the milters answer with a temporary failure, so nothing is lost), and the quarantine commands exit
69."""

from __future__ import annotations

import os
from pathlib import Path

import sqlalchemy as sa

from mailwarden.config import Loc, Problem
from quarantine.store import QuarantineSettings, QuarantineStore, SchemaBehind, StoreError

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
        if not Path(url.database).exists():
            problems.append(Problem(key, f"the catalogue {url.database} is not created yet: run 'mailwarden "
                                    "quarantine migrate' before starting the milters", warning=True))
            return problems  # nothing to open (and opening would create it)
    problem = schema_problem(settings) or digest_problem(settings)  # stale: only asked of a catalogue that works
    if problem is not None:
        problems.append(problem)
    return problems


def digest_problem(settings: QuarantineSettings) -> Problem | None:
    """A warning when digests are stale (``digest.send.stale``: none went out for ``stale_after`` while mail
    waits for one); None without ``[quarantine.digest]`` or when the store cannot say."""
    if settings.digest is None:
        return None
    from quarantine.digest.send import stale  # its templates and SMTP only when digests are configured

    store = QuarantineStore(settings)
    try:
        found = stale(store, settings.digest, store.now())
    except StoreError:
        return None  # schema_problem reported what the store trips over
    finally:
        store.close()
    if found is None:
        return None
    return Problem(("quarantine", "digest", "stale_after"), found.message(store.now()), warning=True)


def schema_problem(settings: QuarantineSettings) -> Problem | None:
    """The catalogue's revision against this version's: behind (or unknown) is an error, empty or
    unreachable a warning (a fresh install; a database that is down now)."""
    key: Loc = ("quarantine", "database_url")
    store = QuarantineStore(settings)
    try:
        store.check()
    except SchemaBehind as exc:
        return Problem(key, f"{exc}; the milters refuse to start until then", warning=exc.revision is None)
    except StoreError as exc:
        return Problem(key, f"{exc}; {CONSEQUENCE}", warning=True)
    finally:
        store.close()
    return None


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
