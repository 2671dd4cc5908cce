"""A private OpenLDAP slapd on a loopback port, loaded with the test directory (needs root and Debian's slapd).

Debian ships no qmail-ldap schema, so tests/fixtures/ldap/ holds the subset mailwarden reads
(mailAlternateAddress, mailForwardingAddress, accountStatus, qmailUser) with qmail-ldap's real OIDs, and
the test directory (alice active, bob disabled, carol with alternate addresses, team forwarding).

Built from a slapd.conf each time: ``slapadd`` first (``slaptest`` before the data exists fails on the empty
mdb directory), then ``slaptest -F`` converts it into the slapd.d that slapd runs from. slapd runs as root
and drops to openldap via ``-u/-g``, so its directory must be traversable by openldap: pytest's tmp dirs
are 0700, hence a directory of our own from tempfile.mkdtemp with mode 0755.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ldap3 import SAFE_SYNC, Connection, Server
from ldap3.core.exceptions import LDAPException

from harness.lifecycle import ServerLifecycle
from harness.net import free_port

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "ldap"
SLAPD = shutil.which("slapd") or "/usr/sbin/slapd"

SLAPD_CONF = """\
include     /etc/ldap/schema/core.schema
include     /etc/ldap/schema/cosine.schema
include     /etc/ldap/schema/inetorgperson.schema
include     {d}/qmail-mini.schema
pidfile     {d}/slapd.pid
argsfile    {d}/slapd.args
modulepath  /usr/lib/ldap
moduleload  back_mdb
database    mdb
suffix      "{base}"
rootdn      "{admin_dn}"
rootpw      {admin_password}
directory   {d}/db
maxsize     104857600
index       objectClass eq
index       mail,mailAlternateAddress eq
access to * by * read
"""


@dataclass
class SlapdInstance(ServerLifecycle):
    """``start()`` builds the database once and runs slapd; ``stop()``/``start()`` again (or ``restart()``)
    keeps port and data, so tests can take LDAP away and bring it back."""

    directory: Path | None = None
    port: int = field(default_factory=free_port)
    base: str = "dc=example,dc=org"
    admin_dn: str = "cn=admin,dc=example,dc=org"
    admin_password: str = "secret"
    ldif: Path = FIXTURES / "data.ldif"
    schema: Path = FIXTURES / "qmail-mini.schema"
    proc: subprocess.Popen[bytes] | None = None
    _owns_directory: bool = field(default=False, init=False, repr=False)
    _built: bool = field(default=False, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def workdir(self) -> Path:
        assert self.directory is not None, "not built yet"
        return self.directory

    def connection(self, user: str | None = None, password: str | None = None, timeout: int = 2) -> Connection:
        """A bound SAFE_SYNC ldap3 connection (anonymous unless ``user``); raises LDAPException when down.
        ``timeout`` is whole seconds: ldap3 packs receive_timeout into SO_RCVTIMEO as integers on Linux."""
        server = Server(self.url, connect_timeout=timeout)
        return Connection(server, user=user, password=password, client_strategy=SAFE_SYNC, auto_bind=True,
                          receive_timeout=timeout)

    def admin_connection(self) -> Connection:
        """Bound as the rootdn, for tests that change the directory while it runs."""
        return self.connection(self.admin_dn, self.admin_password)

    def build(self) -> None:
        if self._built:
            return
        if os.geteuid() != 0:
            raise RuntimeError("the private slapd runs as root and drops to user openldap: run the tests as root")
        if self.directory is None:
            self.directory = Path(tempfile.mkdtemp(prefix="mw-slapd-"))
            self._owns_directory = True
        d = self.workdir
        d.chmod(0o755)
        (d / "db").mkdir(parents=True, exist_ok=True)
        shutil.copy(self.schema, d / "qmail-mini.schema")
        (d / "slapd.conf").write_text(SLAPD_CONF.format(d=d, base=self.base, admin_dn=self.admin_dn,
                                                         admin_password=self.admin_password))
        self._run("slapadd", "-f", str(d / "slapd.conf"), "-l", str(self.ldif))
        (d / "slapd.d").mkdir(exist_ok=True)
        self._run("slaptest", "-f", str(d / "slapd.conf"), "-F", str(d / "slapd.d"))
        self._run("chown", "-R", "openldap:openldap", str(d))
        self._built = True

    def start(self, timeout: float = 10.0) -> SlapdInstance:
        self.build()
        d = self.workdir
        with open(d / "slapd.log", "ab") as log:
            # -d none: stay in the foreground (no fork), so proc is slapd itself and stop() can wait for it, and
            # print only the messages logged whatever the level (e.g. bind failures) into slapd.log; -d 0 prints none
            self.proc = subprocess.Popen([SLAPD, "-d", "none", "-F", str(d / "slapd.d"), "-h", f"{self.url}/",
                                          "-u", "openldap", "-g", "openldap"],
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()  # a slapd that never became ready must not outlive the failed start
            raise
        return self

    def stop(self) -> None:
        """SIGTERM (slapd exits in ~10 ms), SIGKILL if it hangs; returns when the process is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)





    def log_text(self) -> str:
        path = self.workdir / "slapd.log"
        return path.read_text(errors="replace") if path.exists() else ""



    def _wait_ready(self, timeout: float) -> None:
        """Ready = an anonymous bind and a root DSE search answer (not just an open port)."""
        assert self.proc
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"slapd exited with {self.proc.returncode}: {self.log_text()[-2000:]}")
            try:
                conn = self.connection(timeout=1)
                try:
                    if conn.search("", "(objectClass=*)", search_scope="BASE")[0]:
                        return
                finally:
                    conn.unbind()
            except LDAPException:
                pass
            time.sleep(0.02)
        raise TimeoutError(f"slapd on {self.url} not ready after {timeout}s: {self.log_text()[-2000:]}")

    @staticmethod
    def _run(*cmd: str) -> None:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")


def start_slapd(directory: Path | None = None) -> SlapdInstance:
    return SlapdInstance(directory).start()
