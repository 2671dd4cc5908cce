"""A private MariaDB server on a loopback port (needs Debian's mariadb-server; run as root, or as any user).

Never the system instance: mariadbd runs with ``--no-defaults`` (so /etc/mysql/*.cnf, and with it
/run/mysqld/mysqld.sock and port 3306, are never read), its own datadir, unix socket, pid file and error log
in a directory of our own, and an ephemeral TCP port bound to 127.0.0.1.

The datadir comes from ``mariadb-install-db --auth-root-authentication-method=normal``, run once per test
process into a template that each instance copies (0.15 s instead of 0.55 s or more):
root@localhost / root@127.0.0.1 / root@::1 with no password, so clients log in over TCP as plain root with
no ``--skip-grant-tables`` (which would also disable the authentication and GRANT paths under test). The
default ``socket`` method would leave TCP root unusable.

As root, mariadbd drops to user ``mysql`` (``--user``; refuses to run as root otherwise), so the directory
must be traversable and writable by mysql: pytest's tmp dirs are 0700, hence a tempfile.mkdtemp directory
with mode 0755, owned by mysql (the socket, pid file and error log are created by mysqld after the switch).
Keep it short: the unix socket path is limited to 108 bytes.

Sized for tests: 16 MB buffer pool, small InnoDB log and temporary tablespace (ibtmp1 is written in full on
every start; ibdata1 stays at its default 12 MB, smaller ones are extended by 64 MB at once), no binary log,
no name resolution, no flush per commit (a killed mariadbd keeps what the kernel got; only a host crash would
lose it). utf8mb4 is set explicitly because the compiled-in default is latin1: Debian's packaged
configuration, which ``--no-defaults`` skips, sets utf8mb4.
"""

from __future__ import annotations

import atexit
import functools
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql
from pymysql.constants import CLIENT

from harness.lifecycle import ServerLifecycle
from harness.net import free_port

MARIADBD = shutil.which("mariadbd") or "/usr/sbin/mariadbd"
INSTALL_DB = shutil.which("mariadb-install-db") or "/usr/bin/mariadb-install-db"
SERVICE_USER = "mysql"  # created by the preinst of Debian's mariadb-server (not by mariadb-server-core)

# Both to mariadb-install-db (which passes them to its bootstrap mariadbd) and to mariadbd, so the bootstrap
# already writes the small files the server then opens (a 4 MB redo log, not the 96 MB default resized later).
SERVER_OPTIONS = (
    "--skip-name-resolve",
    "--innodb-buffer-pool-size=16M",
    "--innodb-log-file-size=4M",
    "--innodb-log-buffer-size=1M",
    "--innodb-temp-data-file-path=ibtmp1:4M:autoextend",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_general_ci",
)


@dataclass
class MariaDbInstance(ServerLifecycle):
    """``start()`` builds the datadir once and runs mariadbd; ``stop()``/``start()`` again (or ``restart()``)
    keeps port and data, so tests can take the database away and bring it back.

    ``start()`` also creates ``database`` (``CREATE DATABASE IF NOT EXISTS``), so ``url`` works at once.
    ``extra_args`` go to mariadbd; options that change the on-disk layout (``--innodb-page-size``) must also
    reach mariadb-install-db: pass ``use_template=False`` too."""

    directory: Path | None = None
    port: int = field(default_factory=free_port)
    database: str = "mailwarden"
    extra_args: list[str] = field(default_factory=list)
    use_template: bool = True
    proc: subprocess.Popen[bytes] | None = None
    _owns_directory: bool = field(default=False, init=False, repr=False)
    _built: bool = field(default=False, init=False, repr=False)

    # --- addresses -----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL of ``database`` over TCP as root (no password)."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        return f"mysql+pymysql://root@127.0.0.1:{self.port}/{database}"

    @property
    def workdir(self) -> Path:
        assert self.directory is not None, "not built yet"
        return self.directory

    @property
    def datadir(self) -> Path:
        return self.workdir / "data"

    @property
    def socket_path(self) -> Path:
        return self.workdir / "mariadbd.sock"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mariadbd.err"

    # --- SQL -----------------------------------------------------------------------------------------------

    def connect(self, database: str | None = None, timeout: int = 2, **kwargs: Any) -> pymysql.Connection:
        """A pymysql connection over TCP as root (autocommit); raises pymysql.err.OperationalError when down."""
        return pymysql.connect(host="127.0.0.1", port=self.port, user="root", password="", database=database,
                               connect_timeout=timeout, read_timeout=timeout, write_timeout=timeout,
                               autocommit=True, charset="utf8mb4", **kwargs)

    def execute(self, sql: str, params: Sequence[Any] | dict[str, Any] | None = None,
                database: str | None = None) -> list[tuple[Any, ...]]:
        """Run one statement (pymysql ``%s`` placeholders) in ``database`` (default: ``self.database``)
        and return its rows ([] for statements without a result)."""
        with self.connect(database or self.database) as conn, conn.cursor() as cur:
            cur.execute(sql, params)
            return list(cur.fetchall())

    def run_script(self, sql: str, database: str | None = None) -> None:
        """Run several ``;``-separated statements (a schema file, fixtures) in one round trip; the server
        splits them, so semicolons inside string literals are fine. Raises on the first failing statement;
        the ones before it stay applied (autocommit)."""
        with self.connect(database or self.database, client_flag=CLIENT.MULTI_STATEMENTS) as conn, \
                conn.cursor() as cur:
            cur.execute(sql)
            while cur.nextset():  # the error of statement n surfaces only when its result is read
                pass

    def create_database(self, name: str, drop: bool = False) -> str:
        """Create ``name`` (utf8mb4) if missing, or empty it with ``drop=True``; returns its SQLAlchemy URL."""
        quoted = "`" + name.replace("`", "``") + "`"
        with self.connect() as conn, conn.cursor() as cur:
            if drop:
                cur.execute(f"DROP DATABASE IF EXISTS {quoted}")
            cur.execute(f"CREATE DATABASE IF NOT EXISTS {quoted} CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci")
        return self.url_for(name)

    # --- lifecycle -----------------------------------------------------------------------------------------

    def build(self) -> None:
        """Give the instance its datadir, once: a copy of the process-wide template (about 0.15 s, against
        0.55 s or more for mariadb-install-db), or a fresh mariadb-install-db with ``use_template=False``."""
        if self._built:
            return
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="mw-mariadb-"))
            self._owns_directory = True
        if len(str(self.socket_path)) > 100:
            raise RuntimeError(f"{self.socket_path} is too long for a unix socket; use a shorter directory")
        _prepare_directory(self.workdir)
        if self.use_template:
            # cp -a: keeps the mysql ownership and modes; --sparse: the InnoDB files are mostly zeros
            _run("cp", "-a", "--sparse=always", str(_template_datadir()), str(self.datadir))
        else:
            _install_db(self.datadir, *self.extra_args)
        self._built = True

    def start(self, timeout: float = 30.0) -> MariaDbInstance:
        self.build()
        if self.proc is not None and self.proc.poll() is None:
            return self
        d = self.workdir
        cmd = [MARIADBD, "--no-defaults", f"--datadir={self.datadir}", f"--socket={self.socket_path}",
               f"--pid-file={d / 'mariadbd.pid'}", f"--log-error={self.log_path}", f"--port={self.port}",
               "--bind-address=127.0.0.1", f"--tmpdir={d}", "--skip-log-bin", "--innodb-flush-log-at-trx-commit=2",
               *_user_args(), *SERVER_OPTIONS, *self.extra_args]
        # stdout/stderr to mariadbd.out: before --log-error is open (option errors), or if it cannot be,
        # mariadbd writes to stderr. It stays in the foreground, so proc is the server and stop() can wait for it.
        with open(d / "mariadbd.out", "ab") as out:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out, cwd=d)
        try:
            self._wait_ready(timeout)
            self.create_database(self.database)
        except BaseException:
            self.stop()  # a mariadbd that never became ready must not outlive the failed start
            raise
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a clean shutdown: InnoDB flushes, about 30 ms for a test database), SIGKILL if it takes
        longer than ``timeout``; returns when the process is gone, so the port is free and the datadir unlocked."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL: a crashed database (the next start() runs InnoDB crash recovery)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)





    def log_text(self) -> str:
        parts = [p.read_text(errors="replace") for p in (self.workdir / "mariadbd.out", self.log_path) if p.exists()]
        return "".join(parts)



    # --- internals -----------------------------------------------------------------------------------------

    def _wait_ready(self, timeout: float) -> None:
        """Ready = root logs in over TCP and ``SELECT 1`` answers (the port opens a moment before that)."""
        assert self.proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited with {self.proc.returncode}: {self.log_text()[-3000:]}")
            try:
                with self.connect(timeout=1) as conn, conn.cursor() as cur:
                    cur.execute("SELECT 1")
                    return
            except pymysql.err.OperationalError:
                time.sleep(0.02)
        raise TimeoutError(f"mariadbd on 127.0.0.1:{self.port} not ready after {timeout}s: {self.log_text()[-3000:]}")


def _user_args() -> list[str]:
    """As root, run as mysql (mariadbd refuses to run as root); as anyone else, run as ourselves."""
    return [f"--user={SERVICE_USER}"] if os.geteuid() == 0 else []


def _prepare_directory(directory: Path) -> None:
    """0755 and, as root, owned by mysql: mariadbd creates its socket, pid file and log there after setuid."""
    if not Path(MARIADBD).exists() or not Path(INSTALL_DB).exists():
        raise RuntimeError("mariadbd / mariadb-install-db not found: apt-get install mariadb-server")
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SERVICE_USER)
        except KeyError:
            raise RuntimeError(f"no user {SERVICE_USER}: apt-get install mariadb-server creates it") from None
        shutil.chown(directory, SERVICE_USER, SERVICE_USER)


def _install_db(datadir: Path, *extra_args: str) -> None:
    """System tables into an empty ``datadir``; root without password (``normal``), no test database."""
    _run(INSTALL_DB, "--no-defaults", f"--datadir={datadir}", "--auth-root-authentication-method=normal",
         "--skip-test-db", *_user_args(), *SERVER_OPTIONS, *extra_args)


@functools.cache
def _template_datadir() -> Path:
    """mariadb-install-db once per test process; every instance starts from a copy. Removed at exit."""
    directory = Path(tempfile.mkdtemp(prefix="mw-mariadb-template-"))
    atexit.register(shutil.rmtree, directory, True)
    _prepare_directory(directory)
    _install_db(directory / "data")
    return directory / "data"


def _run(*cmd: str) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stdout[-2000:]}"
                           f"{result.stderr[-2000:]}")


def start_mariadb(directory: Path | None = None, database: str = "mailwarden") -> MariaDbInstance:
    return MariaDbInstance(directory, database=database).start()
