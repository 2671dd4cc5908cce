"""The detector as the services assemble it (``build_detector`` from a config file): a real Redis, the SQLite
store, the full 2018 GeoLite2 City database. What judges a login beyond the pure velocity rule: the user's and
the organisation's usual places, the learning period, alert-only mode, allow entries, relay networks; and the
security team's verdicts (confirm, safe, dismiss), which lift the blocks and keep the travel just judged from
snagging again."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness.policyd_proc import render_toml
from harness.redis_server import RedisProcess
from phish_places import CN_BEIJING, CN_BEIJING_B, JP_TOKYO, MS_OUTLOOK, US_BOSTON_A, US_BOSTON_B, full_city_database

from mailwarden.config import load_config
from phishhook.app import build_detector
from phishhook.detector import Detector
from phishhook.events import LoginEvent
from phishhook.resolution import Learn, Resolver
from phishhook.snags import SnagState, SnagStateError
from policyd.blocklist import BlockList
from quarantine.store import QuarantineStore

HOUR, DAY = 3600.0, 86400.0
T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def make_detector(tmp_path: Path, redis_server: RedisProcess) -> Iterator[Callable[..., Detector]]:
    made: list[Detector] = []

    def make(**phishhook: object) -> Detector:
        settings = {"redis": {"url": redis_server.url, "key_prefix": "phdet:"},
                    "quarantine": {"database_url": f"sqlite:///{tmp_path / 'q.sqlite'}",
                                   "message_dir": str(tmp_path / "held")},
                    "phishhook": {"geo": {"city_database": str(full_city_database())},
                                  "history": {"learning_period": "0s"}, **phishhook}}
        path = tmp_path / "mailwarden.toml"
        path.write_text(render_toml(settings))
        config = load_config(path)
        QuarantineStore(config.section("quarantine")).migrate()
        detector = build_detector(config, None, background=False)
        clock = Clock()
        detector.now = clock
        detector.history.now = clock
        made.append(detector)
        return detector

    yield make
    for detector in made:
        detector.close()


def login(detector: Detector, user: str, address: str, at: float, service: str = "imap"):
    detector.now.now = at  # type: ignore[attr-defined]
    return detector.login(LoginEvent(user=user, address=address, at=at, success=True, service=service, via="test"))


def blocked(detector: Detector) -> set[tuple[str, str]]:
    return {(entry.kind, entry.value) for entry in BlockList(detector.parts.client, detector.parts.prefix).entries()}


def test_impossible_travel_snags_and_blocks(make_detector) -> None:
    detector = make_detector()
    login(detector, "alice", US_BOSTON_A, T0)
    outcome = login(detector, "alice", CN_BEIJING, T0 + HOUR)
    assert outcome.snag is not None and outcome.snag.state == SnagState.OPEN
    assert blocked(detector) == {("user", "alice"), ("client", CN_BEIJING)}
    assert detector.blocked("alice", US_BOSTON_A) == "account blocked"
    assert detector.blocked("bob", CN_BEIJING) == "address blocked"


def test_slow_travel_does_not_snag(make_detector) -> None:
    detector = make_detector()
    login(detector, "alice", US_BOSTON_A, T0)
    assert login(detector, "alice", CN_BEIJING, T0 + 14 * HOUR).snag is None  # ~770 km/h: a flight


def test_a_usual_place_of_the_user_does_not_snag(make_detector) -> None:
    detector = make_detector()
    for day in range(3):  # Tokyo on three days: the user's place
        login(detector, "kenji", JP_TOKYO, T0 + day * DAY)
    login(detector, "kenji", US_BOSTON_A, T0 + 3 * DAY)
    outcome = login(detector, "kenji", JP_TOKYO, T0 + 3 * DAY + HOUR)
    assert outcome.travel is not None and outcome.snag is None
    assert outcome.exempt.startswith("a usual place of the user")


def test_a_usual_place_of_the_organisation_does_not_snag(make_detector) -> None:
    detector = make_detector(history={"learning_period": "0s", "org_regular_users": 5})
    for n in range(6):
        login(detector, f"staff{n}", CN_BEIJING_B, T0)
    login(detector, "visitor", US_BOSTON_A, T0 + DAY)
    outcome = login(detector, "visitor", CN_BEIJING_B, T0 + DAY + HOUR)
    assert outcome.snag is None and outcome.exempt.startswith("a usual place of the organisation")


def test_a_new_account_only_alerts_during_its_learning_period(make_detector) -> None:
    detector = make_detector(history={"learning_period": "7d"})
    login(detector, "newbie", US_BOSTON_A, T0)
    outcome = login(detector, "newbie", CN_BEIJING, T0 + HOUR)
    assert outcome.snag is not None and outcome.snag.state == SnagState.ALERT and outcome.snag.mode == "alert"
    assert blocked(detector) == set()
    login(detector, "newbie", US_BOSTON_A, T0 + 8 * DAY)  # learnt: enforced from now on
    assert login(detector, "newbie", JP_TOKYO, T0 + 8 * DAY + HOUR).snag.mode == "enforce"  # type: ignore[union-attr]
    assert ("user", "newbie") in blocked(detector)


def test_alert_only_mode_blocks_nothing(make_detector) -> None:
    detector = make_detector(mode="alert")
    login(detector, "alice", US_BOSTON_A, T0)
    outcome = login(detector, "alice", CN_BEIJING, T0 + HOUR)
    assert outcome.snag is not None and outcome.snag.state == SnagState.ALERT
    assert blocked(detector) == set()
    skipped = {action.name: action.detail for action in detector.parts.snags.get(outcome.snag.public_id).actions}
    assert "alert-only" in skipped["block-account"]


def test_allow_entries_for_a_network_or_a_country(make_detector) -> None:
    detector = make_detector()
    detector.parts.snags.add_allow("alice", "166.111.0.0/16", None, by="test")
    detector.parts.snags.add_allow(None, None, "JP", by="test")  # organisation-wide
    login(detector, "alice", US_BOSTON_A, T0)
    assert login(detector, "alice", CN_BEIJING, T0 + HOUR).exempt.startswith("allow entry")
    login(detector, "bob", US_BOSTON_A, T0)
    assert login(detector, "bob", JP_TOKYO, T0 + HOUR).exempt.startswith("allow entry")
    login(detector, "carol", US_BOSTON_A, T0)
    assert login(detector, "carol", CN_BEIJING, T0 + HOUR).snag is not None


def test_a_relay_network_login_is_recorded_and_never_compared(make_detector) -> None:
    detector = make_detector()
    login(detector, "dave", US_BOSTON_A, T0)
    outcome = login(detector, "dave", MS_OUTLOOK, T0 + 600)
    assert outcome.snag is None and outcome.travel is None
    [latest, _first] = detector.history.recent("dave")
    assert latest.kind == "relay" and latest.group == "microsoft-outlook"
    assert login(detector, "dave", US_BOSTON_B, T0 + 1200).snag is None  # the relay is no "previous place"


def test_confirm_safe_unblocks_learns_and_the_next_login_does_not_snag_again(make_detector) -> None:
    detector = make_detector()
    login(detector, "alice", US_BOSTON_A, T0)
    snag = login(detector, "alice", CN_BEIJING, T0 + HOUR).snag
    assert snag is not None
    resolved = Resolver(detector).confirm_safe(snag.public_id, "review:sam", "at a conference",
                                               Learn(travel_days=10, travel_countries=("CN",)))
    assert resolved.snag.state == SnagState.SAFE and resolved.learnt == ["travel notice 1"]
    assert blocked(detector) == set()
    assert login(detector, "alice", CN_BEIJING, T0 + 2 * HOUR).snag is None
    audit = [(entry.actor, entry.action) for entry in detector.parts.snags.audit(snag.public_id)]
    assert ("review:sam", "confirm-safe") in audit and ("review:sam", "unblock") in audit
    with pytest.raises(SnagStateError):
        Resolver(detector).dismiss(snag.public_id, "review:kim")


def test_confirm_compromised_keeps_the_blocks(make_detector) -> None:
    detector = make_detector()
    login(detector, "erin", US_BOSTON_A, T0)
    snag = login(detector, "erin", CN_BEIJING, T0 + HOUR).snag
    assert snag is not None
    Resolver(detector).confirm_compromised(snag.public_id, "review:sam")
    assert ("user", "erin") in blocked(detector)


def test_failed_logins_block_their_address_once_over_the_limit(make_detector) -> None:
    detector = make_detector(bruteforce={"per_address": 3, "spray_users": 0, "per_user": 0})
    for n in range(3):
        detector.failed_login(LoginEvent(user=f"u{n}", address=CN_BEIJING, at=T0, success=False,
                                         service="imap", via="test"))
    assert ("client", CN_BEIJING) in blocked(detector)
    assert detector.history.recent("u0") == []  # failures never feed geo-velocity
