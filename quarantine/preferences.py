"""Per-recipient spam preferences: score levels and sender white/black lists, in the quarantine's database.

The SpamAssassin milter reads them for every recipient of every message (``levels_for``, ``sender_verdict``);
``mailwarden spam levels|senders`` and the digest replies (``WHITELIST``, ``BLOCK``) write them. They live in
the catalogue's database (``[quarantine] database_url``, tables ``spam_levels`` and ``spam_senders``), so
every MX host, the CLI and the reply handler share them.

**Owners.** Each row belongs to a mailbox (``alice@example.org``) or to a whole domain (``@example.org``),
stored in lower case. A mailbox's own row comes first, its domain's second: a user's own choice beats their
domain's default. Give the mailbox the milter files held mail under (aliases resolved), not an alias.

**Levels.** ``levels_for(mailbox)`` gives each of tag, hold and reject separately: the mailbox's own value,
else its domain's, else None (the caller applies its configured default). A row's own levels must be in
order, tag <= hold <= reject, among those it sets; values inherited from the domain are not checked against
them (each level is compared with the score on its own). ``set_levels`` replaces the owner's row: a level
not given is not set, and falls back.

**Sender patterns.** Lower case, compared case-insensitively; ``*``, ``?`` and ``[...]`` are fnmatch's
wildcards (no ``/`` or path rules: ``*`` matches dots too).

- with an ``@``: the whole address, local part and domain matched each on its own: ``bob@example.com``,
  ``*@example.com``, ``*@*.example.com`` (subdomains only), ``bounce-*@lists.example.com``;
- without: the domain of the address: ``example.com`` (that domain exactly, not its subdomains),
  ``*.example.com`` (its subdomains, not itself).

A pattern whose domain part has no letter or digit (``*``, ``*@*``) is refused: it would match every sender.

**Which entry decides.** The milter passes the envelope sender and the header From address; an entry that
matches any of them counts. The null sender ("") and anything that is not an address match nothing.

1. The mailbox's own entries first; only when none of them matches, its domain's.
2. Within one owner, the most specific matching pattern wins, because an exact entry is a deliberate
   choice and a broad one a default: an exact address, then an address with wildcards, then an exact
   domain, then a domain wildcard. So ``*@example.com`` black and ``boss@example.com`` white let the boss
   through.
3. On equal specificity, black wins (two entries equally precise and contradictory: the safe side).

**Caching.** Reads are cached per owner for ``cache_ttl`` seconds (60 by default), a missing row or an empty
list too, so the milter asks the database at most once a minute per recipient mailbox and domain. A lookup
that misses asks for the mailbox and its domain in one query, bounded: a levels row per owner, at most
``MAX_SENDERS`` entries per owner. A write through the same ``SpamPreferences`` drops that owner's cached
entry at once; a write elsewhere (the CLI, another host, the reply handler) is seen within ``cache_ttl``.
Two writers of the same new row at once are fine: on MariaDB the one picked as a deadlock's victim runs
again (``QuarantineStore.write_transaction``); the later write wins.

**Failures.** A database failure raises the store's ``StoreError`` (saying what failed and what to do), in
the read path too: the milter decides its fail mode. Thread-safe: the milter's worker threads share one
object (one Engine; the cache behind a lock, the queries outside it).
"""

from __future__ import annotations

import datetime
import fnmatch
import itertools
import logging
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from enum import IntEnum, StrEnum
from typing import Any, TypeVar

import sqlalchemy as sa

from mailwarden.logs import get_logger, log_kv
from mailwarden.ttl_cache import MISSING, TtlCache
from quarantine.models import SpamLevels, SpamSender
from quarantine.store import QuarantineStore

log = get_logger("quarantine.preferences")

CACHE_TTL = 60.0
"""Seconds a read is cached per owner."""
V = TypeVar("V")

CACHE_OWNERS = 100_000
"""Owners kept in each cache at most (the least recently fetched go first)."""
MAX_SENDERS = 1000
"""Entries one owner may have: every lookup reads them all, so their number is bounded."""


class Kind(StrEnum):
    WHITE = "white"
    """Deliver to that recipient whatever the score."""
    BLACK = "black"
    """Quarantine for that recipient whatever the score."""


class Specificity(IntEnum):
    """How precise a pattern is; the higher wins within one owner."""

    DOMAIN_WILDCARD = 1
    DOMAIN = 2
    ADDRESS_WILDCARD = 3
    ADDRESS = 4


@dataclass(frozen=True)
class Levels:
    """Score levels; None: not set here (the caller's default applies)."""

    tag: float | None
    hold: float | None
    reject: float | None


NO_LEVELS = Levels(None, None, None)


@dataclass(frozen=True)
class LevelsEntry:
    """One row of ``spam_levels``."""

    owner: str
    tag: float | None
    hold: float | None
    reject: float | None
    changed_at: datetime.datetime
    changed_by: str

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "changed_at": self.changed_at.isoformat()}


@dataclass(frozen=True)
class SenderEntry:
    """One row of ``spam_senders``."""

    owner: str
    pattern: str
    kind: Kind
    created_at: datetime.datetime
    created_by: str

    @property
    def specificity(self) -> Specificity:
        return Pattern.parse(self.pattern).specificity

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kind": str(self.kind), "created_at": self.created_at.isoformat(),
                "specificity": self.specificity.name.lower()}


@dataclass(frozen=True)
class Decision:
    """The entry that decided a sender verdict, and the sender it matched."""

    kind: Kind
    owner: str
    pattern: str
    specificity: Specificity
    sender: str

    def as_dict(self) -> dict[str, Any]:
        return {"verdict": str(self.kind), "owner": self.owner, "pattern": self.pattern,
                "specificity": self.specificity.name.lower(), "sender": self.sender}


# -- owners, patterns, senders -------------------------------------------------------------------------

_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_DOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_LOCAL = re.compile(r"[^\s@<>\"\\]{1,64}")
"""A local part, of an owner or a pattern: what SMTP carries unquoted, loosely (UTF-8 included)."""
_WILDCARDS = frozenset("*?[")
_PATTERN_DOMAIN = re.compile(r"[a-z0-9_.*?\[\]!-]{1,255}")


def parse_owner(text: str) -> str:
    """``alice@example.org`` or ``@example.org``, lower case; ValueError saying what is wrong."""
    owner = text.strip().lower().rstrip(".")
    if "@" not in owner:
        raise ValueError(f"owner {text!r}: give a mailbox address (alice@example.org) or a domain with its @ "
                         "(@example.org)")
    local, _, domain = owner.rpartition("@")
    if len(domain) > 255 or not _DOMAIN.fullmatch(domain):
        raise ValueError(f"owner {text!r}: {domain!r} is not a domain name (letters, digits, hyphens and dots; "
                         "an internationalised domain in its xn-- form)")
    if local and not _WILDCARDS.isdisjoint(local):
        raise ValueError(f"owner {text!r}: an owner is one mailbox or one domain, without wildcards (every "
                         "mailbox of a domain: @example.org)")
    if local and not _LOCAL.fullmatch(local):
        raise ValueError(f"owner {text!r}: {local!r} is not the local part of an address (at most 64 characters, "
                         "no spaces, quotes, backslashes or angle brackets)")
    return owner


def owners_of(owner: str) -> tuple[str, ...]:
    """The owners whose rows apply to ``owner`` (parsed), its own first: (mailbox, @domain), or (@domain,)."""
    if owner.startswith("@"):
        return (owner,)
    return (owner, "@" + owner.rpartition("@")[2])


def _wild(text: str) -> bool:
    return not _WILDCARDS.isdisjoint(text)


@dataclass(frozen=True)
class Pattern:
    """A sender pattern, parsed: ``local`` None for a domain pattern."""

    text: str
    local: str | None
    domain: str
    specificity: Specificity

    @classmethod
    def parse(cls, text: str) -> Pattern:
        """ValueError saying what is wrong."""
        pattern = text.strip().lower().rstrip(".")
        if pattern.count("@") > 1:
            raise ValueError(f"sender pattern {text!r}: more than one @")
        local: str | None
        local, at, domain = pattern.rpartition("@")
        if not at:
            local = None
        elif not local:
            raise ValueError(f"sender pattern {text!r}: give a local part before the @ (bob@example.com, "
                             "*@example.com), or a domain without @ (example.com, *.example.com)")
        elif not _LOCAL.fullmatch(local):
            raise ValueError(f"sender pattern {text!r}: {local!r} is not a local part (at most 64 characters, no "
                             "spaces, quotes, backslashes or angle brackets)")
        if not _PATTERN_DOMAIN.fullmatch(domain):
            raise ValueError(f"sender pattern {text!r}: {domain!r} is not a domain or a domain pattern (letters, "
                             "digits, hyphens, dots and the wildcards * ? [...])")
        if not re.search(r"[a-z0-9]", domain):
            raise ValueError(f"sender pattern {text!r} would match every sender: name a domain "
                             "(example.com, *.example.com, *@example.com)")
        if local is None:
            specificity = Specificity.DOMAIN_WILDCARD if _wild(domain) else Specificity.DOMAIN
        else:
            specificity = Specificity.ADDRESS_WILDCARD if _wild(pattern) else Specificity.ADDRESS
        return cls(pattern, local, domain, specificity)

    def matches(self, local: str, domain: str) -> bool:
        """Whether the address ``local@domain`` (lower case) matches."""
        if not fnmatch.fnmatchcase(domain, self.domain):
            return False
        return self.local is None or fnmatch.fnmatchcase(local, self.local)


def split_sender(sender: str) -> tuple[str, str] | None:
    """(local part, domain) of a sender address, lower case; None for the null sender or a non-address."""
    address = sender.strip().strip("<>").strip().lower().rstrip(".")
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    return local, domain


@dataclass(frozen=True)
class _Entry:
    pattern: Pattern
    kind: Kind


def decide(entries: Iterable[tuple[str, Iterable[_Entry]]], senders: Iterable[str]) -> Decision | None:
    """The rules of the module docstring: ``entries`` per owner, the first owner's first."""
    addresses = [(sender, parts) for sender in senders if (parts := split_sender(sender)) is not None]
    if not addresses:
        return None
    for owner, owned in entries:
        best: Decision | None = None
        for entry in owned:
            if best is not None and (entry.pattern.specificity, entry.kind == Kind.BLACK) <= (
                    best.specificity, best.kind == Kind.BLACK):
                continue
            for sender, (local, domain) in addresses:
                if entry.pattern.matches(local, domain):
                    best = Decision(entry.kind, owner, entry.pattern.text, entry.pattern.specificity, sender)
                    break
        if best is not None:
            return best
    return None


def _level(name: str, value: float | None) -> float | None:
    if value is None:
        return None
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} level {value!r}: give a finite number")
    return number


def check_levels(tag: float | None, hold: float | None, reject: float | None) -> None:
    """ValueError unless tag <= hold <= reject among the levels given."""
    given = [(name, value) for name, value in (("tag", tag), ("hold", hold), ("reject", reject))
             if value is not None]
    for (low_name, low), (high_name, high) in itertools.pairwise(given):
        if low > high:
            raise ValueError(f"the {low_name} level ({low:g}) is above the {high_name} level ({high:g}): "
                             "levels must be tag <= hold <= reject, among those set")


# -- the cache -----------------------------------------------------------------------------------------

class _Unchanged(Exception):
    """add_sender: the entry is there already (the transaction is left without a change)."""


# -- the preferences -----------------------------------------------------------------------------------


class SpamPreferences:
    """Levels and sender lists of the store's database; thread-safe, reads cached (see the module)."""

    def __init__(self, store: QuarantineStore, cache_ttl: float = CACHE_TTL,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.store = store
        self._levels: TtlCache[Levels | None] = TtlCache(cache_ttl, now, CACHE_OWNERS)
        self._senders: TtlCache[tuple[_Entry, ...]] = TtlCache(cache_ttl, now, CACHE_OWNERS)

    # -- the milter's reads --------------------------------------------------------------------------------

    def levels_for(self, mailbox: str) -> Levels:
        """Each level: the mailbox's own, else its domain's, else None. An address that cannot be an owner
        has no preferences (None for all three)."""
        try:
            owners = owners_of(parse_owner(mailbox))
        except ValueError:
            return NO_LEVELS
        rows = self._cached(self._levels, owners, self._fetch_levels)
        found = [row for row in (rows[owner] for owner in owners) if row is not None]

        def first(name: str) -> float | None:
            return next((value for row in found if (value := getattr(row, name)) is not None), None)

        return Levels(first("tag"), first("hold"), first("reject"))

    def sender_verdict(self, mailbox: str, senders: Iterable[str]) -> Kind | None:
        """White, black, or None (no entry matches: the score decides); ``senders`` are the envelope sender
        and the header From address. Kind is a str: ``Kind.WHITE == "white"``."""
        decision = self.explain(mailbox, senders)
        return None if decision is None else decision.kind

    def explain(self, mailbox: str, senders: Iterable[str]) -> Decision | None:
        """The entry that decides ``sender_verdict``, with the sender it matched."""
        senders = list(senders)
        if not any(split_sender(sender) for sender in senders):
            return None  # the null sender: not worth a query
        try:
            owners = owners_of(parse_owner(mailbox))
        except ValueError:
            return None
        entries = self._cached(self._senders, owners, self._fetch_senders)
        return decide(((owner, entries[owner]) for owner in owners), senders)

    def _cached(self, cache: TtlCache[V], owners: tuple[str, ...],
                fetch: Callable[[list[str]], dict[str, V]]) -> dict[str, V]:
        values: dict[str, Any] = {owner: cache.get(owner) for owner in owners}
        missing = [owner for owner, value in values.items() if value is MISSING]
        if missing:
            generation = cache.generation
            fetched = fetch(missing)
            cache.put(fetched, generation)
            values.update(fetched)
        return values

    def _fetch_levels(self, owners: list[str]) -> dict[str, Levels | None]:
        found: dict[str, Levels | None] = dict.fromkeys(owners)
        with self.store.reading("read spam levels") as conn:
            for owner, tag, hold, reject in conn.execute(
                    sa.select(SpamLevels.owner, SpamLevels.tag_level, SpamLevels.hold_level, SpamLevels.reject_level)
                    .where(SpamLevels.owner.in_(owners))):
                found[owner] = Levels(tag, hold, reject)
        return found

    def _fetch_senders(self, owners: list[str]) -> dict[str, tuple[_Entry, ...]]:
        limit = MAX_SENDERS * len(owners)
        with self.store.reading("read spam sender lists") as conn:
            rows = conn.execute(sa.select(SpamSender.owner, SpamSender.pattern, SpamSender.kind)
                                .where(SpamSender.owner.in_(owners)).limit(limit)).all()
        if len(rows) >= limit:
            log_kv(log, logging.WARNING, "too many sender entries: some are not consulted", owners=",".join(owners),
                   limit=limit)
        found: dict[str, list[_Entry]] = {owner: [] for owner in owners}
        for owner, pattern, kind in rows:
            try:
                found[owner].append(_Entry(Pattern.parse(pattern), Kind(kind)))
            except ValueError as exc:  # written by hand, or by a newer version: skipped, said once a fetch
                log_kv(log, logging.WARNING, "sender entry skipped", owner=owner, pattern=pattern, error=str(exc))
        return {owner: tuple(entries) for owner, entries in found.items()}

    # -- writes ------------------------------------------------------------------------------------------

    def set_levels(self, owner: str, *, tag: float | None = None, hold: float | None = None,
                   reject: float | None = None, by: str) -> None:
        """Replace the owner's levels with these (a level not given is not set: it falls back); ValueError
        for a bad owner, no level at all, or levels out of order."""
        owner = parse_owner(owner)
        tag, hold, reject = _level("tag", tag), _level("hold", hold), _level("reject", reject)
        if tag is None and hold is None and reject is None:
            raise ValueError("give at least one level (tag, hold or reject); clear_levels removes them all")
        check_levels(tag, hold, reject)
        values = {"tag_level": tag, "hold_level": hold, "reject_level": reject,
                  "changed_at": self.store.now(), "changed_by": by[:255]}
        update = sa.update(SpamLevels).where(SpamLevels.owner == owner).values(**values)

        def upsert(conn: sa.Connection) -> None:
            if conn.execute(update).rowcount == 0:
                try:
                    with conn.begin_nested():
                        conn.execute(sa.insert(SpamLevels).values(owner=owner, **values))
                except sa.exc.IntegrityError:  # inserted meanwhile by another writer (MariaDB): ours is later
                    conn.execute(update)

        self.store.write_transaction("set spam levels", upsert)
        self._levels.invalidate(owner)
        log_kv(log, logging.INFO, "spam levels set", owner=owner, tag=tag, hold=hold, reject=reject, by=by)

    def clear_levels(self, owner: str) -> bool:
        """Remove the owner's levels; False if it had none."""
        owner = parse_owner(owner)
        removed = self.store.write_transaction("clear spam levels", lambda conn: conn.execute(
            sa.delete(SpamLevels).where(SpamLevels.owner == owner)).rowcount > 0)
        self._levels.invalidate(owner)
        if removed:
            log_kv(log, logging.INFO, "spam levels cleared", owner=owner)
        return removed

    def add_sender(self, owner: str, pattern: str, kind: str, by: str) -> bool:
        """Add ``pattern`` to the owner's white or black list; False if it is there already with that kind
        (an entry of the other kind changes kind). ValueError for a bad owner, pattern or kind, or an owner
        with MAX_SENDERS entries."""
        owner = parse_owner(owner)
        text = Pattern.parse(pattern).text
        try:
            wanted = Kind(kind)
        except ValueError:
            raise ValueError(f"kind {kind!r}: 'white' or 'black'") from None
        values = {"kind": wanted.value, "created_at": self.store.now(), "created_by": by[:255]}
        this = (SpamSender.owner == owner, SpamSender.pattern == text)

        def add(conn: sa.Connection) -> str | None:
            """The kind it had before (None: a new entry); raises _Unchanged when it is there already."""
            existing = conn.execute(sa.select(SpamSender.kind).where(*this)).scalar()
            if existing == wanted:
                raise _Unchanged
            if existing is not None:
                conn.execute(sa.update(SpamSender).where(*this).values(**values))
                return str(existing)
            count = conn.execute(sa.select(sa.func.count()).select_from(SpamSender)
                                 .where(SpamSender.owner == owner)).scalar_one()
            if count >= MAX_SENDERS:
                raise ValueError(f"{owner} has {count} sender entries, the most kept: remove some first")
            try:
                with conn.begin_nested():
                    conn.execute(sa.insert(SpamSender).values(owner=owner, pattern=text, **values))
            except sa.exc.IntegrityError:  # added meanwhile by another writer (MariaDB)
                raise _Unchanged from None
            return None

        try:
            was = self.store.write_transaction("add a spam sender entry", add)
        except _Unchanged:
            return False
        self._senders.invalidate(owner)
        log_kv(log, logging.INFO, "spam sender entry added", owner=owner, pattern=text, kind=wanted.value, by=by,
               **({"was": was} if was else {}))
        return True

    def remove_sender(self, owner: str, pattern: str) -> bool:
        """Remove the owner's entry for ``pattern`` (either kind); False if there was none."""
        owner = parse_owner(owner)
        text = Pattern.parse(pattern).text
        removed = self.store.write_transaction("remove a spam sender entry", lambda conn: conn.execute(
            sa.delete(SpamSender).where(SpamSender.owner == owner, SpamSender.pattern == text)).rowcount > 0)
        self._senders.invalidate(owner)
        if removed:
            log_kv(log, logging.INFO, "spam sender entry removed", owner=owner, pattern=text)
        return removed

    # -- listings (the CLI) --------------------------------------------------------------------------------

    def levels(self, owner: str | None = None) -> list[LevelsEntry]:
        """Every row, by owner; with ``owner``, the rows that apply to it: its own, then its domain's."""
        query = sa.select(SpamLevels)
        owners: tuple[str, ...] = ()
        if owner is not None:
            owners = owners_of(parse_owner(owner))
            query = query.where(SpamLevels.owner.in_(owners))
        with self.store.reading_session("list spam levels") as session:
            rows = [LevelsEntry(row.owner, row.tag_level, row.hold_level, row.reject_level, row.changed_at,
                                row.changed_by) for row in session.scalars(query.order_by(SpamLevels.owner))]
        return sorted(rows, key=lambda row: owners.index(row.owner)) if owners else rows

    def senders(self, owner: str | None = None) -> list[SenderEntry]:
        """Every entry, by owner, kind and pattern; with ``owner``, the entries that apply to it: its own,
        then its domain's."""
        query = sa.select(SpamSender)
        owners: tuple[str, ...] = ()
        if owner is not None:
            owners = owners_of(parse_owner(owner))
            query = query.where(SpamSender.owner.in_(owners))
        query = query.order_by(SpamSender.owner, SpamSender.kind, SpamSender.pattern)
        with self.store.reading_session("list spam sender entries") as session:
            rows = [SenderEntry(row.owner, row.pattern, Kind(row.kind), row.created_at, row.created_by)
                    for row in session.scalars(query)]
        return sorted(rows, key=lambda row: owners.index(row.owner)) if owners else rows
