"""phishhook.velocity: the impossible-travel and region rules and their exemptions, table-driven; then the
same rules on real addresses through the full GeoLite2 City database and the shipped relay groups."""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import phish_places as pp
import pytest
from pydantic import ValidationError

from phishhook.geo import GeoLocator, GeoSettings, Place, separation_km
from phishhook.networks import AddressClass, NetworkClassifier, NetworkSettings
from phishhook.velocity import IMPOSSIBLE_TRAVEL, RegionRule, Sighting, Travel, VelocitySettings, judge, speed

HOUR = 3600.0
T0 = 1_790_000_000.0  # a fixed moment: nothing here reads the clock

BOSTON = Place(country="US", continent="NA", city="Boston", subdivision="MA", latitude=42.3451,
               longitude=-71.0993, radius_km=5)
NEW_YORK = Place(country="US", continent="NA", city="New York", subdivision="NY", latitude=40.7128,
                 longitude=-74.0060, radius_km=5)  # 306 km from Boston
TORONTO = Place(country="CA", continent="NA", city="Toronto", latitude=43.6532, longitude=-79.3832, radius_km=5)
MEXICO_CITY = Place(country="MX", continent="NA", city="Mexico City", latitude=19.4326, longitude=-99.1332,
                    radius_km=5)  # 3,700 km from Boston
LONDON = Place(country="GB", continent="EU", city="London", latitude=51.5142, longitude=-0.0931,
               radius_km=10)  # 5,260 km from Boston
BEIJING = Place(country="CN", continent="AS", city="Beijing", latitude=39.9289, longitude=116.3883,
                radius_km=1)  # 10,800 km from Boston

SEED = RegionRule(name="left-north-america", home_continents=["NA"], within="8h")

_addresses = iter(f"192.0.2.{n}" for n in range(1, 255))


def seen(hours: float, place: Place | None, *, address: str | None = None, kind: AddressClass = AddressClass.PUBLIC,
         group: str = "", service: str = "imap") -> Sighting:
    """A login ``hours`` after T0; each gets its own address unless one is given."""
    return Sighting(at=T0 + hours * HOUR, address=address or next(_addresses), place=place, kind=kind, group=group,
                    service=service)


def rule_of(travel: Travel | None) -> str | None:
    return travel.rule if travel is not None else None


# --- the speed rule ---

@pytest.mark.parametrize(("before", "after", "settings", "expected"), [
    # the baseline every exemption below departs from: Boston, then Beijing an hour later
    (seen(0, BOSTON), seen(1, BEIJING), {}, IMPOSSIBLE_TRAVEL),
    (seen(0, BOSTON), seen(1, NEW_YORK), {}, None),  # 296 km/h: a plane could
    (seen(0, BOSTON), seen(0.25, NEW_YORK), {}, IMPOSSIBLE_TRAVEL),  # 1,180 km/h: it could not
    (seen(0, BOSTON), seen(0.25, NEW_YORK), {"max_speed_kmh": 1200}, None),
    (seen(0, BOSTON), seen(12.1, BEIJING), {}, None),  # 10,830 km in 12.1 h: 895 km/h
    (seen(0, BOSTON), seen(12, BEIJING), {}, IMPOSSIBLE_TRAVEL),  # in 12 h: 902 km/h
    # only earlier logins within compare_within are compared
    (seen(0, BOSTON), seen(2, BEIJING), {"compare_within": "1h"}, None),
    (seen(0, BOSTON), seen(2, BEIJING), {"compare_within": "2h"}, IMPOSSIBLE_TRAVEL),
    # the same second over a distance: an infinite speed
    (seen(0, BOSTON), seen(0, NEW_YORK), {}, IMPOSSIBLE_TRAVEL),
    # clocks of two hosts: a sighting stamped after the new one is still compared
    (seen(1, BOSTON), seen(0.9, BEIJING), {}, IMPOSSIBLE_TRAVEL),
])
def test_speed_rule(before, after, settings, expected):
    assert rule_of(judge(after, [before], VelocitySettings(**settings))) == expected


def test_a_travel_reports_distance_time_and_speed():
    before, after = seen(0, BOSTON), seen(2, BEIJING)
    travel = judge(after, [before], VelocitySettings())
    assert travel is not None
    assert (travel.before, travel.after) == (before, after)
    assert travel.distance_km == pytest.approx(separation_km(BOSTON, BEIJING))
    assert travel.distance_km == pytest.approx(10_800, rel=0.02)
    assert travel.hours == 2 and travel.speed_kmh == pytest.approx(travel.distance_km / 2)


def test_out_of_order_sightings_are_reported_in_time_order():
    earlier_stamped_later = seen(1, BOSTON)
    new = seen(0.9, BEIJING)
    travel = judge(new, [earlier_stamped_later], VelocitySettings())
    assert travel is not None and travel.before is new and travel.after is earlier_stamped_later
    assert travel.hours == pytest.approx(0.1)


# --- the exemptions, one by one: each row differs from the triggering baseline in that one respect ---

def exempt(reason: str, before: Sighting, after: Sighting, settings: VelocitySettings, trigger: bool) -> None:
    assert (judge(after, [before], settings) is not None) is trigger, reason


@pytest.mark.parametrize("kind", [AddressClass.PRIVATE, AddressClass.TRUSTED, AddressClass.RELAY,
                                  AddressClass.INVALID])
@pytest.mark.parametrize("side", ["before", "after"])
def test_only_public_addresses_are_compared(kind, side):
    """A relay login is recorded with its place (e.g. Microsoft's datacentre) but never compared."""
    pair = {"before": seen(0, BOSTON), "after": seen(1, BEIJING)}
    exempt("baseline", pair["before"], pair["after"], VelocitySettings(), trigger=True)
    pair[side] = replace(pair[side], kind=kind, group="microsoft-outlook" if kind is AddressClass.RELAY else "")
    exempt(f"{side} {kind}", pair["before"], pair["after"], VelocitySettings(), trigger=False)


@pytest.mark.parametrize("side", ["before", "after"])
@pytest.mark.parametrize("unlocated", [None, replace(BEIJING, latitude=None, longitude=None)])
def test_a_side_without_place_or_coordinates_is_not_compared(side, unlocated):
    """Even a region rule, which needs only countries, needs both sides located (the place without
    coordinates still has its country, so dropping the check would let the region rule fire)."""
    settings = VelocitySettings(region_rules=[SEED])
    pair = {"before": seen(0, BOSTON), "after": seen(1, BEIJING)}
    exempt("baseline", pair["before"], pair["after"], settings, trigger=True)
    pair[side] = replace(pair[side], place=unlocated if side == "after" else
                         (replace(BOSTON, latitude=None) if unlocated is not None else None))
    exempt(f"{side} unlocated", pair["before"], pair["after"], settings, trigger=False)


def test_the_same_address_is_not_compared_even_if_its_place_changed():
    """The database was updated between two logins from one address: the address did not travel."""
    exempt("baseline", seen(0, BOSTON, address="192.0.2.77"), seen(1, BEIJING, address="192.0.2.78"),
           VelocitySettings(), trigger=True)
    exempt("same address", seen(0, BOSTON, address="192.0.2.77"), seen(1, BEIJING, address="192.0.2.77"),
           VelocitySettings(), trigger=False)


def test_the_same_asn_is_not_compared_when_exempt():
    carrier_boston, carrier_beijing = replace(BOSTON, asn=21928, org="T-Mobile USA"), replace(BEIJING, asn=21928)
    exempt("same ASN", seen(0, carrier_boston), seen(1, carrier_beijing), VelocitySettings(), trigger=False)
    exempt("same ASN, not exempt", seen(0, carrier_boston), seen(1, carrier_beijing),
           VelocitySettings(same_asn_exempt=False), trigger=True)
    exempt("other ASN", seen(0, carrier_boston), seen(1, replace(BEIJING, asn=4134)), VelocitySettings(),
           trigger=True)
    exempt("ASN unknown on both sides is no match", seen(0, BOSTON), seen(1, BEIJING), VelocitySettings(),
           trigger=True)


# two points 60.0 km apart on a meridian, one minute apart in time (3,600 km/h if the radii were ignored)
SOUTH = Place(country="US", continent="NA", latitude=40.0, longitude=-75.0)
NORTH = Place(country="US", continent="NA", latitude=40.0 + 60 / (math.pi * 6371.0088 / 180), longitude=-75.0)


@pytest.mark.parametrize(("radius_south", "radius_north", "trigger"), [
    (0, 0, True),  # 60 km > 50
    (4, 5, True),  # 51 km > 50
    (6, 5, False),  # 49 km
    (10, 10, False),  # 40 km
    (0, 20, False),
    (100, 0, False),  # the circles overlap: 0 km
])
def test_both_accuracy_radii_are_subtracted_before_the_minimum_distance(radius_south, radius_north, trigger):
    before = seen(0, replace(SOUTH, radius_km=radius_south))
    after = seen(1 / 60, replace(NORTH, radius_km=radius_north))
    exempt(f"radii {radius_south}+{radius_north}", before, after, VelocitySettings(min_distance_km=50),
           trigger=trigger)


def test_the_minimum_distance_also_holds_for_region_rules():
    settings = VelocitySettings(region_rules=[RegionRule(name="us-only", home_countries=["US"])])
    detroit = Place(country="US", continent="NA", latitude=42.3314, longitude=-83.0458)
    windsor = Place(country="CA", continent="NA", latitude=42.3149, longitude=-83.0364)  # 2 km, across the river
    assert judge(seen(1, windsor), [seen(0, detroit)], settings) is None
    assert rule_of(judge(seen(1, TORONTO), [seen(0, detroit)], settings)) == "us-only"  # 330 km


# --- region rules: the seed's preset ---

@pytest.mark.parametrize(("before", "after", "rules", "expected"), [
    # Boston, then London 7.5 h later: 700 km/h, too slow for the speed rule, but it left North America
    (seen(0, BOSTON), seen(7.5, LONDON), [SEED], "left-north-america"),
    (seen(0, BOSTON), seen(7.5, LONDON), [], None),
    (seen(0, BOSTON), seen(8, LONDON), [SEED], None),  # less than 8 h after: 8 h is not
    (seen(0, LONDON), seen(7.5, BOSTON), [SEED], None),  # coming home is not leaving it
    (seen(0, LONDON), seen(2, BEIJING), [SEED], IMPOSSIBLE_TRAVEL),  # neither side home: the speed rule
    (seen(0, BOSTON), seen(7, TORONTO), [SEED], None),  # both in North America
    (seen(0, BOSTON), seen(7, MEXICO_CITY), [SEED], None),
    (seen(0, BOSTON), seen(7, MEXICO_CITY), [RegionRule(name="us-canada", home_countries=["US", "CA"])],
     "us-canada"),
    (seen(0, BOSTON), seen(7, TORONTO), [RegionRule(name="us-canada", home_countries=["US", "CA"])], None),
    (seen(0, BOSTON), seen(30, LONDON), [RegionRule(name="a-day-and-more", home_continents=["NA"], within="2d")],
     None),  # within compare_within (24 h) only
    # a place located without a country (an anycast or satellite record) is no region
    (seen(0, replace(BOSTON, country="", continent="")), seen(7.5, LONDON), [SEED], None),
    (seen(0, BOSTON), seen(7.5, replace(LONDON, country="", continent="")), [SEED], None),
])
def test_region_rules(before, after, rules, expected):
    assert rule_of(judge(after, [before], VelocitySettings(region_rules=rules))) == expected


def test_the_first_matching_region_rule_names_the_travel():
    rules = [SEED, RegionRule(name="left-the-us", home_countries=["US"])]
    assert rule_of(judge(seen(7.5, LONDON), [seen(0, BOSTON)], VelocitySettings(region_rules=rules))) == \
        "left-north-america"


# --- the strongest travel ---

def test_the_strongest_travel_is_reported_whatever_the_order():
    new = seen(0, BEIJING)
    slow = seen(-5, NEW_YORK)  # 11,000 km in 5 h
    fastest = seen(-1, BOSTON)  # 10,800 km in 1 h
    slower = seen(-2, LONDON)  # 8,150 km in 2 h
    local = seen(-0.1, replace(BEIJING, city="Beijing east", latitude=39.93, longitude=116.5))  # 9 km
    earlier = [slow, fastest, slower, local]
    for _ in range(5):
        random.Random(_).shuffle(earlier)
        travel = judge(new, earlier, VelocitySettings())
        assert travel is not None and travel.before is fastest and travel.rule == IMPOSSIBLE_TRAVEL


def test_a_region_rule_travel_wins_over_a_faster_speed_travel():
    new = seen(0, LONDON)
    left_home = seen(-7.5, BOSTON)  # the region rule (700 km/h)
    impossible = seen(-0.5, BEIJING)  # 16,000 km/h
    travel = judge(new, [impossible, left_home], VelocitySettings(region_rules=[SEED]))
    assert travel is not None and travel.rule == "left-north-america" and travel.before is left_home
    travel = judge(new, [impossible, left_home], VelocitySettings())
    assert travel is not None and travel.rule == IMPOSSIBLE_TRAVEL and travel.before is impossible


def test_the_strongest_of_two_region_rule_travels():
    new = seen(0, LONDON)
    closer_in_time = seen(-3, BOSTON)
    earlier = seen(-7, BOSTON)
    travel = judge(new, [earlier, closer_in_time], VelocitySettings(region_rules=[SEED]))
    assert travel is not None and travel.before is closer_in_time


def test_nothing_earlier_nothing_to_judge():
    assert judge(seen(0, BOSTON), [], VelocitySettings(region_rules=[SEED])) is None


# --- speed() for the review's timeline, and JSON ---

def test_speed_between_two_logins():
    km, hours, kmh = speed(seen(0, BOSTON), seen(2, NEW_YORK))
    assert km == pytest.approx(separation_km(BOSTON, NEW_YORK)) and hours == 2 and kmh == pytest.approx(km / 2)
    assert speed(seen(2, NEW_YORK), seen(0, BOSTON))[1] == 2  # hours never negative
    assert speed(seen(0, BOSTON), seen(0, NEW_YORK))[2] == math.inf
    assert speed(seen(0, BOSTON), seen(0, BOSTON)) == (0.0, 0.0, 0.0)
    unknown = speed(seen(0, BOSTON), seen(1, None))
    assert math.isnan(unknown[0]) and unknown[1] == 1 and math.isnan(unknown[2])


def test_an_instant_travel_is_valid_json():
    travel = judge(seen(0, BEIJING), [seen(0, BOSTON)], VelocitySettings())
    assert travel is not None and travel.speed_kmh == math.inf
    data = json.loads(json.dumps(travel.as_dict(), allow_nan=False))
    assert data["speed_kmh"] is None and data["instant"] is True
    assert data["rule"] == IMPOSSIBLE_TRAVEL and data["before"]["place"]["city"] == "Boston"
    finite = judge(seen(1, BEIJING), [seen(0, BOSTON)], VelocitySettings())
    assert finite is not None and json.loads(json.dumps(finite.as_dict(), allow_nan=False))["instant"] is False


def test_a_sighting_survives_json():
    for sighting in (seen(0, BOSTON, service="smtp"), seen(1, None, kind=AddressClass.PRIVATE),
                     seen(2, replace(BEIJING, asn=4538, org="CERNET"), kind=AddressClass.RELAY, group="zscaler")):
        assert Sighting.from_dict(json.loads(json.dumps(sighting.as_dict()))) == sighting
    with pytest.raises(ValueError):
        Sighting.from_dict({"at": "yesterday", "address": "192.0.2.1", "kind": "public"})
    with pytest.raises(ValueError):
        Sighting.from_dict({"at": 1.0, "address": "192.0.2.1", "kind": "elsewhere"})


# --- settings ---

def test_region_rule_settings():
    assert SEED.within == 8 * HOUR
    assert RegionRule(name="x", home_countries=["US"]).within == 8 * HOUR
    with pytest.raises(ValidationError, match="home_continents or home_countries"):
        RegionRule(name="x")
    with pytest.raises(ValidationError, match="not continent codes"):
        RegionRule(name="x", home_continents=["US"])  # a country in the continents list
    with pytest.raises(ValidationError, match="not ISO country codes"):
        RegionRule(name="x", home_countries=["us"])
    with pytest.raises(ValidationError, match="name"):
        RegionRule(name="Left NA", home_continents=["NA"])
    with pytest.raises(ValidationError, match="extra"):
        VelocitySettings(max_speed=900)
    settings = VelocitySettings(region_rules=[{"name": "left-north-america", "home_continents": ["NA"],
                                               "within": "8h"}], compare_within="2d")
    assert settings.region_rules == [SEED] and settings.compare_within == 2 * 86400


# --- real addresses: the full GeoLite2 City database and the shipped relay groups ---

@pytest.fixture(scope="module")
def observe():
    locator = GeoLocator(GeoSettings(city_database=pp.full_city_database()))
    classifier = NetworkClassifier(NetworkSettings(),
                                   shipped=Path(__file__).resolve().parents[1] / "rules/phishhook/relays.toml")

    def sighting(hours: float, address: str) -> Sighting:
        classified = classifier.classify(address)
        return Sighting(at=T0 + hours * HOUR, address=classified.address, place=locator.locate(address),
                        kind=classified.kind, group=classified.group, service="smtp")

    yield sighting
    locator.close()


LEFT = "left-north-america"


@pytest.mark.parametrize(("first", "second", "with_seed", "without"), [
    # the case: the US, then China an hour later (the seed's rule names it first)
    (pp.US_BOSTON_A, pp.CN_BEIJING, LEFT, IMPOSSIBLE_TRAVEL),
    (pp.US_BOSTON_A, pp.CN_BEIJING_V6, LEFT, IMPOSSIBLE_TRAVEL),
    (pp.US_BOSTON_A, pp.JP_TOKYO, LEFT, IMPOSSIBLE_TRAVEL),
    (pp.US_BOSTON_A, pp.US_BOSTON_B, None, None),  # the same city an hour later
    (pp.US_BOSTON_A, pp.US_CAMBRIDGE, None, None),  # across the river
    (pp.US_BOSTON_A, pp.MS_OUTLOOK, None, None),  # Outlook mobile logging in from Amsterdam: a relay
    (pp.US_BOSTON_A, pp.GOOGLE_FETCHER_V6, None, None),  # Gmail's fetcher, placed in Australia: a relay
    (pp.CN_BEIJING, pp.JP_CHOFU_V6, IMPOSSIBLE_TRAVEL, IMPOSSIBLE_TRAVEL),  # 2,100 km in an hour, over IPv6
])
def test_real_addresses_an_hour_apart(observe, first, second, with_seed, without):
    before, after = observe(0, first), observe(1, second)
    assert rule_of(judge(after, [before], VelocitySettings(region_rules=[SEED]))) == with_seed
    assert rule_of(judge(after, [before], VelocitySettings())) == without


def test_a_relay_would_trigger_were_it_not_a_relay(observe):
    """The relay rows above prove the exemption, not a lack of distance."""
    outlook = observe(1, pp.MS_OUTLOOK)
    assert outlook.kind is AddressClass.RELAY and outlook.group == "microsoft-outlook" and outlook.place is not None
    travel = judge(replace(outlook, kind=AddressClass.PUBLIC), [observe(0, pp.US_BOSTON_A)], VelocitySettings())
    assert travel is not None and 4000 < travel.distance_km < 5000
