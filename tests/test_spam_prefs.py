"""The per-recipient spam preferences (quarantine/preferences.py) on a real SQLite file and a real MariaDB:
the matching and precedence rules (a table), the levels' fall-back to the domain, the cache (one query per
lookup, a write through the same object seen at once, any other after cache_ttl, on an injected clock),
reads from many threads while one writes, a database that fails; and ``mailwarden spam`` as the postmaster
runs it (a subprocess), with --json and the documented exit codes."""

from __future__ import annotations

import datetime
import json
import math
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from harness.policyd_proc import render_toml
from test_quarantine_store import db_url, settings_for  # noqa: F401  (db_url: the fixture of both backends)

from mailwarden.ttl_cache import TtlCache
from quarantine import preferences as prefs_module
from quarantine import schema
from quarantine.preferences import (
    NO_LEVELS,
    Kind,
    Levels,
    Pattern,
    SpamPreferences,
    Specificity,
    parse_owner,
)
from quarantine.store import QuarantineStore, SchemaBehind, StoreError


class Clock:
    """Monotonic seconds, moved by the test."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store(db_url: str, tmp_path: Path) -> Iterator[QuarantineStore]:  # noqa: F811
    quarantine = QuarantineStore(settings_for(db_url, tmp_path))
    quarantine.migrate()
    yield quarantine
    quarantine.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def prefs(store: QuarantineStore, clock: Clock) -> SpamPreferences:
    return SpamPreferences(store, cache_ttl=60, now=clock)


class Queries:
    """Counts the statements that read the preference tables."""

    def __init__(self, engine: sa.Engine) -> None:
        self.count = 0
        self.statements: list[str] = []
        sa.event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT") and ("spam_levels" in statement
                                                                or "spam_senders" in statement):
            self.count += 1
            self.statements.append(statement)


# -- patterns and owners --------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "normal", "specificity"), [
    ("bob@example.com", "bob@example.com", Specificity.ADDRESS),
    ("Bob@Example.COM", "bob@example.com", Specificity.ADDRESS),
    ("*@example.com", "*@example.com", Specificity.ADDRESS_WILDCARD),
    ("*@*.example.com", "*@*.example.com", Specificity.ADDRESS_WILDCARD),
    ("bounce-?@lists.example.com", "bounce-?@lists.example.com", Specificity.ADDRESS_WILDCARD),
    ("example.com", "example.com", Specificity.DOMAIN),
    ("example.com.", "example.com", Specificity.DOMAIN),
    ("*.example.com", "*.example.com", Specificity.DOMAIN_WILDCARD),
    ("*@*.com", "*@*.com", Specificity.ADDRESS_WILDCARD),
])
def test_patterns_parse_to_their_specificity(text: str, normal: str, specificity: Specificity) -> None:
    pattern = Pattern.parse(text)
    assert (pattern.text, pattern.specificity) == (normal, specificity)


@pytest.mark.parametrize(("text", "why"), [
    ("*", "every sender"), ("*@*", "every sender"), ("*.*", "every sender"), ("a@b@example.com", "more than one @"),
    ("@example.com", "local part"), ("bob@", "not a domain"), ("bob@exa mple.com", "not a domain"),
    ("bo b@example.com", "local part"), ("", "not a domain"), ("x" * 65 + "@example.com", "not a local part"),
    ("bob@" + "x" * 300 + ".com", "not a domain"),
])
def test_bad_patterns_are_refused_saying_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Pattern.parse(text)


@pytest.mark.parametrize(("text", "owner"), [
    ("Alice@Example.org", "alice@example.org"), ("@Example.org", "@example.org"), (" @example.org. ", "@example.org"),
])
def test_owners_are_lower_case(text: str, owner: str) -> None:
    assert parse_owner(text) == owner


@pytest.mark.parametrize(("text", "why"), [
    ("example.org", "give a mailbox address"), ("alice@", "not a domain name"), ("@", "not a domain name"),
    ("*@example.org", "without wildcards"), ("al ice@example.org", "not the local part"),
    ("alice@exa_mple..org", "not a domain name"), ("a" * 65 + "@example.org", "not the local part"),
])
def test_bad_owners_are_refused_saying_why(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        parse_owner(text)


# -- which entry decides: the table ---------------------------------------------------------------------

W, B = "white", "black"
# (the mailbox's own entries, its domain's entries, the senders, the verdict, the pattern that decides)
RULES: list[tuple[str, list[tuple[str, str]], list[tuple[str, str]], list[str], str | None, str | None]] = [
    ("nothing listed", [], [], ["bob@x.example"], None, None),
    ("an exact address", [("bob@x.example", B)], [], ["bob@x.example"], B, "bob@x.example"),
    ("case does not matter", [("bob@x.example", W)], [], ["BOB@X.Example"], W, "bob@x.example"),
    ("angle brackets as in MAIL FROM", [("bob@x.example", W)], [], ["<bob@x.example>"], W, "bob@x.example"),
    ("exact address over address wildcard", [("*@x.example", B), ("boss@x.example", W)], [], ["boss@x.example"],
     W, "boss@x.example"),
    ("address wildcard over exact domain", [("x.example", W), ("*@x.example", B)], [], ["a@x.example"],
     B, "*@x.example"),
    ("exact domain over domain wildcard", [("*x.example", B), ("x.example", W)], [], ["a@x.example"],
     W, "x.example"),
    ("a domain is that domain, not its subdomains", [("x.example", B)], [], ["a@sub.x.example"], None, None),
    ("a domain wildcard is the subdomains", [("*.x.example", B)], [], ["a@sub.x.example"], B, "*.x.example"),
    ("... not the domain itself", [("*.x.example", B)], [], ["a@x.example"], None, None),
    ("an address pattern's domain wildcard", [("*@*.x.example", B)], [], ["a@deep.sub.x.example"], B,
     "*@*.x.example"),
    ("... not the domain itself either", [("*@*.x.example", B)], [], ["a@x.example"], None, None),
    ("? is one character", [("a?c@x.example", B)], [], ["abc@x.example"], B, "a?c@x.example"),
    ("the local part is matched on its own (a quoted @ in it)", [("bob@*x.example", B)], [],
     ["bob@evil@x.example"], None, None),
    ("equal specificity: black wins (address wildcards)", [("*@x.example", W), ("b*@x.example", B)], [],
     ["bob@x.example"], B, "b*@x.example"),
    ("equal specificity: black wins (domain wildcards)", [("*.sub.x.example", W), ("*.x.example", B)], [],
     ["a@b.sub.x.example"], B, "*.x.example"),
    ("equal specificity across the two senders: black wins", [("x.example", W), ("y.example", B)], [],
     ["a@x.example", "b@y.example"], B, "y.example"),
    ("the From address counts as the envelope sender does", [("bob@x.example", B)], [],
     ["bounce-123@esp.example", "bob@x.example"], B, "bob@x.example"),
    ("the most specific across both senders", [("esp.example", W), ("bob@x.example", B)], [],
     ["bounce@esp.example", "bob@x.example"], B, "bob@x.example"),
    ("the mailbox's own entry beats the domain's, however broad", [("*.x.example", W)],
     [("bob@sub.x.example", B)], ["bob@sub.x.example"], W, "*.x.example"),
    ("the domain's entry when none of the mailbox's matches", [("y.example", W)], [("x.example", B)],
     ["a@x.example"], B, "x.example"),
    ("the domain's entries follow the same rules", [], [("*@x.example", B), ("boss@x.example", W)],
     ["boss@x.example"], W, "boss@x.example"),
    ("the null sender matches nothing", [("x.example", B)], [("x.example", B)], [""], None, None),
    ("the null sender beside a From that matches", [], [("x.example", B)], ["", "a@x.example"], B, "x.example"),
    ("a sender that is no address matches nothing", [("x.example", B)], [], ["MAILER-DAEMON", "@x.example"],
     None, None),
]


def test_matching_and_precedence(prefs: SpamPreferences) -> None:
    """Every row of RULES at once: row i is the mailbox user@d<i>.test and its domain @d<i>.test."""
    for index, (_name, own, domain, _senders, _verdict, _pattern) in enumerate(RULES):
        for pattern, kind in own:
            assert prefs.add_sender(f"user@d{index}.test", pattern, kind, by="test")
        for pattern, kind in domain:
            assert prefs.add_sender(f"@d{index}.test", pattern, kind, by="test")
    for index, (name, _own, _domain, senders, verdict, pattern) in enumerate(RULES):
        mailbox = f"user@d{index}.test"
        decision = prefs.explain(mailbox, senders)
        assert (decision and decision.kind, decision and decision.pattern) == (verdict, pattern), name
        assert prefs.sender_verdict(mailbox, senders) == verdict, name
        if decision is not None:
            assert decision.owner == (mailbox if (pattern, verdict) in RULES[index][1] else f"@d{index}.test"), name


def test_another_domain_s_entries_do_not_apply(prefs: SpamPreferences) -> None:
    prefs.add_sender("@a.test", "x.example", "black", by="test")
    prefs.add_sender("alice@a.test", "y.example", "black", by="test")
    assert prefs.sender_verdict("bob@b.test", ["m@x.example"]) is None
    assert prefs.sender_verdict("bob@a.test", ["m@y.example"]) is None  # alice's own, not the domain's
    assert prefs.sender_verdict("bob@a.test", ["m@x.example"]) == Kind.BLACK == "black"
    assert prefs.sender_verdict("@a.test", ["m@x.example"]) == "black"  # a domain: what its mailboxes get
    assert prefs.sender_verdict("not an address", ["m@x.example"]) is None


# -- sender entries ---------------------------------------------------------------------------------------

def test_add_change_and_remove_sender_entries(prefs: SpamPreferences, store: QuarantineStore) -> None:
    assert prefs.add_sender("Alice@A.test", "Bob@X.example", "white", by="helpdesk") is True
    assert prefs.add_sender("alice@a.test", "bob@x.example", "white", by="other") is False  # already there
    assert prefs.add_sender("alice@a.test", "bob@x.example", "black", by="digest") is True  # changes kind
    [entry] = prefs.senders("alice@a.test")
    assert (entry.owner, entry.pattern, entry.kind, entry.created_by) == ("alice@a.test", "bob@x.example",
                                                                          "black", "digest")
    assert entry.created_at.tzinfo is not None
    prefs.add_sender("@a.test", "x.example", "white", by="postmaster")
    prefs.add_sender("@b.test", "x.example", "white", by="postmaster")
    assert [(e.owner, e.pattern) for e in prefs.senders("alice@a.test")] == [("alice@a.test", "bob@x.example"),
                                                                             ("@a.test", "x.example")]
    assert len(prefs.senders()) == 3
    assert prefs.remove_sender("alice@a.test", "BOB@x.example") is True
    assert prefs.remove_sender("alice@a.test", "bob@x.example") is False
    assert [e.owner for e in prefs.senders("alice@a.test")] == ["@a.test"]
    with pytest.raises(ValueError, match="'white' or 'black'"):
        prefs.add_sender("alice@a.test", "x.example", "grey", by="t")
    with pytest.raises(ValueError, match="every sender"):
        prefs.add_sender("alice@a.test", "*", "black", by="t")
    with pytest.raises(ValueError, match="give a mailbox address"):
        prefs.add_sender("a.test", "x.example", "black", by="t")


def test_an_owner_s_entries_are_bounded(prefs: SpamPreferences, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prefs_module, "MAX_SENDERS", 3)
    for number in range(3):
        assert prefs.add_sender("alice@a.test", f"s{number}.example", "black", by="t")
    with pytest.raises(ValueError, match="3 sender entries, the most kept"):
        prefs.add_sender("alice@a.test", "s3.example", "black", by="t")
    assert prefs.add_sender("alice@a.test", "s0.example", "white", by="t")  # a change of kind adds nothing
    assert prefs.add_sender("bob@a.test", "s3.example", "black", by="t")  # the bound is per owner


def test_a_row_written_by_hand_that_does_not_parse_is_skipped(prefs: SpamPreferences, store: QuarantineStore) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO spam_senders (owner, pattern, kind, created_at, created_by) VALUES "
                             "('alice@a.test', '*', 'black', :t, 'hand'), "
                             "('alice@a.test', 'x.example', 'black', :t, 'hand')"),
                     {"t": datetime.datetime(2026, 12, 1)})
    assert prefs.sender_verdict("alice@a.test", ["m@y.example"]) is None
    assert prefs.sender_verdict("alice@a.test", ["m@x.example"]) == "black"


def test_the_database_refuses_an_unknown_kind(store: QuarantineStore) -> None:
    with pytest.raises(sa.exc.DBAPIError, match="ck_spam_senders_kind"), store.engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO spam_senders (owner, pattern, kind, created_at, created_by) VALUES "
                             "('alice@a.test', 'x.example', 'grey', :t, 'hand')"),
                     {"t": datetime.datetime(2026, 12, 1)})


# -- levels -----------------------------------------------------------------------------------------------

def test_levels_fall_back_to_the_domain_level_by_level(prefs: SpamPreferences) -> None:
    assert prefs.levels_for("alice@a.test") == NO_LEVELS
    prefs.set_levels("@A.test", tag=4, hold=8, reject=20, by="postmaster")
    prefs.set_levels("alice@a.test", hold=6, by="alice")
    assert prefs.levels_for("Alice@A.test") == Levels(tag=4.0, hold=6.0, reject=20.0)
    assert prefs.levels_for("bob@a.test") == Levels(4.0, 8.0, 20.0)
    assert prefs.levels_for("@a.test") == Levels(4.0, 8.0, 20.0)
    assert prefs.levels_for("carol@b.test") == NO_LEVELS
    prefs.set_levels("carol@b.test", tag=-1.5, by="carol")  # scores can be negative
    assert prefs.levels_for("carol@b.test") == Levels(-1.5, None, None)
    assert prefs.levels_for("no address") == NO_LEVELS
    # set replaces the owner's row: a level not given is not set any more, and falls back
    prefs.set_levels("alice@a.test", tag=3, by="alice")
    assert prefs.levels_for("alice@a.test") == Levels(3.0, 8.0, 20.0)
    [own, domain] = prefs.levels("alice@a.test")
    assert (own.owner, own.tag, own.hold, own.changed_by) == ("alice@a.test", 3.0, None, "alice")
    assert (domain.owner, domain.reject) == ("@a.test", 20.0)
    assert [row.owner for row in prefs.levels()] == ["@a.test", "alice@a.test", "carol@b.test"]
    assert prefs.clear_levels("alice@a.test") is True
    assert prefs.clear_levels("alice@a.test") is False
    assert prefs.levels_for("alice@a.test") == Levels(4.0, 8.0, 20.0)


@pytest.mark.parametrize(("levels", "why"), [
    ({"tag": 9, "hold": 6}, r"the tag level \(9\) is above the hold level \(6\).*tag <= hold <= reject"),
    ({"hold": 9, "reject": 6}, r"the hold level \(9\) is above the reject level \(6\)"),
    ({"tag": 9, "reject": 6}, r"the tag level \(9\) is above the reject level \(6\)"),
    ({"tag": math.nan}, "finite"), ({"reject": math.inf}, "finite"),
    ({}, "at least one level"),
])
def test_levels_out_of_order_are_refused_naming_the_rule(prefs: SpamPreferences, levels: dict[str, float],
                                                         why: str) -> None:
    with pytest.raises(ValueError, match=why):
        prefs.set_levels("alice@a.test", **levels, by="t")
    assert prefs.levels() == []


def test_equal_levels_are_in_order(prefs: SpamPreferences) -> None:
    prefs.set_levels("alice@a.test", tag=5, hold=5, reject=5, by="t")
    assert prefs.levels_for("alice@a.test") == Levels(5.0, 5.0, 5.0)


# -- the cache ----------------------------------------------------------------------------------------------

def test_one_query_per_lookup_then_the_cache(prefs: SpamPreferences, store: QuarantineStore, clock: Clock) -> None:
    queries = Queries(store.engine)
    prefs.levels_for("alice@a.test")
    assert queries.count == 1  # the mailbox and its domain in one query
    prefs.sender_verdict("alice@a.test", ["m@x.example"])
    assert queries.count == 2
    for _ in range(5):
        prefs.levels_for("alice@a.test")
        prefs.sender_verdict("alice@a.test", ["m@x.example", "n@y.example"])
    assert queries.count == 2  # cached, an empty answer too
    prefs.levels_for("bob@a.test")  # the domain is cached: only bob is asked for
    assert queries.count == 3 and "IN" in queries.statements[-1].upper()
    prefs.sender_verdict("alice@a.test", [""])  # the null sender: nothing to look up
    clock.now += 60
    prefs.levels_for("alice@a.test")
    assert queries.count == 4
    assert all("LIMIT" in statement.upper() for statement in queries.statements if "spam_senders" in statement)


def test_a_write_through_the_object_is_seen_at_once_another_after_the_ttl(
        prefs: SpamPreferences, store: QuarantineStore, clock: Clock) -> None:
    other = SpamPreferences(store, cache_ttl=60, now=clock)  # another process: the CLI, the reply handler
    assert prefs.levels_for("alice@a.test") == NO_LEVELS
    assert prefs.sender_verdict("alice@a.test", ["m@x.example"]) is None
    other.set_levels("@a.test", tag=4, by="other")
    other.add_sender("@a.test", "x.example", "black", by="other")
    clock.now += 59.9
    assert prefs.levels_for("alice@a.test") == NO_LEVELS  # still cached
    assert prefs.sender_verdict("alice@a.test", ["m@x.example"]) is None
    clock.now += 0.1
    assert prefs.levels_for("alice@a.test") == Levels(4.0, None, None)  # expired: read again
    assert prefs.sender_verdict("alice@a.test", ["m@x.example"]) == "black"

    # through the object itself: at once, for the mailbox and for the domain it falls back to
    prefs.set_levels("alice@a.test", tag=2, by="self")
    assert prefs.levels_for("alice@a.test") == Levels(2.0, None, None)
    prefs.set_levels("@a.test", tag=3, hold=7, by="self")
    assert prefs.levels_for("alice@a.test") == Levels(2.0, 7.0, None)
    prefs.add_sender("alice@a.test", "m@x.example", "white", by="self")
    assert prefs.sender_verdict("alice@a.test", ["m@x.example"]) == "white"
    prefs.remove_sender("alice@a.test", "m@x.example")
    assert prefs.sender_verdict("alice@a.test", ["m@x.example"]) == "black"
    prefs.add_sender("@a.test", "x.example", "white", by="self")
    assert prefs.sender_verdict("alice@a.test", ["m@x.example"]) == "white"
    prefs.clear_levels("alice@a.test")
    assert prefs.levels_for("alice@a.test") == Levels(3.0, 7.0, None)


def test_a_read_that_started_before_a_write_is_not_cached() -> None:
    """The race the generation guards: a reader fetched the old value, a write invalidated, the reader's
    put comes last: it must not put the old value back for a whole TTL."""
    cache: TtlCache[int] = TtlCache(60, lambda: 0.0)
    generation = cache.generation
    cache.invalidate("alice@a.test")
    cache.put({"alice@a.test": 1}, generation)
    assert cache.get("alice@a.test") != 1
    cache.put({"alice@a.test": 2}, cache.generation)
    assert cache.get("alice@a.test") == 2


def test_the_cache_is_bounded() -> None:
    cache: TtlCache[int] = TtlCache(60, lambda: 0.0, max_owners=2)
    for number in range(3):
        cache.put({f"u{number}@a.test": number}, cache.generation)
    assert [cache.get(f"u{number}@a.test") for number in (1, 2)] == [1, 2]
    assert cache.get("u0@a.test") != 0


def test_concurrent_reads_while_the_same_object_writes(prefs: SpamPreferences, store: QuarantineStore) -> None:
    """The milter's worker threads share one object: 8 readers, a writer flipping a domain's entry and
    levels; every answer is one of the two states, never an error, and the last write is seen at once."""
    prefs.set_levels("@a.test", tag=4, by="t")
    prefs.add_sender("@a.test", "x.example", "white", by="t")
    queries = Queries(store.engine)
    errors: list[BaseException] = []
    seen: set[tuple[object, object]] = set()
    lookups = [0]
    lock = threading.Lock()
    stop = threading.Event()
    mailboxes = [f"user{number}@a.test" for number in range(20)]

    def read() -> None:
        try:
            while not stop.is_set():
                for mailbox in mailboxes:
                    pair = (prefs.levels_for(mailbox).tag, prefs.sender_verdict(mailbox, ["", "m@x.example"]))
                    with lock:
                        seen.add(pair)
                        lookups[0] += 2
        except BaseException as exc:
            errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(8)]
    for thread in readers:
        thread.start()
    try:
        for flip in range(21):  # the last one leaves 5 and black, not where the readers began
            prefs.set_levels("@a.test", tag=4 if flip % 2 else 5, by="t")
            prefs.add_sender("@a.test", "x.example", "white" if flip % 2 else "black", by="t")
    finally:
        stop.set()
        for thread in readers:
            thread.join(60)
    assert errors == []
    # never an error, never "nothing set" (a change of kind is one UPDATE); levels and verdict are two reads
    assert {tag for tag, _ in seen} <= {4.0, 5.0} and {verdict for _, verdict in seen} <= {"white", "black"}
    assert prefs.levels_for("user0@a.test").tag == 5.0
    assert prefs.sender_verdict("user0@a.test", ["m@x.example"]) == "black"
    # cached between writes: at most each reader asking for each mailbox once, and for the domain once
    # after each of the 42 writes, in each of the two caches
    assert queries.count <= 8 * 2 * (len(mailboxes) + 42) < lookups[0]


def test_concurrent_writers_of_the_same_new_rows(store: QuarantineStore) -> None:
    """Hosts and the CLI writing the same new owner at once (an insert racing an insert): no error, one row
    per owner and pattern, and add_sender True for exactly one of the racers."""
    owners = [f"user{number}@a.test" for number in range(30)]
    errors: list[BaseException] = []
    added: list[bool] = []
    lock = threading.Lock()

    def write(level: float) -> None:
        prefs = SpamPreferences(store)
        try:
            for owner in owners:
                prefs.set_levels(owner, tag=level, by="t")
                result = prefs.add_sender(owner, "x.example", "black", by="t")
                with lock:
                    added.append(result)
        except BaseException as exc:
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(float(number),)) for number in range(8)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join(60)
    assert errors == []
    assert sorted(row.owner for row in SpamPreferences(store).levels()) == sorted(owners)
    assert len(SpamPreferences(store).senders()) == len(owners) == added.count(True)


# -- failures -----------------------------------------------------------------------------------------------

def test_a_catalogue_behind_is_a_store_error_naming_the_fix(tmp_path: Path) -> None:
    store = QuarantineStore(settings_for(f"sqlite:///{tmp_path / 'q.sqlite'}", tmp_path))
    try:
        schema.upgrade(store.engine, "0001")
        prefs = SpamPreferences(store)
        with pytest.raises(SchemaBehind, match="run 'mailwarden quarantine migrate'"):
            prefs.levels_for("alice@a.test")
        with pytest.raises(SchemaBehind):
            prefs.sender_verdict("alice@a.test", ["m@x.example"])
        with pytest.raises(SchemaBehind):
            prefs.add_sender("alice@a.test", "x.example", "black", by="t")
    finally:
        store.close()


def test_stopped_mariadb_is_a_store_error_in_the_read_path_and_recovers(mariadb, tmp_path: Path) -> None:
    url = mariadb.create_database("spam_prefs_down", drop=True)
    store = QuarantineStore(settings_for(url, tmp_path, db_timeout="2s"))
    try:
        store.migrate()
        clock = Clock()
        prefs = SpamPreferences(store, now=clock)
        prefs.add_sender("@a.test", "x.example", "black", by="t")
        assert prefs.sender_verdict("alice@a.test", ["m@x.example"]) == "black"
        mariadb.stop()
        try:
            # cached answers stand for their TTL; an owner not cached is asked for, and that fails
            assert prefs.sender_verdict("alice@a.test", ["m@x.example"]) == "black"
            with pytest.raises(StoreError, match="check that it is running"):
                prefs.levels_for("alice@a.test")
            with pytest.raises(StoreError, match="check that it is running"):
                prefs.sender_verdict("bob@a.test", ["m@x.example"])
            with pytest.raises(StoreError):
                prefs.add_sender("@a.test", "y.example", "black", by="t")
        finally:
            mariadb.start()
        assert prefs.sender_verdict("bob@a.test", ["m@x.example"]) == "black"
        assert prefs.levels_for("alice@a.test") == NO_LEVELS
    finally:
        store.close()


# -- the command line -------------------------------------------------------------------------------------

def spam(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "spam", *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, "TZ": "UTC"})


def write_config(tmp_path: Path, **quarantine: object) -> Path:
    path = tmp_path / "mw.toml"
    path.write_text(render_toml({"quarantine": quarantine}))
    return path


def test_the_spam_commands(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    config = write_config(tmp_path, database_url=url, message_dir=str(tmp_path / "m"))
    unmigrated = spam(config, "levels", "show", "--json")
    assert unmigrated.returncode == 69 and "quarantine migrate" in json.loads(unmigrated.stdout)["error"]
    store = QuarantineStore(settings_for(url, tmp_path))
    store.migrate()
    store.close()

    assert spam(config, "levels", "show").returncode == 1
    assert spam(config, "levels", "set", "--for", "@Example.org", "--tag", "4", "--hold", "8").returncode == 0
    done = spam(config, "levels", "set", "--for", "alice@example.org", "--hold", "6", "--by", "helpdesk", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"ok": True, "owner": "alice@example.org", "tag": None, "hold": 6.0,
                                       "reject": None, "by": "helpdesk"}
    shown = spam(config, "levels", "show", "--for", "alice@example.org")
    assert shown.returncode == 0
    assert ("applies to alice@example.org: tag 4 (@example.org), hold 6 (alice@example.org), reject - (the "
            "milter's default)") in shown.stdout
    rows = json.loads(spam(config, "levels", "show", "--json").stdout)
    assert [(row["owner"], row["tag"], row["hold"], row["changed_by"]) for row in rows] == [
        ("@example.org", 4.0, 8.0, rows[0]["changed_by"]), ("alice@example.org", None, 6.0, "helpdesk")]
    disorder = spam(config, "levels", "set", "--for", "alice@example.org", "--tag", "9", "--hold", "6", "--json")
    assert disorder.returncode == 2 and "tag <= hold <= reject" in json.loads(disorder.stdout)["error"]

    added = spam(config, "senders", "add", "--for", "@example.org", "--black", "*@spam.example", "spam.example")
    assert added.returncode == 0, added.stderr
    assert spam(config, "senders", "add", "--for", "alice@example.org", "--white", "Boss@Spam.example").returncode == 0
    again = spam(config, "senders", "add", "--for", "alice@example.org", "--white", "boss@spam.example", "x.example",
                 "--json")
    assert again.returncode == 1  # one of the two was there already
    assert [r["ok"] for r in json.loads(again.stdout)["results"]] == [False, True]
    typo = spam(config, "senders", "add", "--for", "alice@example.org", "--black", "y.example", "*")
    assert typo.returncode == 2 and "every sender" in typo.stderr
    assert spam(config, "senders", "add", "--for", "alice@example.org", "y.example").returncode == 2  # no kind

    listed = json.loads(spam(config, "senders", "show", "--for", "alice@example.org", "--json").stdout)
    assert [(e["owner"], e["pattern"], e["kind"], e["specificity"]) for e in listed] == [
        ("alice@example.org", "boss@spam.example", "white", "address"),
        ("alice@example.org", "x.example", "white", "domain"),
        ("@example.org", "*@spam.example", "black", "address_wildcard"),
        ("@example.org", "spam.example", "black", "domain")]
    assert "y.example" not in spam(config, "senders", "show").stdout  # the refused command changed nothing

    white = spam(config, "senders", "test", "--for", "alice@example.org", "", "boss@spam.example")
    assert white.returncode == 0
    assert white.stdout.strip() == ("white: boss@spam.example matches boss@spam.example (address), an entry of "
                                    "alice@example.org")
    black = json.loads(spam(config, "senders", "test", "--for", "bob@example.org", "boss@spam.example",
                            "--json").stdout)
    assert black["verdict"] == "black" and black["decided_by"]["owner"] == "@example.org"
    assert black["decided_by"]["pattern"] == "*@spam.example"
    none = spam(config, "senders", "test", "--for", "bob@example.org", "a@ham.example", "--json")
    assert none.returncode == 1 and json.loads(none.stdout)["verdict"] is None

    removed = spam(config, "senders", "remove", "--for", "@example.org", "*@spam.example", "nothing.example", "--json")
    assert removed.returncode == 1 and [r["ok"] for r in json.loads(removed.stdout)["results"]] == [True, False]
    assert spam(config, "levels", "clear", "--for", "alice@example.org").returncode == 0
    cleared = spam(config, "levels", "clear", "--for", "alice@example.org", "--json")
    assert cleared.returncode == 1 and json.loads(cleared.stdout)["error"] == "alice@example.org has no spam levels"
    bad_owner = spam(config, "levels", "show", "--for", "example.org")
    assert bad_owner.returncode == 2 and "give a mailbox address" in bad_owner.stderr


def test_the_spam_commands_exit_69_when_the_store_is_unreachable_and_78_on_bad_config(tmp_path: Path) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where a directory should be")
    config = write_config(tmp_path, database_url=f"sqlite:///{blocker / 'q.sqlite'}")
    for args in (["levels", "show"], ["senders", "add", "--for", "@a.test", "--black", "x.example"]):
        result = spam(config, *args)
        assert result.returncode == 69, (args, result.stderr)
        assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text("[quarantine]\ndatabase_url = 5\n")
    assert spam(bad, "senders", "show", "--json").returncode == 78


def test_senders_add_reports_an_owner_at_its_bound_per_pattern(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process (the bound patched small): the patterns before the bound stay added, the others are
    refused each with the reason, exit 1."""
    from click.testing import CliRunner

    from mailwarden.cli import CliContext
    from quarantine.capability import spam_group

    url = f"sqlite:///{tmp_path / 'q.sqlite'}"
    config = write_config(tmp_path, database_url=url, message_dir=str(tmp_path / "m"))
    store = QuarantineStore(settings_for(url, tmp_path))
    store.migrate()
    store.close()
    monkeypatch.setattr(prefs_module, "MAX_SENDERS", 1)
    result = CliRunner().invoke(spam_group, ["senders", "add", "--for", "a@a.test", "--black", "x.example",
                                             "y.example", "--json"], obj=CliContext(str(config)))
    assert result.exit_code == 1, result.output
    [added, refused] = json.loads(result.output)["results"]
    assert added["ok"] is True and refused["ok"] is False and "the most kept" in refused["error"]
