"""The MariaDB harness works: a private mariadbd (never the system one on 3306) that SQLAlchemy reaches through
``.url``, that can be taken down (OperationalError: what the "database down" tests rely on), frozen, killed,
and brought back on the same port with its data."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
import sqlalchemy as sa
from harness.mariadb import MariaDbInstance
from sqlalchemy.exc import OperationalError

metadata = sa.MetaData()
triplets = sa.Table(
    "triplets", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sender", sa.String(255), nullable=False),
    sa.Column("seen", sa.Integer, nullable=False, default=1),
)


@pytest.fixture
def mariadb() -> Iterator[MariaDbInstance]:
    """A private mariadbd with an empty ``mailwarden`` database (about 0.3 s: copy of the datadir template
    0.15 s, start 0.15 s; the first one in the process also runs mariadb-install-db, 0.55 s)."""
    with MariaDbInstance() as instance:
        yield instance


def engine_for(url: str, timeout: int = 2, **kwargs: Any) -> sa.Engine:
    """Bounded timeouts, so a test against a dead or frozen server fails fast instead of hanging."""
    return sa.create_engine(url, connect_args={"connect_timeout": timeout, "read_timeout": timeout,
                                               "write_timeout": timeout}, **kwargs)


def senders(engine: sa.Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(sa.select(triplets.c.sender).order_by(triplets.c.id)))


def test_private_instance_root_over_tcp_without_password(mariadb: MariaDbInstance) -> None:
    with mariadb.connect() as conn, conn.cursor() as cur:
        cur.execute("SELECT CURRENT_USER(), @@port, @@socket, @@datadir, @@bind_address, @@log_bin, "
                    "@@character_set_server, DATABASE()")
        user, port, sock, datadir, bind, log_bin, charset, database = cur.fetchone()
    assert user == "root@127.0.0.1"  # TCP, no password, no --skip-grant-tables
    assert port == mariadb.port != 3306
    assert sock == str(mariadb.socket_path)
    assert datadir.rstrip("/") == str(mariadb.datadir)
    assert (bind, log_bin, charset, database) == ("127.0.0.1", 0, "utf8mb4", None)
    assert mariadb.url == f"mysql+pymysql://root@127.0.0.1:{mariadb.port}/mailwarden"


def test_sqlalchemy_create_insert_select(mariadb: MariaDbInstance) -> None:
    engine = engine_for(mariadb.url)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(triplets), [{"sender": "a@example.org", "seen": 1},
                                            {"sender": "b@example.org", "seen": 3}])
            conn.execute(sa.update(triplets).where(triplets.c.sender == "a@example.org").values(seen=2))
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT DATABASE()")) == "mailwarden"
            rows = conn.execute(sa.select(triplets.c.sender, triplets.c.seen).order_by(triplets.c.id)).all()
        assert [tuple(r) for r in rows] == [("a@example.org", 2), ("b@example.org", 3)]
        assert mariadb.execute("SELECT COUNT(*) FROM triplets") == [(2,)]
    finally:
        engine.dispose()


def test_stopped_database_raises_operational_error(mariadb: MariaDbInstance) -> None:
    engine = engine_for(mariadb.url)
    try:
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT 1")) == 1
            started = time.monotonic()
            mariadb.stop()
            assert time.monotonic() - started < 5
            assert mariadb.proc is not None and mariadb.proc.poll() is not None  # gone, not just closing
            with pytest.raises(OperationalError):  # a connection held across the outage
                conn.execute(sa.text("SELECT 1"))
        started = time.monotonic()
        with pytest.raises(OperationalError), engine.connect():  # a new one: refused at once, no timeout
            pass
        assert time.monotonic() - started < 1
        with pytest.raises(pymysql.err.OperationalError):
            mariadb.execute("SELECT 1")
    finally:
        engine.dispose()


def test_restart_on_the_same_port_keeps_the_data(mariadb: MariaDbInstance) -> None:
    # pool_pre_ping: the pooled connection from before the outage is replaced instead of failing once
    engine = engine_for(mariadb.url, pool_pre_ping=True)
    try:
        metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(triplets), [{"sender": "before@example.org"}])
        port, url = mariadb.port, mariadb.url
        mariadb.stop()
        with pytest.raises(OperationalError), engine.connect():
            pass
        mariadb.start()
        assert (mariadb.port, mariadb.url) == (port, url)
        assert senders(engine) == ["before@example.org"]
        with engine.begin() as conn:
            conn.execute(sa.insert(triplets), [{"sender": "after@example.org"}])
        mariadb.restart()
        assert senders(engine) == ["before@example.org", "after@example.org"]
    finally:
        engine.dispose()


def test_killed_database_recovers_committed_rows(mariadb: MariaDbInstance) -> None:
    mariadb.run_script("CREATE TABLE t (k VARCHAR(20) PRIMARY KEY); INSERT INTO t VALUES ('committed')")
    mariadb.kill()
    with pytest.raises(pymysql.err.OperationalError):
        mariadb.execute("SELECT 1")
    mariadb.start()  # InnoDB crash recovery
    assert mariadb.execute("SELECT k FROM t") == [("committed",)]


def test_paused_database_times_out(mariadb: MariaDbInstance) -> None:
    engine = engine_for(mariadb.url, timeout=1)
    try:
        mariadb.pause()
        started = time.monotonic()
        with pytest.raises(OperationalError), engine.connect():  # the kernel accepts, nobody greets
            pass
        assert time.monotonic() - started < 5
        mariadb.resume()
        with engine.connect() as conn:
            assert conn.scalar(sa.text("SELECT 1")) == 1
    finally:
        mariadb.resume()
        engine.dispose()


def test_create_database_and_run_script(mariadb: MariaDbInstance) -> None:
    url = mariadb.create_database("other")
    assert url == f"mysql+pymysql://root@127.0.0.1:{mariadb.port}/other"
    mariadb.run_script("CREATE TABLE kv (k VARCHAR(20) PRIMARY KEY, v TEXT);"
                       "INSERT INTO kv VALUES ('a', 'x;y'), ('b', 'z')", database="other")
    engine = engine_for(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT k, v FROM kv ORDER BY k")).all() == [("a", "x;y"), ("b", "z")]
    finally:
        engine.dispose()
    with pytest.raises(pymysql.err.IntegrityError):  # a failing statement in a script raises
        mariadb.run_script("INSERT INTO kv VALUES ('c', '1'); INSERT INTO kv VALUES ('a', 'dup')", database="other")
    assert mariadb.execute("SELECT k FROM kv ORDER BY k", database="other") == [("a",), ("b",), ("c",)]
    mariadb.create_database("other", drop=True)
    assert mariadb.execute("SHOW TABLES", database="other") == []
    assert mariadb.execute("SHOW TABLES") == []  # the default database is separate


def test_context_manager_leaves_no_process_and_no_directory() -> None:
    with MariaDbInstance(use_template=False) as instance:  # also: its own mariadb-install-db, no template
        proc, directory = instance.proc, instance.workdir
        assert proc is not None and proc.poll() is None
        assert directory.is_dir()
    assert proc.poll() is not None
    assert not directory.exists()
