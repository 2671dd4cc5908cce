"""phishhook's SQL store (phishhook/snags.py) as one contract over SQLite and the real MariaDB harness: snags
made and merged into one undecided snag per user (threads racing on both backends), transitions allowed and
refused (racing reviewers: one wins), the audit row of every change, travel notices and allow entries with
their boundaries and expiry, odd login names round-tripped, and migration 0004 over a catalogue that already
holds quarantine rows.

One database per backend for the module (migrated once; each test empties phishhook's tables), so MariaDB
costs one server start and one migration."""

from __future__ import annotations

import datetime
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from phishhook.snags import (
    MAX_FINDINGS,
    TRANSITIONS,
    UNDECIDED,
    AuditAction,
    SnagMode,
    SnagState,
    SnagStateError,
    SnagStore,
    UnknownEntry,
    UnknownSnag,
)
from quarantine import schema
from quarantine.models import Base
from quarantine.store import QuarantineSettings, SchemaBehind, StoreError, make_engine

T0 = datetime.datetime(2026, 11, 2, 9, 0, tzinfo=datetime.UTC)
HOUR = datetime.timedelta(hours=1)
DAY = datetime.timedelta(days=1)
PHISH_TABLES = ("phish_audit", "phish_action", "phish_snag_message", "phish_snag", "phish_travel", "phish_allow")
ODD_USERS = ["alice", "Alice", "alice ", "jürgen.müller@uni.example", "o'brien\"quoted\"", "用户@例子.广告",
             "emoji🦆@example.org", "back\\slash;DROP TABLE phish_snag;--", "x" * 320]
"""Distinct login names: MariaDB's collation takes the first three (and é, e) for one, the store must not."""
R = TypeVar("R")


class Clock:
    def __init__(self, now: datetime.datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime.datetime:
        return self.now

    def advance(self, delta: datetime.timedelta) -> None:
        self.now += delta


# -- backends -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["sqlite", "mariadb"])
def database(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A catalogue migrated to head, one per backend for the module."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('phish') / 'quarantine.sqlite'}"
    else:
        url = request.getfixturevalue("mariadb").create_database("phish_snags", drop=True)
    engine = make_engine(url)
    try:
        schema.upgrade(engine)
    finally:
        engine.dispose()
    return url


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(database: str, clock: Clock) -> Iterator[SnagStore]:
    engine = make_engine(database)
    with engine.begin() as conn:
        for table in PHISH_TABLES:
            conn.execute(sa.text(f"DELETE FROM {table}"))
    snags = SnagStore(engine, now=clock)
    yield snags
    snags.close()


def race(count: int, work: Callable[[int], R]) -> list[R | BaseException]:
    """``work(i)`` in ``count`` threads released at once; each one's result or exception."""
    barrier = threading.Barrier(count)
    results: list[R | BaseException] = [RuntimeError("not run")] * count

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except BaseException as exc:  # reported to the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def travel_evidence(city: str = "Beijing") -> dict[str, object]:
    return {"logins": [{"at": T0.isoformat(), "address": "8.8.8.8", "city": "Mountain View"},
                       {"at": (T0 + HOUR).isoformat(), "address": "1.2.4.8", "city": city}],
            "km": 9500.5, "km_per_h": 9500.5}


# -- snags: made and merged -----------------------------------------------------------------------------


def test_a_snag_is_made_with_its_audit_row_and_read_back(store: SnagStore, clock: Clock) -> None:
    snag = store.create("alice@example.org", "impossible-travel", "Mountain View to Beijing in 1 h",
                        travel_evidence(), "enforce", "1.2.4.8", message_ids=["q1"])
    assert snag.new and snag.run_actions and not snag.escalated
    assert (snag.state, snag.mode, snag.kind) == (SnagState.OPEN, SnagMode.ENFORCE, "impossible-travel")
    assert snag.evidence == travel_evidence() and snag.finding_count == 1
    assert snag.source_address == "1.2.4.8" and snag.message_ids == ("q1",)
    assert (snag.created_at, snag.state_by, snag.state_at) == (T0, "phishhook", T0)
    again = store.get(snag.public_id)
    assert again is not None and again.new is False  # a plain read
    assert again.public_id == snag.public_id and again.findings == snag.findings and again.message_ids == ("q1",)
    assert store.open_for("alice@example.org") == again
    assert store.get("nosuchsnag") is None
    assert [(e.action, e.actor, e.at, e.snag, e.user) for e in store.audit()] == [
        ("messages-added", "phishhook", T0, snag.public_id, "alice@example.org"),
        ("created", "phishhook", T0, snag.public_id, "alice@example.org")]


def test_a_second_finding_joins_the_users_open_snag(store: SnagStore, clock: Clock) -> None:
    first = store.create("bob", "impossible-travel", "US to CN in 1 h", travel_evidence(), "enforce", "1.2.4.8",
                         ["q1"])
    clock.advance(HOUR)
    second = store.create("bob", "outbound", "forged From, 101 recipients", {"rcpts": 101}, "enforce",
                          "2001:DB8::1", ["q2", "q1"])
    assert not second.new and not second.run_actions
    assert second.public_id == first.public_id and second.kind == "impossible-travel"
    assert second.reason == "US to CN in 1 h and 1 more" and second.finding_count == 2
    assert [f.kind for f in second.findings] == ["impossible-travel", "outbound"]
    assert second.findings[1].evidence == {"rcpts": 101} and second.findings[1].at == T0 + HOUR
    assert second.message_ids == ("q1", "q2")  # q1 once
    assert second.source_addresses == ("1.2.4.8", "2001:db8::1")
    assert second.updated_at == T0 + HOUR and second.created_at == T0
    actions = [e.action for e in store.audit(second.public_id)]
    assert actions == ["messages-added", "finding-added", "messages-added", "created"]
    # another user's snag is another snag; a decided snag lets the next finding make a new one
    assert store.create("carol", "manual", "reported", {}).new
    store.transition(first.public_id, SnagState.DISMISSED, "review:sec")
    third = store.create("bob", "rate-limit", "200 messages in 1 h", {})
    assert third.new and third.public_id != first.public_id and third.reason == "200 messages in 1 h"
    assert store.open_for("bob") == store.get(third.public_id)


def test_an_enforce_finding_turns_an_alert_only_snag_open(store: SnagStore, clock: Clock) -> None:
    alert = store.create("dave", "impossible-travel", "learning period", {}, "alert", "192.0.2.7")
    assert alert.new and alert.state is SnagState.ALERT and alert.mode is SnagMode.ALERT
    clock.advance(HOUR)
    quiet = store.create("dave", "impossible-travel", "again, still learning", {}, "alert")
    assert not quiet.run_actions and quiet.state is SnagState.ALERT
    clock.advance(HOUR)
    loud = store.create("dave", "outbound", "forged From", {}, "enforce", "192.0.2.8")
    assert loud.escalated and loud.run_actions and not loud.new
    assert (loud.state, loud.mode, loud.state_at, loud.source_address) == (
        SnagState.OPEN, SnagMode.ENFORCE, T0 + 2 * HOUR, "192.0.2.7")
    assert "escalated" in [e.action for e in store.audit(loud.public_id)]
    # an alert finding never turns an open snag back
    assert store.create("dave", "brute-force", "failures", {}, "alert").state is SnagState.OPEN


def test_findings_keep_the_first_and_the_latest(store: SnagStore, clock: Clock) -> None:
    for i in range(MAX_FINDINGS + 5):
        store.create("eve", "outbound", f"message {i}", {"i": i})
    snag = store.open_for("eve")
    assert snag is not None and snag.finding_count == MAX_FINDINGS + 5
    kept = [f.evidence["i"] for f in snag.findings]
    assert kept == [0, *range(6, MAX_FINDINGS + 5)] and len(kept) == MAX_FINDINGS
    assert snag.reason == f"message 0 and {MAX_FINDINGS + 4} more"


def test_large_evidence_is_kept_cut_and_junk_is_refused(store: SnagStore) -> None:
    big = store.create("frank", "outbound", "500 recipients", {"rcpts": ["r" * 200] * 500})
    assert big.evidence["truncated"] is True and big.evidence["characters"] > 100_000
    when = store.create("gina", "manual", "dated", {"at": T0, "net": {1, 2}})
    assert when.evidence == {"at": T0.isoformat(), "net": [1, 2]}
    with pytest.raises(ValueError, match="not JSON"):
        store.create("gina", "manual", "x", {"f": object()})
    bad_arguments: list[tuple[dict[str, Any], str]] = [
        ({"user": ""}, "login name is needed"), ({"user": "x" * 321}, "at most 320"),
        ({"user": "bad\udcff"}, "lone surrogate"), ({"kind": ""}, "kind"), ({"mode": "block"}, "'enforce' or 'alert'"),
        ({"source_address": "example.org"}, "not an IP address"), ({"message_ids": ["x" * 33]}, "message id")]
    for bad, match in bad_arguments:
        args: dict[str, Any] = {"user": "gina", "kind": "manual", "reason": "r", "evidence": {}, **bad}
        with pytest.raises(ValueError, match=match):
            store.create(**args)
    assert store.get(when.public_id) is not None and len(store.list(user="gina")) == 1


@pytest.mark.parametrize("separate_engines", [False, True])
def test_racing_snags_of_one_user_make_one_snag(store: SnagStore, database: str, clock: Clock,
                                                separate_engines: bool) -> None:
    """Eight milter threads (one engine) or eight processes (an engine each) snag one user at once."""
    stores = [SnagStore(make_engine(database), now=clock) if separate_engines else store for _ in range(8)]
    try:
        results = race(8, lambda i: stores[i].create("racer", "outbound", f"message {i}", {"i": i}, "enforce",
                                                     f"192.0.2.{i + 1}", [f"q{i}", "shared"]))
    finally:
        for other in stores:
            if other is not store:
                other.close()
    snags = [r for r in results if not isinstance(r, BaseException)]
    assert snags == results, [r for r in results if isinstance(r, BaseException)]
    assert sum(s.new for s in snags) == 1
    assert len({s.public_id for s in snags}) == 1
    (only,) = store.list(user="racer")
    assert only.finding_count == 8 and len(only.findings) == 8
    assert sorted(only.message_ids) == sorted([f"q{i}" for i in range(8)] + ["shared"])
    actions = [e.action for e in store.audit(only.public_id)]
    assert actions.count("created") == 1 and actions.count("finding-added") == 7


def test_two_writers_that_both_found_no_snag_make_one(database: str, store: SnagStore, clock: Clock) -> None:
    """The race the unique key is for, made certain: two processes (an engine each) both look, find no snag of
    the user, and insert at once; the database refuses the second, which looks again and joins the first's."""
    if database.startswith("sqlite"):
        pytest.skip("SQLite writers take the write lock at BEGIN: two never both get past the look")
    barrier = threading.Barrier(2, timeout=20)
    stores = [SnagStore(make_engine(database), now=clock) for _ in range(2)]

    def meet_before_the_insert(engine: sa.Engine) -> None:
        held = threading.local()

        @sa.event.listens_for(engine, "before_cursor_execute")
        def wait(conn: object, cursor: object, statement: str, *args: object) -> None:
            if statement.startswith("INSERT INTO phish_snag ") and not getattr(held, "met", False):
                held.met = True
                barrier.wait()

    for other in stores:
        meet_before_the_insert(other.engine)
    try:
        results = race(2, lambda i: stores[i].create("twin", "outbound", f"message {i}", {"i": i}))
    finally:
        for other in stores:
            other.close()
    snags = [r for r in results if not isinstance(r, BaseException)]
    assert snags == results, results
    assert sorted(s.new for s in snags) == [False, True] and snags[0].public_id == snags[1].public_id
    (only,) = store.list(user="twin")
    assert only.finding_count == 2


def test_messages_are_added_once(store: SnagStore) -> None:
    snag = store.create("hank", "outbound", "forged", {}, message_ids=["q1"])
    assert store.add_messages(snag.public_id, ["q2", "q1", "q2"]).message_ids == ("q1", "q2")
    assert store.add_messages(snag.public_id, []).message_ids == ("q1", "q2")
    assert [e.detail for e in store.audit(snag.public_id) if e.action == "messages-added"] == [
        "held: q2", "held: q1"]
    with pytest.raises(UnknownSnag):
        store.add_messages("nosuchsnag", ["q3"])


def test_action_runs_are_recorded_in_order(store: SnagStore, clock: Clock) -> None:
    snag = store.create("ivan", "impossible-travel", "far", {})
    store.record_action(snag.public_id, "block-account", True, "blocked in the policy daemon", T0, 0.002)
    failed = store.record_action(snag.public_id, "ticket", False, "smtp: connection refused", T0, 10.0)
    assert failed.position == 1 and not failed.ok
    results = race(6, lambda i: store.record_action(snag.public_id, f"command-{i}", True, "", T0 + HOUR, 0.5))
    assert not [r for r in results if isinstance(r, BaseException)], results
    again = store.get(snag.public_id)
    assert again is not None
    assert [a.position for a in again.actions] == list(range(8))
    assert [(a.name, a.ok, a.detail, a.seconds) for a in again.actions[:2]] == [
        ("block-account", True, "blocked in the policy daemon", 0.002), ("ticket", False, "smtp: connection refused",
                                                                         10.0)]
    with pytest.raises(UnknownSnag):
        store.record_action("nosuchsnag", "ticket", True, "", T0, 0)
    with pytest.raises(ValueError, match="aware"):
        store.record_action(snag.public_id, "ticket", True, "", T0.replace(tzinfo=None), 0)


def test_list_filters_and_pages(store: SnagStore, clock: Clock) -> None:
    made = []
    for i, user in enumerate(["u1", "u2", "u3", "u4"]):
        made.append(store.create(user, "manual", f"r{i}", {}, "alert" if i % 2 else "enforce"))
        clock.advance(HOUR)
    store.transition(made[0].public_id, SnagState.COMPROMISED, "review:sec")
    assert [s.user for s in store.list()] == ["u4", "u3", "u2", "u1"]
    assert [s.user for s in store.list(states=UNDECIDED)] == ["u4", "u3", "u2"]
    assert [s.user for s in store.list(states=["alert"])] == ["u4", "u2"]
    assert [s.user for s in store.list(user="u1")] == ["u1"]
    page = store.list(limit=2)
    assert [s.user for s in page] == ["u4", "u3"]
    assert [s.user for s in store.list(limit=2, before=page[-1].created_at)] == ["u2", "u1"]
    assert store.list(states=["dismissed"]) == []
    with pytest.raises(ValueError):
        store.list(states=["nonsense"])


# -- transitions ------------------------------------------------------------------------------------------


def test_every_transition_is_allowed_or_refused_as_documented(store: SnagStore, clock: Clock) -> None:
    paths = {SnagState.OPEN: [], SnagState.ALERT: [], SnagState.COMPROMISED: [SnagState.COMPROMISED],
             SnagState.SAFE: [SnagState.SAFE], SnagState.DISMISSED: [SnagState.DISMISSED]}
    for n, (source, target) in enumerate((s, t) for s in SnagState for t in SnagState):
        user = f"user{n}"
        snag = store.create(user, "manual", "r", {}, "alert" if source is SnagState.ALERT else "enforce")
        for step in paths[source]:
            store.transition(snag.public_id, step, "review:setup")
        clock.advance(datetime.timedelta(minutes=1))
        if target in TRANSITIONS[source]:
            moved = store.transition(snag.public_id, target, "review:sec", note="checked with the user")
            assert (moved.state, moved.state_by, moved.state_at) == (target, "review:sec", clock.now)
            entry = store.audit(snag.public_id, limit=1)[0]
            assert (entry.actor, entry.at, entry.detail, entry.user) == (
                "review:sec", clock.now, "checked with the user", user)
            assert entry.action == {SnagState.COMPROMISED: "confirm-compromised", SnagState.SAFE: "confirm-safe",
                                    SnagState.DISMISSED: "dismiss"}[target]
            assert store.open_for(user) is None
        else:
            before = store.audit(snag.public_id)
            with pytest.raises(SnagStateError, match=f"is {source}") as refused:
                store.transition(snag.public_id, target, "review:sec")
            assert refused.value.current is source and set(refused.value.allowed) == TRANSITIONS[source]
            assert store.audit(snag.public_id) == before
            current = store.get(snag.public_id)
            assert current is not None and current.state is source


def test_refusals_name_the_state_and_the_ways_out(store: SnagStore) -> None:
    snag = store.create("kim", "manual", "r", {})
    store.transition(snag.public_id, "dismissed", "review:a")
    with pytest.raises(SnagStateError, match=r"is dismissed: dismissed is final, not safe"):
        store.transition(snag.public_id, "safe", "review:b")
    other = store.create("lee", "manual", "r", {})
    store.transition(other.public_id, "compromised", "review:a")
    with pytest.raises(SnagStateError, match=r"is compromised: it can become safe, not dismissed"):
        store.transition(other.public_id, "dismissed", "review:b")
    with pytest.raises(UnknownSnag):
        store.transition("nosuchsnag", "safe", "review:a")
    with pytest.raises(ValueError, match="one of open, alert"):
        store.transition(other.public_id, "gone", "review:a")


def test_racing_reviewers_one_wins(store: SnagStore) -> None:
    snag = store.create("mia", "impossible-travel", "far", {})
    targets = [SnagState.COMPROMISED, SnagState.DISMISSED] * 4
    results = race(8, lambda i: store.transition(snag.public_id, targets[i], f"review:r{i}"))
    winners = [r for r in results if not isinstance(r, BaseException)]
    losers = [r for r in results if isinstance(r, BaseException)]
    assert len(winners) == 1 and all(isinstance(r, SnagStateError) for r in losers), losers
    reviews = [e for e in store.audit(snag.public_id) if e.action != "created"]
    assert [(e.actor, e.action) for e in reviews] == [
        (winners[0].state_by, "confirm-compromised" if winners[0].state is SnagState.COMPROMISED else "dismiss")]


# -- audit ----------------------------------------------------------------------------------------------


def test_audit_entries_outside_a_snag(store: SnagStore, clock: Clock) -> None:
    store.log_audit("review", AuditAction.LOGIN_FAILED, "wrong password for sec from 192.0.2.9")
    snag = store.create("nina", "manual", "r", {})
    clock.advance(HOUR)
    store.log_audit("cli:root", "unblock", "account and 192.0.2.1 unblocked", snag_id=snag.public_id)
    newest, _, oldest = store.audit()
    assert (newest.actor, newest.action, newest.at, newest.snag, newest.user) == (
        "cli:root", "unblock", T0 + HOUR, snag.public_id, "nina")
    assert (oldest.action, oldest.snag, oldest.user) == ("login-failed", None, "")
    assert len(store.audit(limit=1)) == 1
    with pytest.raises(UnknownSnag):
        store.log_audit("cli:root", "unblock", "", snag_id="nosuchsnag")
    assert json.loads(json.dumps(newest.as_dict()))["at"] == (T0 + HOUR).isoformat()


# -- travel notices ---------------------------------------------------------------------------------------


def test_a_travel_notice_covers_its_interval_only(store: SnagStore, clock: Clock) -> None:
    starts, ends = T0 + DAY, T0 + 8 * DAY
    notice = store.add_travel("olga", ["cn", "JP"], ["Beijing", " Tokyo "], starts_at=starts, ends_at=ends,
                              by="helpdesk:pat", note="conference")
    assert (notice.countries, notice.places) == (("CN", "JP"), ("Beijing", "Tokyo"))
    store.add_travel("someone-else", ["CN"], starts_at=T0, ends_at=T0 + 30 * DAY, by="helpdesk:pat")
    for at, covered in [(starts - datetime.timedelta(microseconds=1), False), (starts, True),
                        (ends - datetime.timedelta(microseconds=1), True), (ends, False)]:
        assert [n.id for n in store.travel_for("olga", at)] == ([notice.id] if covered else []), at
    assert store.travel_for("Olga", starts) == []  # login names are exact
    assert notice.matches("cn") and notice.matches(None, "tokyo") and not notice.matches("US", "Paris")
    assert notice.covers(starts) and not notice.covers(ends)
    # listed while not ended (also before it starts); gone from the current list once it ended
    assert [n.id for n in store.list_travel("olga")] == [notice.id]
    clock.advance(8 * DAY)
    assert store.list_travel("olga") == [] and [n.id for n in store.list_travel("olga", current_only=False)] == [
        notice.id]
    removed = store.remove_travel(notice.id, "helpdesk:sam")
    assert removed == notice and store.list_travel("olga", current_only=False) == []
    with pytest.raises(UnknownEntry):
        store.remove_travel(notice.id, "helpdesk:sam")
    trail = [(e.action, e.actor, e.user) for e in store.audit()]
    assert trail[0] == ("travel-removed", "helpdesk:sam", "olga") and ("travel-notice", "helpdesk:pat", "olga") in trail


@pytest.mark.parametrize(("countries", "places", "days", "match"), [
    (["USA"], [], 3, "two letters"), (["U1"], [], 3, "two letters"), ([], [], 3, "at least one country or place"),
    ([" ", ""], [" "], 3, "at least one"), (["US"], [], 0, "before it starts"), (["US"], [], -1, "before it starts"),
    (["US"], [], 367, "at most 366 days"), ([f"{a}{b}" for a in "ABCDEFGH" for b in "ABCDEFGH"], [], 3, "at most 60"),
])
def test_bad_travel_notices_are_refused(store: SnagStore, countries: list[str], places: list[str], days: int,
                                        match: str) -> None:
    with pytest.raises(ValueError, match=match):
        store.add_travel("pete", countries, places, starts_at=T0, ends_at=T0 + days * DAY, by="helpdesk")
    assert store.list_travel(current_only=False) == [] and store.audit() == []


def test_travel_notices_need_aware_times_and_may_be_a_year(store: SnagStore) -> None:
    with pytest.raises(ValueError, match="aware"):
        store.add_travel("pete", ["US"], starts_at=T0.replace(tzinfo=None), ends_at=T0 + DAY, by="helpdesk")
    year = store.add_travel("pete", "de", starts_at=T0, ends_at=T0 + 366 * DAY, by="helpdesk")
    assert year.countries == ("DE",)


# -- allow entries ----------------------------------------------------------------------------------------


def test_allow_entries_of_the_user_and_the_organisation_until_they_expire(store: SnagStore, clock: Clock) -> None:
    org = store.add_allow(None, "192.0.2.0/24", by="cli:root", note="campus VPN exit")
    mine = store.add_allow("quinn", country="fr", by="helpdesk:pat", expires_at=T0 + DAY)
    both = store.add_allow("quinn", "2001:DB8::/32", "de", by="helpdesk:pat")
    store.add_allow("rose", country="CN", by="helpdesk:pat")
    assert [e.id for e in store.allows_for("quinn")] == [org.id, mine.id, both.id]
    assert [e.user for e in store.allows_for("rose")] == [None, "rose"]
    assert [e.id for e in store.allows_for("Quinn")] == [org.id]
    assert org.matches("192.0.2.200", None) and not org.matches("198.51.100.1", "US") and not org.matches(None, "US")
    assert mine.matches("203.0.113.5", "FR") and not mine.matches("203.0.113.5", "DE")
    assert both.matches("2001:db8::5", "DE") and not both.matches("2001:db8::5", "FR")
    assert not both.matches("192.0.2.1", "DE") and not both.matches("garbage", "DE")
    clock.advance(DAY)  # expires_at is excluded
    assert [e.id for e in store.allows_for("quinn")] == [org.id, both.id]
    assert not mine.active(clock.now) and org.active(clock.now)
    assert [e.id for e in store.list_allow("quinn", include_expired=True)] == [org.id, mine.id, both.id]
    assert len(store.list_allow()) == 3
    assert store.remove_allow(org.id, "cli:root") == org
    assert [e.id for e in store.allows_for("quinn")] == [both.id]
    with pytest.raises(UnknownEntry):
        store.remove_allow(org.id, "cli:root")
    trail = [(e.action, e.actor, e.user) for e in store.audit()]
    assert trail[0] == ("allow-removed", "cli:root", "") and trail.count(("allow", "helpdesk:pat", "quinn")) == 2


@pytest.mark.parametrize(("network", "country", "expires", "match"), [
    (None, None, None, "a network, a country, or both"), ("192.0.2.1/24", None, None, "did you mean 192.0.2.0/24"),
    ("campus", None, None, "CIDR"), (None, "France", None, "two letters"),
    ("10.0.0.0/8", None, T0, "past"), ("10.0.0.0/8", None, T0.replace(tzinfo=None) + DAY, "aware"),
])
def test_bad_allow_entries_are_refused(store: SnagStore, network: str | None, country: str | None,
                                       expires: datetime.datetime | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        store.add_allow("sue", network, country, by="cli:root", expires_at=expires)
    assert store.list_allow(include_expired=True) == []


def test_a_review_links_its_travel_notice_and_allow_entry_to_the_snag(store: SnagStore) -> None:
    snag = store.create("tom", "impossible-travel", "far", {})
    store.transition(snag.public_id, "safe", "review:sec")
    store.add_travel("tom", ["CN"], starts_at=T0, ends_at=T0 + DAY, by="review:sec", snag_id=snag.public_id)
    store.add_allow("tom", "198.51.100.0/24", by="review:sec", snag_id=snag.public_id)
    assert [e.action for e in store.audit(snag.public_id)] == ["allow", "travel-notice", "confirm-safe", "created"]


# -- odd login names, JSON ----------------------------------------------------------------------------------


def test_odd_login_names_round_trip_and_stay_distinct(store: SnagStore) -> None:
    made = {user: store.create(user, "manual", f"for {user}", {"user": user}, source_address="2001:DB8::7")
            for user in ODD_USERS}
    assert all(snag.new for snag in made.values())  # "Alice" and "alice " are not alice
    for user, snag in made.items():
        read = store.open_for(user)
        assert read is not None and read.user == user and read.public_id == snag.public_id
        data = json.loads(json.dumps(read.as_dict()))
        assert data["user"] == user and data["findings"][0]["evidence"] == {"user": user}
        assert data["state"] == "open" and data["created_at"] == T0.isoformat()
        assert data["source_addresses"] == ["2001:db8::7"] and data["new"] is False
        assert [s.user for s in store.list(user=user)] == [user]
        store.add_travel(user, ["CN"], starts_at=T0, ends_at=T0 + DAY, by="helpdesk")
        store.add_allow(user, country="CN", by="helpdesk")
        assert [n.user for n in store.travel_for(user, T0)] == [user]
        assert [e.user for e in store.allows_for(user)] == [user]
    for entry in store.audit():
        assert json.loads(json.dumps(entry.as_dict()))["user"] in ODD_USERS
    travel = store.list_travel()[0]
    allow = store.list_allow()[0]
    assert json.loads(json.dumps(travel.as_dict()))["countries"] == ["CN"]
    assert json.loads(json.dumps(allow.as_dict()))["expires_at"] is None


# -- opening, failures, migration ---------------------------------------------------------------------------


def test_open_uses_the_quarantine_settings(database: str, clock: Clock) -> None:
    snags = SnagStore.open(QuarantineSettings(database_url=database, db_timeout=5), now=clock)
    try:
        snags.check()
        assert snags.list(limit=1) is not None
    finally:
        snags.close()


def test_an_unmigrated_database_says_to_migrate(tmp_path: Path) -> None:
    snags = SnagStore(make_engine(f"sqlite:///{tmp_path / 'empty.sqlite'}"))
    try:
        with pytest.raises(SchemaBehind, match="run 'mailwarden quarantine migrate'"):
            snags.create("alice", "manual", "r", {})
    finally:
        snags.close()


def test_an_unreachable_database_is_a_store_error_without_the_password() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    snags = SnagStore.open(QuarantineSettings(database_url=f"mysql+pymysql://mail:secret@127.0.0.1:{port}/mail",
                                              db_timeout=2))
    try:
        with pytest.raises(StoreError, match=r"cannot open the catalogue.*check that it is running") as failed:
            snags.get("x")
        assert "secret" not in str(failed.value)
    finally:
        snags.close()


def test_a_bad_url_is_a_store_error() -> None:
    with pytest.raises(StoreError, match="database_url"):
        SnagStore.open(QuarantineSettings(database_url="nosuchdriver://x/y"))


def schema_differences(engine: sa.Engine) -> list[object]:
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True, "version_table": schema.VERSION_TABLE})
        return list(compare_metadata(context, Base.metadata))


@pytest.fixture(params=["sqlite", "mariadb"])
def upgrade_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'upgrade.sqlite'}"
    return str(request.getfixturevalue("mariadb").create_database("phish_upgrade", drop=True))


def test_migration_0004_upgrades_a_catalogue_holding_quarantine_rows(upgrade_url: str) -> None:
    engine = make_engine(upgrade_url)
    try:
        schema.upgrade(engine, "0003")
        quarantine_tables = set(sa.inspect(engine).get_table_names())
        assert not {t for t in quarantine_tables if t.startswith("phish_")}
        with engine.begin() as conn:
            conn.execute(sa.text(
                "INSERT INTO quarantine_message (id, received_at, queue_id, sender, client_address, auth_user, "
                "header_from, subject, date, size, storage) VALUES (7, :t, 'Q7', 's@example.org', '192.0.2.1', "
                "'bob', '', 'held before 0004', '', 1, 'purged')"), {"t": T0.replace(tzinfo=None)})
            conn.execute(sa.text(
                "INSERT INTO quarantine_held (id, public_id, message_id, recipient, mailbox, check_name, kind, "
                "reason, held_at, state, state_by, state_at, released_queue_id) VALUES (3, 'abc', 7, "
                "'r@example.org', 'r@example.org', 'banned', 'banned', '', :t, 'held', 'banned', :t, '')"),
                {"t": T0.replace(tzinfo=None)})
            conn.execute(sa.text(
                "INSERT INTO digest_subscriber (owner, digest_interval, changed_at, changed_by) "
                "VALUES ('r@example.org', 'daily', :t, 'cli')"), {"t": T0.replace(tzinfo=None)})
        schema.upgrade(engine)
        assert set(PHISH_TABLES) <= set(sa.inspect(engine).get_table_names())
        assert schema_differences(engine) == []
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT subject FROM quarantine_message")).scalars().all() == [
                "held before 0004"]
            assert conn.execute(sa.text("SELECT public_id FROM quarantine_held")).scalars().all() == ["abc"]
            assert conn.execute(sa.text("SELECT owner FROM digest_subscriber")).scalars().all() == ["r@example.org"]
        snags = SnagStore(engine)
        snag = snags.create("bob", "outbound", "forged", {}, message_ids=["abc"])
        assert snags.get(snag.public_id) is not None
        schema.downgrade(engine, "0003")
        assert set(sa.inspect(engine).get_table_names()) == quarantine_tables
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT public_id FROM quarantine_held")).scalars().all() == ["abc"]
    finally:
        engine.dispose()
