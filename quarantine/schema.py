"""The catalogue's schema version: Alembic, configured in code (no alembic.ini needed by the product).

``mailwarden quarantine migrate`` runs ``upgrade`` to the head revision; the store refuses a database behind
it (``SchemaBehind``). An admin may also run Alembic itself: ``alembic -c <package>/quarantine/alembic.ini
upgrade head`` (the URL comes from ``-x url=...`` or else from the mailwarden config, as the store finds it).

Alembic is imported when a function here runs, not with this module: every ``mailwarden`` command imports
the capabilities, and only the quarantine's need Alembic (a tenth of a second).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import sqlalchemy as sa
    from alembic.config import Config
    from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).with_name("migrations")
VERSION_TABLE = "quarantine_alembic_version"
"""Alembic's bookkeeping table, named for the quarantine so that a database shared with other
applications keeps their own ``alembic_version`` apart."""


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """An Alembic config for our migrations; with ``connection``, env.py migrates through it."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.cache
def scripts() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    head = scripts().get_current_head()
    assert head is not None, f"no migration in {MIGRATIONS}"
    return head


def known_revision(revision: str) -> bool:
    """Whether ``revision`` is one of our migrations (a database written by a newer mailwarden is not)."""
    try:
        return scripts().get_revision(revision) is not None
    except Exception:  # alembic.util.CommandError and its kin for an unknown id
        return False


def current_revision(connection: sa.Connection) -> str | None:
    """The revision the database is at (None: never migrated)."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE}).get_current_revision()


def upgrade(engine: sa.Engine, revision: str = "head") -> None:
    from alembic import command

    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), revision)


def downgrade(engine: sa.Engine, revision: str) -> None:
    from alembic import command

    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), revision)
