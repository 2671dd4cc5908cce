"""Alembic environment for the quarantine catalogue.

From ``mailwarden quarantine migrate`` (quarantine.schema) the connection arrives in
``config.attributes["connection"]``. From the ``alembic`` command (``alembic -c quarantine/alembic.ini
upgrade head``) the URL is ``-x url=...``, else ``sqlalchemy.url`` of the ini file, else the one the store
uses: ``[quarantine] database_url`` of the mailwarden config ($MAILWARDEN_CONFIG or
/etc/mailwarden/mailwarden.toml), else the default SQLite file.

The catalogue's database also holds phishhook's tables (``phishhook/models.py``, on the same ``Base``), so
the migrations here create them and autogenerate compares them too.
"""

from __future__ import annotations

import logging.config

import sqlalchemy as sa
from alembic import context

import phishhook.models  # noqa: F401  (its tables join Base.metadata: they share our migrations)
from quarantine.models import Base
from quarantine.schema import VERSION_TABLE


def _run(connection: sa.Connection) -> None:
    context.configure(connection=connection, target_metadata=Base.metadata, version_table=VERSION_TABLE,
                      render_as_batch=connection.dialect.name == "sqlite", compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url") or context.config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from mailwarden.config import load_config

    return str(load_config().section("quarantine").resolved_database_url())


def main() -> None:
    if context.is_offline_mode():
        context.configure(url=_url(), target_metadata=Base.metadata, version_table=VERSION_TABLE,
                          literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    if context.config.config_file_name:  # the alembic command: its ini's logging (INFO: each step)
        logging.config.fileConfig(context.config.config_file_name, disable_existing_loggers=False)
    from quarantine.store import make_engine

    engine = make_engine(_url())
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


main()
