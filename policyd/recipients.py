"""Recipient verification at the border: a recipient of our domains that no source knows is refused at
RCPT with 550 5.1.1, before any content is accepted, so the relay never accepts mail it would have to
bounce to a (likely forged) sender later. A disabled account gets 550 5.2.1.

Sources (file, SQL, LDAP; policyd/directory.py) are asked in order; the first that knows the address
decides. When a source cannot answer and no other knows the address, the check fails with that source's
BackendError: its fail mode (defer by default) applies, never a 550. Answers are cached in Redis, known
addresses for ``cache_ttl`` and unknown ones for the shorter ``negative_cache_ttl``.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Literal

from pydantic import Field, field_validator

from mailwarden.backend import BackendError
from mailwarden.decision import Action
from mailwarden.logs import get_logger, log_kv
from mailwarden.redis_pipe import PipelinedRedis
from mailwarden.section import Section
from mailwarden.units import Duration
from policyd import keys
from policyd.check import Check
from policyd.directory import (
    FileSource,
    FileSourceSettings,
    LdapSource,
    LdapSourceSettings,
    Lookup,
    Source,
    SqlSource,
    SqlSourceSettings,
    Status,
)
from policyd.request import PolicyRequest
from policyd.verdict import REJECT_BAD_ADDRESS, REJECT_DISABLED_MAILBOX, REJECT_UNKNOWN_USER, Verdict, reject


class RecipientSettings(Section):
    """Recipient verification: unknown recipients of our domains refused at RCPT, before any content."""

    domains: list[str] = []
    """Our domains; recipients elsewhere are not checked. Empty: every recipient is checked."""
    sources: list[Literal["file", "sql", "ldap"]] = ["file"]
    """Asked in order; the first that knows the address decides."""
    file: FileSourceSettings = Field(default_factory=FileSourceSettings)
    sql: SqlSourceSettings = Field(default_factory=SqlSourceSettings)
    ldap: LdapSourceSettings = Field(default_factory=LdapSourceSettings)
    recipient_delimiter: str = "+"
    """user+tag@domain is looked up as user@domain ("" to turn off)."""
    cache_ttl: Duration = 600
    negative_cache_ttl: Duration = 60
    unknown_text: str = "User unknown"
    disabled_text: str = "Mailbox disabled"

    @field_validator("domains")
    @classmethod
    def _lower(cls, domains: list[str]) -> list[str]:
        return [domain.lower().strip(".") for domain in domains]

    def missing(self) -> str | None:
        """What a configured source lacks (checked only when the recipients check is on)."""
        if "sql" in self.sources and not self.sql.url:
            return "recipients.sources names sql: set [policyd.recipients.sql] url"
        if "ldap" in self.sources and not self.ldap.servers:
            return "recipients.sources names ldap: set [policyd.recipients.ldap] servers"
        if "file" in self.sources and not self.file.paths:
            return "recipients.sources names file: set [policyd.recipients.file] paths"
        return None


log = get_logger("policyd.recipients")

MAX_ADDRESS = 254
MAX_LOCAL_PART = 64


def lookup_key(recipient: str, delimiter: str) -> str | None:
    """The address to look up: lower case, without the +extension; None when it is not an address."""
    address = recipient.strip().lower()
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    if delimiter and not local.startswith('"') and delimiter in local:
        local = local.split(delimiter, 1)[0] or local
    return f"{local}@{domain.rstrip('.')}"


class RecipientCheck(Check):
    name = "recipients"
    dependency = "ldap"

    def __init__(self, settings: RecipientSettings, redis_pipe: PipelinedRedis, prefix: str) -> None:
        self.settings = settings
        self.redis = redis_pipe
        self.prefix = prefix
        self.domains = set(settings.domains)
        self.dependency = settings.sources[0]  # type: ignore[misc]  # whose fail mode a time-out takes
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

    def stop(self) -> None:
        for source in self.sources:
            source.close()
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def on_rcpt(self, request: PolicyRequest) -> Verdict | None:
        recipient = request.recipient
        if len(recipient) > MAX_ADDRESS or len(recipient.rpartition("@")[0]) > MAX_LOCAL_PART:
            return Verdict.refuse(Action.REJECT, "recipient address too long",
                                  reject("Bad recipient address syntax", REJECT_BAD_ADDRESS))
        address = lookup_key(recipient, self.settings.recipient_delimiter)
        if address is None:
            return Verdict.accept("recipient is not a full address; not checked")
        if self.domains and address.rpartition("@")[2] not in self.domains:
            return None
        found = await self._cached(address)
        if found is None:
            found = await self.lookup(address)
            self._store(address, found)
        request.mailboxes = found.mailboxes
        if found.status is Status.FOUND:
            return Verdict.accept(f"recipient known ({found.source or 'cache'})")
        if found.status is Status.DISABLED:
            return Verdict.refuse(Action.REJECT, f"recipient account disabled ({found.source or 'cache'})",
                                  reject(self.settings.disabled_text, REJECT_DISABLED_MAILBOX))
        return Verdict.refuse(Action.REJECT, f"recipient unknown ({found.source or 'cache'})",
                              reject(self.settings.unknown_text, REJECT_UNKNOWN_USER))

    async def lookup(self, address: str) -> Lookup:
        failure: BackendError | None = None
        for source in self.sources:
            try:
                found = await source.lookup(address)
            except BackendError as exc:
                failure = failure or exc
                continue
            if found.status is not Status.UNKNOWN:
                return found
        if failure is not None:
            raise failure  # nobody knows it and a source could not answer: not a 550
        return Lookup(Status.UNKNOWN, (), ",".join(source.name for source in self.sources))

    async def _cached(self, address: str) -> Lookup | None:
        try:
            raw = await self.redis.call("GET", self._key(address))
        except BackendError:
            return None  # a cache that fails is a miss
        if not isinstance(raw, bytes):
            return None
        kind, _, mailboxes = raw.decode().partition(":")
        status = {"f": Status.FOUND, "d": Status.DISABLED, "u": Status.UNKNOWN}.get(kind)
        if status is None:
            return None
        return Lookup(status, tuple(m for m in mailboxes.split(",") if m))

    def _store(self, address: str, found: Lookup) -> None:
        ttl = self.settings.negative_cache_ttl if found.status is Status.UNKNOWN else self.settings.cache_ttl
        if ttl <= 0:
            return
        value = f"{found.status.value[0]}:{','.join(found.mailboxes)}"
        future = self.redis.call("SET", self._key(address), value, "EX", int(ttl))
        future.add_done_callback(_ignore_failure)

    def _key(self, address: str) -> str:
        return f"{self.prefix}{keys.RECIPIENT}{keys.digest(address)}"


def _ignore_failure(future: object) -> None:
    exc = future.exception()  # type: ignore[attr-defined]
    if exc is not None:
        log_kv(log, logging.DEBUG, "recipient cache write failed", error=str(exc))
