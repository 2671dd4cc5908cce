"""Impossible travel: whether a new login is too far, too soon after the user's earlier logins.

Pure logic: the caller brings the sightings (from the login history in Redis) and the settings; nothing
here reads a clock, a file or a database. Two rules:

- **impossible travel**: the implied speed between two logins exceeds ``max_speed_kmh`` (a jet's cruising
  speed by default) over more than ``min_distance_km``;
- **region rules**, the seed university's rule made a preset: a login from outside the home region less
  than ``within`` after one from inside it, whatever the speed (e.g. outside North America within 8 hours).

Before either, the exemptions that need nothing but the two sightings (the learnt places, travel notices
and allow lists are the detector's): a side without a place or coordinates; a side that is not PUBLIC
(private, trusted, relay and invalid addresses are recorded in the history but never compared: a relay
such as Outlook mobile's datacentre says where Microsoft is, not where the user is); the same address;
the same AS number when ``same_asn_exempt`` (mobile carriers place one phone in many cities); and two
places no further apart than ``min_distance_km`` once both accuracy radii are subtracted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator

from mailwarden.section import Section
from mailwarden.units import Duration
from phishhook.geo import Place, separation_km
from phishhook.networks import AddressClass

IMPOSSIBLE_TRAVEL = "impossible-travel"
"""The rule name of a Travel found by speed (a region rule's Travel carries that rule's name)."""

CONTINENTS = frozenset({"AF", "AN", "AS", "EU", "NA", "OC", "SA"})
"""MaxMind's continent codes."""


@dataclass(frozen=True)
class Sighting:
    """One successful login as the history keeps it."""

    at: float
    """When, in epoch seconds."""
    address: str
    """The client address, normalised (networks.Classified.address)."""
    place: Place | None
    """Where the City database puts it; None when it has no place (or no database is configured)."""
    kind: AddressClass
    group: str
    """The relay group or trusted network it belongs to; "" otherwise."""
    service: str
    """Where the password was used: "smtp", "imap", "pop3", "webmail", ..."""

    @property
    def located(self) -> bool:
        return self.place is not None and self.place.has_coordinates

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {"at": self.at, "address": self.address, "place": self.place.as_dict() if self.place else None,
                "kind": self.kind.value, "group": self.group, "service": self.service}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sighting:
        """The inverse of ``as_dict``; ValueError (or KeyError for a missing key) on a malformed entry."""
        at = data["at"]
        if isinstance(at, bool) or not isinstance(at, int | float):
            raise ValueError(f"sighting: at must be a number, not {at!r}")
        place = data.get("place")
        if place is not None and not isinstance(place, Mapping):
            raise ValueError(f"sighting: place must be an object, not {place!r}")
        return cls(at=float(at), address=str(data["address"]), place=Place.from_dict(place) if place else None,
                   kind=AddressClass(data["kind"]), group=str(data.get("group", "")),
                   service=str(data.get("service", "")))


class RegionRule(Section):
    """A login from outside the home region less than ``within`` after one from inside it triggers, whatever
    the speed. The seed university's rule is ``{name = "left-north-america", home_continents = ["NA"]}``.

    Home is given by continent codes (``home_continents``: AF, AN, AS, EU, NA, OC, SA) and/or ISO country
    codes (``home_countries``: "US", "CA"): two lists, because both kinds are two upper-case letters ("NA"
    is also Namibia). A place is inside home when its continent or its country is listed. Both logins must
    be located to a country for the rule to apply.
    """

    name: Annotated[str, Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9-]*$")]
    """Shown as the snag's rule, e.g. "left-north-america" (lower case, digits and dashes)."""
    home_continents: list[str] = []
    """Continent codes of home, e.g. ["NA"]. Default: none."""
    home_countries: list[str] = []
    """ISO 3166-1 alpha-2 country codes of home, e.g. ["US", "CA"]. Default: none."""
    within: Duration = 8 * 3600
    """How soon after a login from home one from outside triggers: seconds or "8h". Default: 8h."""

    @field_validator("home_continents")
    @classmethod
    def _continents(cls, codes: list[str]) -> list[str]:
        wrong = [code for code in codes if code not in CONTINENTS]
        if wrong:
            raise ValueError(f"not continent codes: {wrong}; use {', '.join(sorted(CONTINENTS))} (countries go in "
                             "home_countries)")
        return codes

    @field_validator("home_countries")
    @classmethod
    def _countries(cls, codes: list[str]) -> list[str]:
        wrong = [code for code in codes if len(code) != 2 or not code.isascii() or not code.isalpha()
                 or not code.isupper()]
        if wrong:
            raise ValueError(f"not ISO country codes: {wrong}; use two upper-case letters such as US, CA")
        return codes

    @model_validator(mode="after")
    def _some_home(self) -> RegionRule:
        if not self.home_continents and not self.home_countries:
            raise ValueError(f"region rule {self.name!r}: give home_continents or home_countries (or both)")
        return self

    def is_home(self, place: Place) -> bool:
        return place.continent in self.home_continents or place.country in self.home_countries


class VelocitySettings(Section):
    """When a login is too far from an earlier one too soon (see the module docstring)."""

    max_speed_kmh: Annotated[float, Field(gt=0)] = 900
    """Travel faster than this (km/h) is impossible; 900 is a jet's cruising speed. Default: 900."""
    min_distance_km: Annotated[float, Field(ge=0)] = 50
    """Two logins no further apart than this (km, after subtracting both accuracy radii) are never compared.
    Default: 50."""
    compare_within: Duration = 86400
    """Only earlier logins this recent are compared with a new one: seconds or "24h". Default: 24h."""
    region_rules: list[RegionRule] = []
    """Region rules (the seed's preset and the like), checked before the speed rule. Default: none."""
    same_asn_exempt: bool = True
    """Two logins from the same AS number never trigger (mobile carriers geolocate one phone to many cities;
    needs the ASN database). Default: true."""


@dataclass(frozen=True)
class Travel:
    """Two logins the user cannot have made both."""

    rule: str
    """IMPOSSIBLE_TRAVEL, or the region rule's name."""
    before: Sighting
    after: Sighting
    distance_km: float
    """Between the two places, after subtracting both accuracy radii."""
    hours: float
    """Between the two logins (never negative)."""
    speed_kmh: float
    """distance_km / hours; math.inf when both happened at the same second over a distance."""

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe: an infinite speed is null (JSON has no infinity) with ``instant`` true."""
        return {"rule": self.rule, "before": self.before.as_dict(), "after": self.after.as_dict(),
                "distance_km": round(self.distance_km, 1), "hours": self.hours,
                "speed_kmh": round(self.speed_kmh, 1) if math.isfinite(self.speed_kmh) else None,
                "instant": math.isinf(self.speed_kmh)}


def speed(before: Sighting, after: Sighting) -> tuple[float, float, float]:
    """(km after subtracting both radii, hours, km/h) between two logins, for the review's timeline.

    The km and km/h are math.nan when either side has no coordinates (show "unknown"); km/h is math.inf
    when the logins share a second over a distance. Hours are never negative, whatever the order.
    """
    hours = abs(after.at - before.at) / 3600
    if not (before.located and after.located):
        return math.nan, hours, math.nan
    assert before.place is not None and after.place is not None
    km = separation_km(before.place, after.place)
    if hours > 0:
        return km, hours, km / hours
    return km, hours, math.inf if km > 0 else 0.0


def _comparable(new: Sighting, earlier: Sighting, settings: VelocitySettings) -> bool:
    """The pure exemptions: False when this pair must never trigger, whatever the rule."""
    if not (new.located and earlier.located):
        return False
    if new.kind is not AddressClass.PUBLIC or earlier.kind is not AddressClass.PUBLIC:
        return False
    if new.address == earlier.address:
        return False
    assert new.place is not None and earlier.place is not None
    return not (settings.same_asn_exempt and new.place.asn is not None and new.place.asn == earlier.place.asn)


def _region_rule(rule: RegionRule, before: Sighting, after: Sighting) -> bool:
    assert before.place is not None and after.place is not None
    if not (before.place.country and after.place.country):
        return False
    elapsed = after.at - before.at
    return 0 <= elapsed < rule.within and rule.is_home(before.place) and not rule.is_home(after.place)


def judge(new: Sighting, earlier: Sequence[Sighting], settings: VelocitySettings) -> Travel | None:
    """The strongest travel between ``new`` and an earlier login within ``compare_within``, or None.

    A region rule's travel wins over the speed rule's; among the same kind, the highest speed (then the
    longest distance). Sightings later than ``new`` (clocks of two hosts) are compared by the absolute time
    between them for speed, and never by a region rule (it needs home first).
    """
    best_region: tuple[tuple[float, float], Travel] | None = None
    best_speed: tuple[tuple[float, float], Travel] | None = None
    for other in earlier:
        if abs(new.at - other.at) > settings.compare_within or not _comparable(new, other, settings):
            continue
        km, hours, kmh = speed(other, new)
        if km <= settings.min_distance_km:
            continue
        strength = (kmh, km)
        for rule in settings.region_rules:
            if _region_rule(rule, other, new):
                if best_region is None or strength > best_region[0]:
                    best_region = strength, Travel(rule.name, other, new, km, hours, kmh)
                break
        if kmh > settings.max_speed_kmh and (best_speed is None or strength > best_speed[0]):
            first, second = (other, new) if other.at <= new.at else (new, other)
            best_speed = strength, Travel(IMPOSSIBLE_TRAVEL, first, second, km, hours, kmh)
    if best_region is not None:
        return best_region[1]
    return best_speed[1] if best_speed is not None else None
