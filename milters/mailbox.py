"""Which mailbox a recipient's mail belongs to, through the border checks' recipient sources.

A held copy is filed under its mailbox, so the owner finds mail sent to an alias or a +extension among
their own (the quarantine CLI, the digest); the SpamAssassin milter asks spamd as that mailbox, so an alias
gets its mailbox's thresholds, lists and Bayes. The sources are policyd's (``[policyd.recipients]``:
file, SQL, LDAP), asked from the milter's thread and cached for their ``cache_ttl``.

An alias that delivers to several mailboxes (a list) has no one owner: its mail stays filed under the
alias address. A source that cannot answer costs nothing but the filing: the address itself (without
its extension) is used and a warning logged; policyd has already verified the recipient at RCPT.
"""

from __future__ import annotations

import logging
import time

from mailwarden.backend import BackendError
from mailwarden.directory import Directory, DirectorySettings, Status, lookup_key
from mailwarden.logs import get_logger, log_kv
from mailwarden.ttl_cache import TtlCache

log = get_logger("milter")

CACHE_ENTRIES = 10_000
"""Addresses kept; when full the least recently stored go first."""


class MailboxResolver:
    """``resolver(recipient)`` is the recipient's mailbox: the directory's answer when it has exactly one,
    else the address in lower case without its extension."""

    def __init__(self, settings: DirectorySettings, cache_ttl: float) -> None:
        self.settings = settings
        self.delimiter = settings.recipient_delimiter
        self.configured = settings.missing() is None
        self.directory: Directory | None = None
        """Opened at the first lookup (a map that cannot be read then is tried again at the next)."""
        self.cache_ttl = cache_ttl
        self._cache: TtlCache[str] = TtlCache(cache_ttl, time.monotonic, CACHE_ENTRIES)

    def __call__(self, recipient: str) -> str:
        address = lookup_key(recipient, self.delimiter)
        if address is None:
            return recipient.strip().lower()
        if not self.configured:
            return address
        cached = self._cache.get(address)
        if isinstance(cached, str):
            return cached
        generation = self._cache.generation
        mailbox = self._ask(address)
        if mailbox is None:
            return address  # not cached: the next message asks again
        self._cache.put({address: mailbox}, generation)
        return mailbox

    def _ask(self, address: str) -> str | None:
        """The mailbox, or None when no source could answer."""
        try:
            if self.directory is None:
                self.directory = Directory(self.settings)
            found = self.directory.find(address)
        except BackendError as exc:
            log_kv(log, logging.WARNING, "recipient sources cannot answer; mail filed under the address",
                   address=address, error=str(exc))
            return None
        if found.status is Status.UNKNOWN or len(found.mailboxes) != 1:
            return address
        return found.mailboxes[0]

    def close(self) -> None:
        if self.directory is not None:
            self.directory.close()
