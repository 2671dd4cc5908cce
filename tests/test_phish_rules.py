"""phishhook's pure rules and its Redis records, below the detector: login events as they arrive (names and
addresses from outside), the outbound rule and its exemptions, the login history (merging, usual places, the
learning period, clearing) and the failed-login counters, against a real Redis."""

from __future__ import annotations

import pytest
import redis
from harness.redis_server import RedisProcess

from phishhook import keys
from phishhook.bruteforce import BruteForceSettings, FailedLogins
from phishhook.events import BadEvent, normalise_address, normalise_service, normalise_user
from phishhook.geo import Place
from phishhook.history import HistorySettings, LoginHistory
from phishhook.networks import AddressClass
from phishhook.outbound import OutboundSettings, OutboundVerdict, judge_outbound
from phishhook.velocity import Sighting

# --- login events -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("alice", "alice"), (" Alice@Example.ORG ", "alice@example.org"), ("o'brien", "o'brien"),
    ("名前@example.org", "名前@example.org"), ('a b"c', 'a b"c'),
])
def test_login_names_are_kept_but_for_case_and_surrounding_space(raw: str, expected: str) -> None:
    assert normalise_user(raw) == expected


@pytest.mark.parametrize(("raw", "reason"), [
    ("", "empty"), ("   ", "empty"), (None, "expected a string"), (42, "expected a string"),
    ("a\x00b", "control characters"), ("a\nb", "control characters"), ("x" * 321, "longer than 320"),
])
def test_login_names_that_cannot_be_an_account_are_refused(raw: object, reason: str) -> None:
    with pytest.raises(BadEvent, match=reason):
        normalise_user(raw)


@pytest.mark.parametrize(("raw", "expected"), [
    ("203.0.113.7", "203.0.113.7"), ("[203.0.113.7]", "203.0.113.7"), ("::ffff:203.0.113.7", "203.0.113.7"),
    ("IPv6:2001:DB8::1", "2001:db8::1"), ("2001:0db8:0000::0001", "2001:db8::1"), ("fe80::1%eth0", "fe80::1"),
])
def test_addresses_are_put_in_one_form(raw: str, expected: str) -> None:
    assert normalise_address(raw) == expected


@pytest.mark.parametrize("raw", ["unknown", "", "999.1.1.1", "host.example", "x" * 300, None])
def test_what_is_not_an_address_is_refused(raw: object) -> None:
    with pytest.raises(BadEvent, match="address"):
        normalise_address(raw)


def test_service_names_are_bounded_and_tame() -> None:
    assert normalise_service("IMAP") == "imap"
    assert normalise_service("we b/mail\x00" + "x" * 50) == "we_b_mail_" + "x" * 22
    assert normalise_service(None) == "unknown"


# --- the outbound rule ------------------------------------------------------------------------------------

RULE = OutboundSettings(list_accounts=["Lists"])


def rcpts(count: int) -> list[str]:
    return [f"r{n}@example.org" for n in range(count)]


@pytest.mark.parametrize(("user", "sender", "header_from", "count", "verdict"), [
    ("erin", "erin@example.org", "CEO <ceo@bank.example>", 101, OutboundVerdict.ANOMALY),
    ("erin", "erin@example.org", "CEO <ceo@bank.example>", 100, OutboundVerdict.CLEAN),
    ("erin", "erin@example.org", "Erin <ERIN@example.org>", 500, OutboundVerdict.CLEAN),
    ("erin", "erin@example.org", None, 101, OutboundVerdict.ANOMALY),
    ("erin", "erin@example.org", "undisclosed-recipients:;", 101, OutboundVerdict.ANOMALY),
    ("", "erin@example.org", "ceo@bank.example", 500, OutboundVerdict.NOT_AUTHENTICATED),
    ("lists", "staff-bounces@lists.example.org", "someone@example.org", 500, OutboundVerdict.EXEMPT),
    ("LISTS", "x@example.org", "someone@example.org", 500, OutboundVerdict.EXEMPT),
    ("fwd", "SRS0=HHH=TT=example.com=bob@forward.example.org", "bob@example.com", 150, OutboundVerdict.EXEMPT),
    ("vp", "list+bob=example.com@lists.example.org", "post@example.org", 150, OutboundVerdict.EXEMPT),
    ("erin", "", "ceo@bank.example", 101, OutboundVerdict.ANOMALY),
])
def test_the_outbound_rule(user: str, sender: str, header_from: str | None, count: int, verdict: str) -> None:
    found = judge_outbound(RULE, user, sender, header_from, rcpts(count))
    assert found.verdict == verdict, found


def test_an_anomaly_says_what_was_forged_and_how_many() -> None:
    found = judge_outbound(RULE, "erin", "erin@example.org", "ceo@bank.example", rcpts(101))
    assert found.reason == ("From ceo@bank.example is not the envelope sender <erin@example.org>, 101 recipients "
                            "(more than 100)")


# --- the history ------------------------------------------------------------------------------------------

BOSTON = Place(country="US", continent="NA", city="Boston", subdivision="MA", latitude=42.35, longitude=-71.1,
               radius_km=5, asn=None, org="")
BEIJING = Place(country="CN", continent="AS", city="Beijing", subdivision="", latitude=39.9, longitude=116.4,
                radius_km=5, asn=None, org="")
DAY = 86400.0


def sighting(at: float, address: str = "128.197.26.35", place: Place | None = BOSTON,
             service: str = "imap") -> Sighting:
    return Sighting(at=at, address=address, place=place, kind=AddressClass.PUBLIC, group="", service=service)


@pytest.fixture
def client(redis_server: RedisProcess) -> redis.Redis:
    return redis_server.client()


def history(client: redis.Redis, **settings: object) -> LoginHistory:
    return LoginHistory(client, "t:", HistorySettings.model_validate(settings), now=lambda: 10 * DAY)


def remember(logins: LoginHistory, user: str, seen: Sighting) -> None:
    logins.remember(user, seen, logins.recall(user, seen.place))


def test_logins_are_kept_newest_first_and_bounded(client: redis.Redis) -> None:
    logins = history(client, size=3, merge_within=0)
    for n in range(5):
        remember(logins, "alice", sighting(DAY + n * 3600, address=f"128.197.26.{n}"))
    assert [s.address for s in logins.recent("alice")] == ["128.197.26.4", "128.197.26.3", "128.197.26.2"]
    assert client.ttl(keys.user_key("t:", keys.HISTORY, "alice")) > 0


def test_a_polling_client_refreshes_its_entry_instead_of_flooding_the_history(client: redis.Redis) -> None:
    logins = history(client, merge_within=600)
    for n in range(10):
        remember(logins, "alice", sighting(DAY + n * 60))
    [only] = logins.recent("alice")
    assert only.at == DAY + 9 * 60
    remember(logins, "alice", sighting(DAY + 9 * 60 + 601))
    assert len(logins.recent("alice")) == 2
    remember(logins, "alice", sighting(DAY + 9 * 60 + 700, service="smtp"))
    assert len(logins.recent("alice")) == 3  # another service is another login


def test_a_place_becomes_usual_after_logins_on_that_many_days(client: redis.Redis) -> None:
    logins = history(client, regular_days=3)
    for day in (1, 1, 2, 2, 2):
        remember(logins, "alice", sighting(day * DAY + 3600 * day))
    assert logins.recall("alice", BOSTON).place_days == 2
    remember(logins, "alice", sighting(3 * DAY + 10))
    assert logins.recall("alice", BOSTON).place_days == 3
    assert logins.recall("alice", BEIJING).place_days == 0
    assert logins.recall("bob", BOSTON).place_days == 0


def test_the_organisations_places_count_users(client: redis.Redis) -> None:
    logins = history(client)
    for n in range(30):
        remember(logins, f"user{n}", sighting(DAY))
    remember(logins, "user0", sighting(DAY + 3600))  # the same user again counts once
    assert 28 <= logins.recall("newcomer", BOSTON).org_users <= 32  # a HyperLogLog estimate
    assert logins.recall("newcomer", BEIJING).org_users == 0


def test_the_learning_period_runs_from_the_first_login(client: redis.Redis) -> None:
    logins = history(client, learning_period="7d")
    first = logins.recall("alice", BOSTON)
    assert logins.in_learning(first, DAY)  # never seen: learning
    remember(logins, "alice", sighting(DAY))
    assert logins.in_learning(logins.recall("alice", BOSTON), DAY + 6 * DAY)
    assert not logins.in_learning(logins.recall("alice", BOSTON), DAY + 7 * DAY)
    assert not history(client, learning_period=0).in_learning(first, DAY)


def test_clearing_an_account_is_remembered(client: redis.Redis) -> None:
    logins = history(client)
    logins.clear("alice", at=5 * DAY)
    assert logins.recall("alice", None).cleared == 5 * DAY


def test_a_damaged_history_entry_is_skipped(client: redis.Redis) -> None:
    logins = history(client)
    remember(logins, "alice", sighting(DAY))
    client.lpush(keys.user_key("t:", keys.HISTORY, "alice"), b"{not json", b'{"at": "x"}')
    assert [s.at for s in logins.recent("alice")] == [DAY]


# --- failed logins ----------------------------------------------------------------------------------------

def counter(client: redis.Redis, **settings: object) -> FailedLogins:
    return FailedLogins(client, "t:", BruteForceSettings.model_validate(settings))


def test_an_address_over_its_limit_is_blocked_once_per_window(client: redis.Redis) -> None:
    failures = counter(client, per_address=3, spray_users=0, per_user=0)
    found = [failures.count("alice", "203.0.113.9").block_address for _ in range(5)]
    assert [bool(reason) for reason in found] == [False, False, True, False, False]
    assert "3 failed logins" in found[2]


def test_password_spraying_is_seen_across_login_names(client: redis.Redis) -> None:
    failures = counter(client, per_address=0, spray_users=4, per_user=0)
    found = [failures.count(f"user{n}", "203.0.113.10").block_address for n in range(4)]
    assert not any(found[:3]) and "4 different login names" in found[3]


def test_an_account_under_attack_raises_one_alert(client: redis.Redis) -> None:
    failures = counter(client, per_address=0, spray_users=0, per_user=3)
    alerts = [failures.count("bob", f"203.0.113.{n}").alert_user for n in range(5)]
    assert [bool(a) for a in alerts] == [False, False, True, False, False]


def test_the_counters_live_one_window(client: redis.Redis) -> None:
    failures = counter(client, window="90s")
    failures.count("carol", "203.0.113.11")
    assert 0 < client.ttl("t:ph:fa:203.0.113.11") <= 90


# --- policyd's rate-limit hits ----------------------------------------------------------------------------

def test_a_users_rate_limit_hit_raises_one_snag_per_quiet_period(client: redis.Redis) -> None:
    from phishhook.mode import Mode
    from phishhook.ratelimit_signal import RateLimitSignalSettings, RateLimitWatcher

    raised: list[tuple[str, str, Mode]] = []
    clock = [1000.0]
    watcher = RateLimitWatcher(client, "t:", RateLimitSignalSettings(quiet=600), {"user-messages-per-hour"},
                               lambda user, reason, _details, mode: raised.append((user, reason, mode)),
                               now=lambda: clock[0])
    watcher.last_id = "0"

    def hit(limit: str, key: str) -> None:
        client.xadd("t:ev:ratelimit", {"limit": limit, "key": key, "count": "201", "max": "200", "at": "1"})

    hit("user-messages-per-hour", "Mallory")
    hit("user-messages-per-hour", "mallory")  # the same blast
    hit("client-per-minute", "203.0.113.5")  # a limit not counted per user: not a phish signal
    assert watcher.poll(block_ms=10) == 1
    assert raised == [("mallory", "hit the rate limit user-messages-per-hour: 201 counted, 200 allowed",
                       Mode.ALERT)]
    clock[0] += 601
    hit("user-messages-per-hour", "mallory")
    assert watcher.poll(block_ms=10) == 1
    watcher.settings = RateLimitSignalSettings(action="off")
    hit("user-messages-per-hour", "oscar")
    assert watcher.poll(block_ms=10) == 0


def test_judging_reads_only_the_recent_logins_but_all_of_them(client: redis.Redis) -> None:
    from phishhook.history import RECALL_FIRST

    logins = history(client, size=50, merge_within=0)
    for n in range(30):  # one login an hour
        remember(logins, "alice", sighting(DAY + n * 3600, address=f"128.197.26.{n}"))
    now = DAY + 30 * 3600
    assert len(logins.recall("alice", BOSTON, now, within=3 * 3600).earlier) == RECALL_FIRST
    assert len(logins.recall("alice", BOSTON, now, within=20 * 3600).earlier) == 30  # more than the first batch
    assert len(logins.recall("alice", BOSTON).earlier) == 30
