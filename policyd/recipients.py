"""Recipient verification at the border: a recipient of our domains that no source knows is refused at
RCPT with 550 5.1.1, before any content is accepted, so the relay never accepts mail it would have to
bounce to a (likely forged) sender later. A disabled account gets 550 5.2.1.

Sources (file, SQL, LDAP; mailwarden/directory.py) are asked in order; the first that knows the address
decides. When a source cannot answer and no other knows the address, the check fails with that source's
BackendError: its fail mode (defer by default) applies, never a 550. Answers are cached in Redis, known
addresses for ``cache_ttl`` and unknown ones for the shorter ``negative_cache_ttl``.
"""

from __future__ import annotations

from pydantic import field_validator

from mailwarden.backend import BackendError
from mailwarden.decision import Action
from mailwarden.directory import Directory, DirectorySettings, Lookup, Status, lookup_key
from mailwarden.redis_pipe import PipelinedRedis
from mailwarden.units import Duration
from policyd import keys
from policyd.check import Check
from policyd.request import PolicyRequest
from policyd.verdict import REJECT_BAD_ADDRESS, REJECT_DISABLED_MAILBOX, REJECT_UNKNOWN_USER, Verdict, reject


class RecipientSettings(DirectorySettings):
    """Recipient verification: unknown recipients of our domains refused at RCPT, before any content. The
    sources are also where the milters find an address's mailbox."""

    domains: list[str] = []
    """Our domains; recipients elsewhere are not checked. Empty: every recipient is checked."""
    cache_ttl: Duration = 600
    negative_cache_ttl: Duration = 60
    unknown_text: str = "User unknown"
    disabled_text: str = "Mailbox disabled"

    @field_validator("domains")
    @classmethod
    def _lower(cls, domains: list[str]) -> list[str]:
        return [domain.lower().strip(".") for domain in domains]



MAX_ADDRESS = 254
MAX_LOCAL_PART = 64


class RecipientCheck(Check):
    name = "recipients"
    dependency = "ldap"

    def __init__(self, settings: RecipientSettings, redis_pipe: PipelinedRedis, prefix: str) -> None:
        self.settings = settings
        self.redis = redis_pipe
        self.prefix = prefix
        self.domains = set(settings.domains)
        self.dependency = settings.sources[0]  # type: ignore[misc]  # whose fail mode a time-out takes
        self.directory = Directory(settings)

    def stop(self) -> None:
        self.directory.close()

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
            found = await self.directory.lookup(address)
            self._store(address, found)
        request.mailboxes = found.mailboxes
        if found.status is Status.FOUND:
            return Verdict.accept(f"recipient known ({found.source or 'cache'})")
        if found.status is Status.DISABLED:
            return Verdict.refuse(Action.REJECT, f"recipient account disabled ({found.source or 'cache'})",
                                  reject(self.settings.disabled_text, REJECT_DISABLED_MAILBOX))
        return Verdict.refuse(Action.REJECT, f"recipient unknown ({found.source or 'cache'})",
                              reject(self.settings.unknown_text, REJECT_UNKNOWN_USER))

    async def _cached(self, address: str) -> Lookup | None:
        try:
            raw = await self.redis.ask("GET", self._key(address))
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
        self.redis.post("SET", self._key(address), value, "EX", int(ttl))

    def _key(self, address: str) -> str:
        return f"{self.prefix}{keys.RECIPIENT}{keys.digest(address)}"
