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
from typing import Any

import redis
from pydantic import Field

from mailwarden.section import Section
from mailwarden.units import Duration
from phishhook import keys
from phishhook.geo import Place
from phishhook.velocity import Sighting

DAY = 86400


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


class LoginHistory:
    def __init__(self, client: redis.Redis, prefix: str, settings: HistorySettings,
                 now: Callable[[], float] = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.settings = settings
        self.now = now

    def _key(self, kind: str, user: str) -> str:
        return keys.user_key(self.prefix, kind, user)

    def recall(self, user: str, place: Place | None) -> Recall:
        label = place_label(place)
        pipe = self.client.pipeline(transaction=False)
        pipe.lrange(self._key(keys.HISTORY, user), 0, self.settings.size - 1)
        pipe.hget(self._key(keys.PLACES, user), label or "-")
        pipe.pfcount(keys.place_key(self.prefix, label or "-"))
        pipe.get(self._key(keys.FIRST_SEEN, user))
        pipe.get(self._key(keys.CLEARED, user))
        raw_history, raw_days, org_users, first, cleared = pipe.execute()
        days = 0
        if label and raw_days:
            days = int(raw_days.split(b":")[0] or 0)
        return Recall(earlier=_sightings(raw_history), place_days=days, org_users=int(org_users) if label else 0,
                      first_seen=_float(first), cleared=_float(cleared))

    def remember(self, user: str, sighting: Sighting, recall: Recall) -> None:
        """Add the login (or refresh the last one, ``merge_within``), count its place, note the first sighting."""
        ttl = int(self.settings.ttl)
        history = self._key(keys.HISTORY, user)
        pipe = self.client.pipeline(transaction=False)
        latest = recall.earlier[0] if recall.earlier else None
        body = json.dumps(sighting.as_dict(), separators=(",", ":"))
        if (latest is not None and latest.address == sighting.address and latest.service == sighting.service
                and 0 <= sighting.at - latest.at <= self.settings.merge_within):
            pipe.lset(history, 0, body)
        else:
            pipe.lpush(history, body)
            pipe.ltrim(history, 0, self.settings.size - 1)
        pipe.expire(history, ttl)
        label = place_label(sighting.place)
        if label is not None:
            day = int(sighting.at // DAY)
            places = self._key(keys.PLACES, user)
            stored = self.client.hget(places, label) if recall.place_days else None
            last_day = _last_day(stored)
            days = recall.place_days + (0 if last_day == day else 1)
            pipe.hset(places, label, f"{days}:{day}")
            pipe.expire(places, ttl)
            org = keys.place_key(self.prefix, label)
            pipe.pfadd(org, user)
            pipe.expire(org, ttl)
        first = self._key(keys.FIRST_SEEN, user)
        pipe.set(first, f"{sighting.at:.0f}", nx=True)
        pipe.expire(first, ttl)
        pipe.execute()

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
