"""Each user's recent logins and usual places, in Redis (keys in ``phishhook/keys.py``), so every MX host,
the Dovecot endpoint and the intake judge one history.

A login costs two round trips: ``recall`` (the earlier logins, how often the user and the organisation were
at the new place, when the user was first seen and last cleared) in one pipeline, then ``remember`` in
another. Two logins of one user judged at once on two hosts may each miss the other: the history is a
record for judging travel, not a lock, and the next login sees both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import redis
from pydantic import Field

from mailwarden.section import Section
from mailwarden.units import Duration
from phishhook import keys
from phishhook.geo import Place
from phishhook.velocity import Sighting

DAY = 86400
RECALL_FIRST = 8
"""Logins read first when judging one (the rest only when all of these are recent enough to compare)."""


class HistorySettings(Section):
    """``[phishhook.history]``: what is remembered of each user's logins, and what counts as usual."""

    size: int = Field(default=50, ge=2, le=1000)
    """Logins kept per user (newest first)."""
    ttl: Duration = 90 * DAY
    """Seconds ("90d") a user's history is kept after their last login."""
    merge_within: Duration = 600
    """A login from the same address and service within this many seconds of the user's last one updates
    that entry instead of adding one (a mail client polling every minute does not flood the history)."""
    regular_days: int = Field(default=3, ge=1)
    """A place (city, or country when the database has no city) where the user logged in on this many
    different days is theirs: logins from it never trigger geo-velocity."""
    org_regular_users: int = Field(default=25, ge=0)
    """A place where this many different users logged in is the organisation's (a partner campus, a
    conference venue): logins from it never trigger. 0: no organisation places."""
    learning_period: Duration = 7 * DAY
    """Seconds ("7d") after phishhook first sees an account log in during which its snags only alert
    (nothing is blocked): a new account's usual places are not known yet."""


def place_label(place: Place | None) -> str | None:
    """The key of a place among the user's places: ``CC|City`` (city may be empty); None without a country."""
    if place is None or not place.country:
        return None
    return f"{place.country}|{place.city}"


@dataclass(frozen=True)
class Recall:
    """What the history says before a login is judged."""

    earlier: list[Sighting]
    """The user's recent logins, newest first."""
    place_days: int
    """Days the user logged in from the new login's place."""
    org_users: int
    """About how many users logged in from that place (a HyperLogLog count)."""
    first_seen: float | None
    cleared: float | None
    """When the account was last confirmed safe: earlier logins are not compared with later ones."""
    place_entry: bytes | None = None
    """The user's entry for the new login's place as read ("days:last day"), so remembering needs no read."""


class LoginHistory:
    def __init__(self, client: redis.Redis, prefix: str, settings: HistorySettings,
                 now: Callable[[], float] = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.settings = settings
        self.now = now
        self._remember = client.register_script((resources.files("phishhook") / "scripts" / "remember.lua").read_text())

    def _key(self, kind: str, user: str) -> str:
        return keys.user_key(self.prefix, kind, user)

    def recall(self, user: str, place: Place | None, at: float | None = None, within: float | None = None) -> Recall:
        """What the history says before a login of ``user`` at ``place``. With ``at`` and ``within``, only the
        logins of the ``within`` seconds before ``at`` are needed: the newest RECALL_FIRST are read, and the
        rest only when the oldest of those is still that recent (parsing fifty entries a login is most of a
        login's cost)."""
        label = place_label(place)
        history = self._key(keys.HISTORY, user)
        first = RECALL_FIRST if at is not None and within is not None else self.settings.size
        pipe = self.client.pipeline(transaction=False)
        pipe.lrange(history, 0, first - 1)
        pipe.hget(self._key(keys.PLACES, user), label or "-")
        pipe.pfcount(keys.place_key(self.prefix, label or "-"))
        pipe.get(self._key(keys.FIRST_SEEN, user))
        pipe.get(self._key(keys.CLEARED, user))
        raw_history, raw_days, org_users, first_seen, cleared = pipe.execute()
        earlier = _sightings(raw_history)
        if (len(raw_history) == first < self.settings.size and earlier and at is not None and within is not None
                and at - earlier[-1].at <= within):
            earlier += _sightings(list(self.client.lrange(history, first, self.settings.size - 1)))
        days = _days(raw_days) if label else 0
        return Recall(earlier=earlier, place_days=days, org_users=int(org_users) if label else 0,
                      first_seen=_float(first_seen), cleared=_float(cleared),
                      place_entry=raw_days if label else None)

    def remember(self, user: str, sighting: Sighting, recall: Recall) -> None:
        """Add the login (or refresh the last one, ``merge_within``), count its place, note the first sighting:
        one script, one round trip (scripts/remember.lua)."""
        latest = recall.earlier[0] if recall.earlier else None
        body = json.dumps(sighting.as_dict(), separators=(",", ":"))
        merge = (latest is not None and latest.address == sighting.address and latest.service == sighting.service
                 and 0 <= sighting.at - latest.at <= self.settings.merge_within)
        label = place_label(sighting.place) or ""
        entry = ""
        if label:
            day = int(sighting.at // DAY)
            days = recall.place_days + (0 if _last_day(recall.place_entry) == day else 1)  # recall read this place
            entry = f"{days}:{day}"
        self._remember(keys=[self._key(keys.HISTORY, user), self._key(keys.PLACES, user),
                             keys.place_key(self.prefix, label) if label else self._key(keys.PLACES, user),
                             self._key(keys.FIRST_SEEN, user)],
                       args=[body, "1" if merge else "0", self.settings.size, int(self.settings.ttl), label, entry,
                             user, f"{sighting.at:.0f}"])

    def recent(self, user: str, limit: int | None = None) -> list[Sighting]:
        """The user's recent logins, newest first (``phish logins``, the review page)."""
        end = (limit or self.settings.size) - 1
        return _sightings(list(self.client.lrange(self._key(keys.HISTORY, user), 0, end)))

    def clear(self, user: str, at: float | None = None) -> None:
        """The account was confirmed safe at ``at`` (default now): logins until then are not compared with
        later ones, so the travel just judged does not snag the account again at its next login."""
        self.client.set(self._key(keys.CLEARED, user), f"{at if at is not None else self.now():.3f}",
                        ex=int(self.settings.ttl))

    def in_learning(self, recall: Recall, at: float) -> bool:
        """Whether the account is still in its learning period (first seen less than learning_period ago,
        or never seen before this login)."""
        if self.settings.learning_period <= 0:
            return False
        return recall.first_seen is None or at - recall.first_seen < self.settings.learning_period


def _days(stored: object) -> int:
    """The day count in a ``days:last day`` entry of the user's places."""
    if not isinstance(stored, bytes):
        return 0
    try:
        return int(stored.split(b":")[0] or 0)
    except ValueError:
        return 0


def _last_day(stored: object) -> int | None:
    """The day number in a ``days:last day`` entry of the user's places."""
    if not isinstance(stored, bytes) or b":" not in stored:
        return None
    try:
        return int(stored.split(b":")[1])
    except ValueError:
        return None


def _float(raw: bytes | None) -> float | None:
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _sightings(raw: list[Any]) -> list[Sighting]:
    found = []
    for item in raw:
        try:
            found.append(Sighting.from_dict(json.loads(item)))
        except (ValueError, TypeError, KeyError):
            continue  # an entry written by another version, or damaged: the rest still count
    return found
