"""Where recipients are known: a map file, an SQL query, an LDAP directory.

The border checks verify recipients through it (policyd/recipients.py); the milters ask it which mailbox
an address delivers to, so an alias's held mail and spam settings are its mailbox's (milters/mailbox.py).

Each source answers one question about an address: FOUND (with the mailbox or mailboxes it delivers to),
DISABLED, or UNKNOWN. A source that cannot answer (directory down, query timed out) raises BackendError
naming itself, so the check's fail mode applies: a directory outage must never turn into "user unknown".

SQL and LDAP clients are synchronous (SQLAlchemy, ldap3). ``Directory.lookup`` (the event loop's way)
runs them in a few worker threads, each lookup bounded by the source's timeout; ``Directory.find`` (a
milter thread's way) calls them directly, bounded by the clients' own time-outs. LDAP connections are
reused and fail over to the next server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, TypeVar

from pydantic import AfterValidator, Field, field_validator

from mailwarden.backend import BackendError
from mailwarden.filewatch import FileWatch
from mailwarden.inline import bounded
from mailwarden.logs import get_logger, log_kv
from mailwarden.section import Section
from mailwarden.units import Duration


def _check_sql_query(query: str) -> str:
    if not any(p in query for p in (":address", ":local", ":domain")):
        raise ValueError("the query must use :address (or :local / :domain)")
    return query


SqlQuery = Annotated[str, AfterValidator(_check_sql_query)]
"""An SQL query asked about one address, with the parameters :address, :local and :domain."""


class FileSourceSettings(Section):
    """A recipient map: one address per line; ``@domain`` (every address of the domain exists); aliases
    as ``alias@domain: target@domain, other@domain``; ``#`` comments. Re-read when it changes."""

    paths: list[Path] = []


class SqlSourceSettings(Section):
    url: str | None = None
    """SQLAlchemy URL, e.g. "mysql+pymysql://user:password@db.example.org/mail" or "sqlite:////var/lib/x.db"."""
    query: SqlQuery = "SELECT address, active FROM recipients WHERE address = :address"
    """Returns a row when the address exists: first column the mailbox it delivers to, optional second column
    true/false for an active/disabled account. Parameters: :address, :local, :domain."""
    timeout: Duration = 2.0


class LdapSourceSettings(Section):
    servers: list[str] = []
    """ldap:// or ldaps:// URLs, tried in order: the second takes over when the first is down."""
    bind_dn: str | None = None
    bind_password: str | None = None
    base: str = ""
    filter: str = "(|(mail=%s)(mailAlternateAddress=%s))"
    """%s is the address (escaped), %u its local part, %d its domain."""
    mailbox_attribute: str = "mail"
    """The attribute naming the mailbox an address delivers to (for the quota check)."""
    status_attribute: str | None = "accountStatus"
    """Account status attribute; None when the directory has none."""
    active_values: list[str] = ["active"]
    """Status values that mean the account takes mail; an entry without the attribute counts as active."""
    timeout: Duration = 2.0
    connections: Annotated[int, Field(ge=1, le=32)] = 4

    @field_validator("servers")
    @classmethod
    def _urls(cls, servers: list[str]) -> list[str]:
        for url in servers:
            if not url.startswith(("ldap://", "ldaps://")):
                raise ValueError(f"{url!r}: an LDAP server is an ldap:// or ldaps:// URL")
        return servers

    @field_validator("filter")
    @classmethod
    def _filter(cls, text: str) -> str:
        if "%s" not in text and "%u" not in text:
            raise ValueError("the filter must use %s (the address) or %u (its local part)")
        if not (text.startswith("(") and text.endswith(")")):
            raise ValueError("an LDAP filter is enclosed in parentheses")
        return text


class DirectorySettings(Section):
    """The recipient sources, asked in order (the ``[policyd.recipients]`` section extends this)."""

    sources: list[Literal["file", "sql", "ldap"]] = ["file"]
    """Asked in order; the first that knows the address decides."""
    file: FileSourceSettings = Field(default_factory=FileSourceSettings)
    sql: SqlSourceSettings = Field(default_factory=SqlSourceSettings)
    ldap: LdapSourceSettings = Field(default_factory=LdapSourceSettings)
    recipient_delimiter: str = "+"
    """user+tag@domain is looked up as user@domain ("" to turn off)."""

    def missing(self) -> str | None:
        """What a configured source lacks, as the fix to make; None when every source can be asked."""
        if "sql" in self.sources and not self.sql.url:
            return "recipients.sources names sql: set [policyd.recipients.sql] url"
        if "ldap" in self.sources and not self.ldap.servers:
            return "recipients.sources names ldap: set [policyd.recipients.ldap] servers"
        if "file" in self.sources and not self.file.paths:
            return "recipients.sources names file: set [policyd.recipients.file] paths"
        return None


T = TypeVar("T")

log = get_logger("mailwarden.directory")


class Status(Enum):
    FOUND = "found"
    DISABLED = "disabled"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Lookup:
    status: Status
    mailboxes: tuple[str, ...] = ()
    source: str = ""


UNKNOWN = Lookup(Status.UNKNOWN)


class Source(Protocol):
    name: str

    def find(self, address: str) -> Lookup:
        """The answer, blocking the calling thread; raises BackendError when the source cannot answer."""

    async def lookup(self, address: str) -> Lookup:
        """The same answer from the event loop, bounded by the source's timeout."""

    def close(self) -> None: ...


def lookup_key(recipient: str, delimiter: str) -> str | None:
    """The address to look up: lower case, without the +extension; None when it is not an address."""
    address = recipient.strip().lower()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    if delimiter and not local.startswith('"') and delimiter in local:
        local = local.split(delimiter, 1)[0] or local
    return f"{local}@{domain.rstrip('.')}"


class Directory:
    """The configured sources in order, with the worker threads the SQL and LDAP sources run in."""

    def __init__(self, settings: DirectorySettings) -> None:
        self.settings = settings
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=settings.ldap.connections + 2,
                                                          thread_name_prefix="directory")
        self.sources: list[Source] = []
        for name in settings.sources:
            if name == "file":
                self.sources.append(FileSource(settings.file))
            elif name == "sql":
                self.sources.append(SqlSource(settings.sql, self.pool))
            else:
                self.sources.append(LdapSource(settings.ldap, self.pool))

    def find(self, address: str) -> Lookup:
        """``lookup``'s answer, blocking the calling thread (a milter's)."""
        failure: BackendError | None = None
        for source in self.sources:
            try:
                found = source.find(address)
            except BackendError as exc:
                failure = failure or exc
                continue
            if found.status is not Status.UNKNOWN:
                return found
        return self._none_knows(address, failure)

    async def lookup(self, address: str) -> Lookup:
        """The first source that knows ``address`` decides. When a source cannot answer and no other knows
        the address, its BackendError is raised: a directory outage is never "user unknown"."""
        failure: BackendError | None = None
        for source in self.sources:
            try:
                found = await source.lookup(address)
            except BackendError as exc:
                failure = failure or exc
                continue
            if found.status is not Status.UNKNOWN:
                return found
        return self._none_knows(address, failure)

    def _none_knows(self, address: str, failure: BackendError | None) -> Lookup:
        if failure is not None:
            raise failure
        return Lookup(Status.UNKNOWN, (), ",".join(source.name for source in self.sources))

    def close(self) -> None:
        for source in self.sources:
            source.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


# -- file ---------------------------------------------------------------------------------------------


class FileSource:
    """Addresses, ``@domain`` catch-alls and ``alias: target, target`` lines; re-read when a file changes."""

    name = "file"

    def __init__(self, settings: FileSourceSettings) -> None:
        self.paths = list(settings.paths)
        self.watch = FileWatch(self.paths)
        self._addresses: dict[str, tuple[str, ...]] = {}
        self._domains: set[str] = set()
        self._lock = threading.Lock()
        self._refresh()

    def _read(self) -> tuple[dict[str, tuple[str, ...]], set[str]]:
        addresses: dict[str, tuple[str, ...]] = {}
        domains: set[str] = set()
        for path in self.paths:
            _read_map(Path(path), addresses, domains)
        return addresses, domains

    def _refresh(self) -> None:
        """Re-read the maps if one changed; one that cannot be read raises BackendError (and is tried again)."""
        if not self.watch.changed():
            return
        addresses, domains = self.watch.read(self._read)
        with self._lock:
            self._addresses, self._domains = addresses, domains
        log_kv(log, logging.INFO, "recipient map loaded", addresses=len(addresses), domains=len(domains))

    async def lookup(self, address: str) -> Lookup:
        return self.find(address)

    def find(self, address: str) -> Lookup:
        self._refresh()
        if (targets := self._addresses.get(address)) is not None:
            return Lookup(Status.FOUND, targets, self.name)
        if address.rpartition("@")[2] in self._domains:
            return Lookup(Status.FOUND, (address,), self.name)
        return UNKNOWN

    def close(self) -> None:
        pass


def _read_map(path: Path, addresses: dict[str, tuple[str, ...]], domains: set[str]) -> None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        raise BackendError(f"recipient map {path}: {exc.strerror}", backend="file") from None
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, colon, targets = line.partition(":")
        name = name.strip().lower()
        if name.startswith("@") and not colon:
            domains.add(name[1:])
        elif "@" in name:
            mailboxes = tuple(t.strip().lower() for t in targets.split(",") if t.strip()) if colon else (name,)
            addresses[name] = mailboxes or (name,)
        else:
            log_kv(log, logging.WARNING, "recipient map line ignored: not an address", file=str(path),
                   line=number)


# -- SQL ----------------------------------------------------------------------------------------------


class SqlSource:
    name = "sql"

    def __init__(self, settings: SqlSourceSettings, pool: concurrent.futures.Executor) -> None:
        from sqlalchemy import create_engine, text

        self.settings = settings
        self.pool = pool
        assert settings.url
        connect_args: dict[str, Any] = {}
        if settings.url.startswith("mysql"):
            seconds = max(1, int(settings.timeout))
            connect_args = {"connect_timeout": seconds, "read_timeout": seconds, "write_timeout": seconds}
        self.engine = create_engine(settings.url, pool_pre_ping=True, pool_size=4, connect_args=connect_args)
        self.query = text(settings.query)

    def find(self, address: str) -> Lookup:
        local, _, domain = address.rpartition("@")
        try:
            with self.engine.connect() as conn:
                row = conn.execute(self.query, {"address": address, "local": local, "domain": domain}).first()
        except Exception as exc:  # SQLAlchemy wraps every driver error; all mean "cannot answer now"
            raise BackendError(f"sql lookup failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
                               backend="sql") from None
        if row is None:
            return UNKNOWN
        mailbox = str(row[0]).lower() if len(row) > 0 and row[0] else address
        if len(row) > 1 and row[1] is not None and not _truthy(row[1]):
            return Lookup(Status.DISABLED, (mailbox,), self.name)
        return Lookup(Status.FOUND, (mailbox,), self.name)

    async def lookup(self, address: str) -> Lookup:
        return await _bounded(self.pool, self.find, address, self.settings.timeout, "sql")

    def close(self) -> None:
        self.engine.dispose()


def _truthy(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "active", "y", "t")
    return bool(value)


# -- LDAP ---------------------------------------------------------------------------------------------


class LdapSource:
    """ldap3 with a server pool (first server first, the next when it is down) and reused connections."""

    name = "ldap"

    def __init__(self, settings: LdapSourceSettings, pool: concurrent.futures.Executor) -> None:
        self.settings = settings
        self.pool = pool
        self.idle: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.attributes = [settings.mailbox_attribute] + ([settings.status_attribute] if settings.status_attribute
                                                          else [])

    def _connect(self) -> Any:
        """A bound connection to the first server that answers, in the configured order. (ldap3's own
        ServerPool sleeps between rounds, which would blow the time bound of a policy answer; and a Server
        object remembers a failed address for minutes, so each attempt gets a fresh one.)"""
        from ldap3 import SAFE_SYNC, Connection, Server
        from ldap3.core.exceptions import LDAPException

        seconds = max(1, round(self.settings.timeout))
        failures = []
        for url in self.settings.servers:
            server = Server(url, connect_timeout=seconds)
            try:
                return Connection(server, user=self.settings.bind_dn, password=self.settings.bind_password,
                                  client_strategy=SAFE_SYNC, auto_bind=True, receive_timeout=seconds,
                                  raise_exceptions=False)
            except (LDAPException, OSError) as exc:
                failures.append(f"{server.host}:{server.port}: {type(exc).__name__}")
        raise RuntimeError("no LDAP server answered (" + "; ".join(failures) + ")")

    def _search(self, conn: Any, address: str, template: str, attributes: list[str]) -> list[dict[str, Any]]:
        from ldap3.utils.conv import escape_filter_chars

        local, _, domain = address.rpartition("@")
        search_filter = (template.replace("%s", escape_filter_chars(address))
                         .replace("%u", escape_filter_chars(local or address))
                         .replace("%d", escape_filter_chars(domain)))
        ok, result, response, _ = conn.search(self.settings.base, search_filter, attributes=attributes, size_limit=5)
        if not ok and result.get("result") not in (0, 32):  # 32: no such object
            raise RuntimeError(f"LDAP search failed: {result.get('description')}")
        return [entry["attributes"] for entry in response if entry.get("type") == "searchResEntry"]

    def entries(self, address: str, template: str | None = None, attributes: list[str] | None = None
                ) -> list[dict[str, Any]]:
        """The entries ``template`` (default: the recipient filter) finds for ``address``, synchronously;
        raises BackendError("ldap") when no server can answer."""
        from ldap3.core.exceptions import LDAPException

        last: Exception | None = None
        for _attempt in range(2):  # a dead reused connection gets one fresh one (on the next server if need be)
            try:
                conn = self.idle.get_nowait()
            except queue.Empty:
                conn = None
            try:
                conn = conn or self._connect()
                found = self._search(conn, address, template or self.settings.filter, attributes or self.attributes)
            except (LDAPException, OSError, RuntimeError) as exc:
                last = exc
                if conn is not None:
                    _quietly_unbind(conn)
                self.close()  # the idle connections went to the same dead server: the retry connects anew
                continue
            self.idle.put(conn)
            return found
        raise BackendError(f"ldap lookup failed: {type(last).__name__}: {last}", backend="ldap")

    def find(self, address: str) -> Lookup:
        return self._interpret(address, self.entries(address))

    async def entries_async(self, address: str, template: str, attributes: list[str]) -> list[dict[str, Any]]:
        return await _bounded(self.pool, lambda a: self.entries(a, template, attributes), address,
                              self.settings.timeout * 2 + 0.5, "ldap")

    def _interpret(self, address: str, entries: list[dict[str, Any]]) -> Lookup:
        if not entries:
            return UNKNOWN
        mailboxes = []
        active = False
        for attributes in entries:
            mailbox = _first(attributes.get(self.settings.mailbox_attribute)) or address
            mailboxes.append(mailbox.lower())
            status = _first(attributes.get(self.settings.status_attribute)) if self.settings.status_attribute \
                else None
            if status is None or status.lower() in {v.lower() for v in self.settings.active_values}:
                active = True
        status_value = Status.FOUND if active else Status.DISABLED
        return Lookup(status_value, tuple(dict.fromkeys(mailboxes)), self.name)

    async def lookup(self, address: str) -> Lookup:
        return await _bounded(self.pool, self.find, address, self.settings.timeout * 2 + 0.5, "ldap")

    def close(self) -> None:
        while True:
            try:
                _quietly_unbind(self.idle.get_nowait())
            except queue.Empty:
                return


def _first(value: Any) -> str | None:
    if isinstance(value, list):
        return str(value[0]) if value else None
    return str(value) if value not in (None, "") else None


def _quietly_unbind(conn: Any) -> None:
    try:
        conn.unbind()
    except Exception:  # closing a broken connection may fail in any way; it is being thrown away
        log.debug("unbind of a broken LDAP connection failed", exc_info=True)


async def _bounded(pool: concurrent.futures.Executor, func: Callable[[str], T], address: str, timeout: float,
                   backend: str) -> T:
    loop = asyncio.get_running_loop()
    try:
        return await bounded(loop.run_in_executor(pool, func, address), timeout)
    except TimeoutError:
        raise BackendError(f"{backend} lookup took longer than {timeout:g}s", backend=backend) from None
