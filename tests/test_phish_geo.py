"""phishhook.geo against real MaxMind databases: the test databases (exact records, broken files) and the
full 2018 GeoLite2 City database (real addresses, tests/phish_places.py)."""

from __future__ import annotations

import json
import logging
import math
import shutil
import threading
from pathlib import Path

import phish_places as pp
import pytest

from phishhook.geo import (
    GeoDatabaseError,
    GeoLocator,
    GeoSettings,
    Place,
    check_databases,
    great_circle_km,
    separation_km,
)


@pytest.fixture(scope="module")
def test_db() -> GeoLocator:
    locator = GeoLocator(GeoSettings(city_database=pp.CITY_TEST_DB, asn_database=pp.ASN_TEST_DB))
    yield locator
    locator.close()


@pytest.fixture(scope="module")
def full_db() -> GeoLocator:
    locator = GeoLocator(GeoSettings(city_database=pp.full_city_database()))
    yield locator
    locator.close()


# --- lookups in MaxMind's test database: the exact records ---

def test_a_city_record_becomes_a_place_with_its_asn(test_db):
    assert test_db.locate(pp.TEST_LINKOPING) == Place(
        country="SE", continent="EU", city="Linköping", subdivision="E", latitude=58.4167, longitude=15.6167,
        radius_km=76.0, asn=29518, org="Bredband2 AB")


@pytest.mark.parametrize(("address", "country", "continent", "city", "subdivision", "radius", "asn", "label"), [
    (pp.TEST_LONDON, "GB", "EU", "London", "ENG", 10, None, "London, GB"),  # not in the ASN database
    (pp.TEST_CHANGCHUN, "CN", "AS", "Changchun", "22", 100, None, "Changchun, CN"),
    (pp.TEST_MILTON, "US", "NA", "Milton", "WA", 22, 209, "Milton, US"),
    (pp.TEST_JAPAN_V6, "JP", "AS", "", "", 100, None, "JP"),  # IPv6, a country without a city
    ("149.101.100.1", "US", "NA", "", "", 1000, 6167, "US"),
])
def test_places_from_the_test_database(test_db, address, country, continent, city, subdivision, radius, asn,
                                       label):
    place = test_db.locate(address)
    assert place is not None
    assert (place.country, place.continent, place.city, place.subdivision) == (country, continent, city,
                                                                               subdivision)
    assert place.radius_km == radius and place.asn == asn and place.has_coordinates
    assert place.label() == label


def test_an_ipv4_mapped_ipv6_address_is_looked_up_as_ipv4(test_db):
    assert test_db.locate("::ffff:" + pp.TEST_LONDON) == test_db.locate(pp.TEST_LONDON) != None  # noqa: E711


@pytest.mark.parametrize("junk", [
    "", " ", "999.1.1.1", "1.2.3", "fe80::1%eth0", "::1", "10.1.2.3", "192.168.1.1", "x" * 300, "1" * 300,
    "81.2.69.142/32", "81.2.69.142:25", "2001:218::1::1", "unknown", "\x00", "81.2.69.142 x", pp.TEST_NOT_LISTED,
])
def test_junk_private_and_unlisted_addresses_have_no_place(test_db, junk):
    assert test_db.locate(junk) is None


def test_odd_but_valid_address_forms_are_accepted(test_db):
    london = test_db.locate(pp.TEST_LONDON)
    assert test_db.locate(f" [{pp.TEST_LONDON}] ") == london
    assert test_db.locate("IPv6:" + pp.TEST_JAPAN_V6) == test_db.locate(pp.TEST_JAPAN_V6) is not None
    assert test_db.locate(f"{pp.TEST_LONDON}\n") == london
    assert test_db.locate("2001:0218:0000:0000:0000:0000:0000:0001") == test_db.locate(pp.TEST_JAPAN_V6)


def test_without_a_city_database_there_are_no_lookups():
    locator = GeoLocator.disabled()
    assert not locator.enabled
    assert locator.locate(pp.TEST_LONDON) is None
    assert GeoLocator(GeoSettings()).locate(pp.TEST_LONDON) is None


def test_the_locator_serves_many_threads_and_closes(tmp_path):
    locator = GeoLocator(GeoSettings(city_database=pp.CITY_TEST_DB, asn_database=pp.ASN_TEST_DB))
    expected = {address: locator.locate(address) for address in (pp.TEST_LONDON, pp.TEST_MILTON, pp.TEST_JAPAN_V6)}
    wrong: list[str] = []

    def work() -> None:
        for _ in range(300):
            for address, place in expected.items():
                if locator.locate(address) != place:
                    wrong.append(address)

    threads = [threading.Thread(target=work) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
    locator.close()
    assert locator.locate(pp.TEST_LONDON) is None  # closed: no place, no exception
    locator.close()  # twice is harmless


# --- bad databases: a clear error naming the file and key, or alert-only ---

def corrupt_copy(tmp_path: Path, source: Path) -> Path:
    target = tmp_path / "GeoLite2-City.mmdb"
    shutil.copy(source, target)
    return target


@pytest.mark.parametrize(("key", "make", "says"), [
    ("city_database", lambda tmp: tmp / "absent.mmdb", "does not exist"),
    ("city_database", lambda tmp: tmp, "cannot read"),  # a directory
    ("city_database", lambda tmp: corrupt_copy(tmp, pp.BROKEN_DATA_DB), "corrupt"),
    ("city_database", lambda tmp: corrupt_copy(tmp, pp.BROKEN_NODES_DB), "not a usable MaxMind database"),
    ("city_database", lambda tmp: corrupt_copy(tmp, pp.COUNTRY_TEST_DB), "GeoIP2-Country database where a City"),
    ("city_database", lambda tmp: corrupt_copy(tmp, pp.ASN_TEST_DB), "GeoLite2-ASN database where a City"),
    ("asn_database", lambda tmp: corrupt_copy(tmp, pp.CITY_TEST_DB), "GeoIP2-City database where a ASN"),
    ("asn_database", lambda tmp: tmp / "absent.mmdb", "does not exist"),
])
def test_an_unusable_database_is_refused_naming_file_and_key(tmp_path, key, make, says):
    path = make(tmp_path)
    settings = GeoSettings(**{"city_database": pp.CITY_TEST_DB, key: path})
    with pytest.raises(GeoDatabaseError) as caught:
        GeoLocator(settings)
    message = str(caught.value)
    assert key in message and str(path) in message and says in message
    assert check_databases(settings) == [message]


@pytest.mark.parametrize("content", [b"", b"not a database\n" * 100])
def test_an_empty_or_junk_file_is_refused(tmp_path, content):
    path = tmp_path / "City.mmdb"
    path.write_bytes(content)
    with pytest.raises(GeoDatabaseError, match=r"city_database.*not a usable MaxMind database"):
        GeoLocator(GeoSettings(city_database=path))


def test_alert_only_keeps_running_and_says_why(tmp_path, caplog):
    broken = corrupt_copy(tmp_path, pp.BROKEN_DATA_DB)
    with caplog.at_level(logging.ERROR, logger="mailwarden.phishhook.geo"):
        locator = GeoLocator.open(GeoSettings(city_database=broken, on_error="alert-only"))
    assert not locator.enabled and "corrupt" in locator.problem and str(broken) in locator.problem
    assert locator.locate(pp.TEST_LONDON) is None
    assert "alert-only" in caplog.text
    with pytest.raises(GeoDatabaseError):
        GeoLocator.open(GeoSettings(city_database=broken))  # on_error = refuse, the default


def test_alert_only_with_a_broken_asn_database_keeps_the_city_lookups(tmp_path):
    locator = GeoLocator.open(GeoSettings(city_database=pp.CITY_TEST_DB, asn_database=tmp_path / "absent.mmdb",
                                          on_error="alert-only"))
    assert locator.enabled and "asn_database" in locator.problem
    place = locator.locate(pp.TEST_MILTON)
    assert place is not None and place.city == "Milton" and place.asn is None


def test_a_healthy_locator_has_no_problem_and_check_finds_none():
    settings = GeoSettings(city_database=pp.CITY_TEST_DB, asn_database=pp.ASN_TEST_DB)
    assert GeoLocator.open(settings).problem == ""
    assert check_databases(settings) == []
    assert check_databases(GeoSettings()) == []
    assert "city_database" in check_databases(GeoSettings(asn_database=pp.ASN_TEST_DB))[0]


def test_a_lookup_in_a_database_gone_bad_returns_no_place_and_is_logged(caplog):
    """A database whose data section is corrupt (here swapped in after the start-up check passed, as when the
    file is damaged under a running daemon): no place, no exception, an error logged with the reason."""
    import geoip2.database

    locator = GeoLocator(GeoSettings(city_database=pp.CITY_TEST_DB))
    locator._city.close()
    locator._city = geoip2.database.Reader(str(pp.BROKEN_DATA_DB))
    with caplog.at_level(logging.ERROR, logger="mailwarden.phishhook.geo"):
        assert locator.locate(pp.TEST_LONDON) is None
    [record] = caplog.records
    assert "corrupt" in record.getMessage() and "bad data" in record.kv["error"]
    locator.close()


# --- Place: JSON round trips, labels ---

def test_a_place_survives_json(test_db):
    place = test_db.locate(pp.TEST_LINKOPING)
    assert Place.from_dict(json.loads(json.dumps(place.as_dict()))) == place
    assert Place.from_dict({}) == Place()
    assert Place().label() == "unknown"
    assert Place.from_dict({"country": "CN", "future_field": 1}).label() == "CN"
    with pytest.raises(ValueError, match="latitude"):
        Place.from_dict({"latitude": "north"})


# --- distances ---

def test_great_circle_distances_agree_with_known_values(test_db):
    london, changchun = test_db.locate(pp.TEST_LONDON), test_db.locate(pp.TEST_CHANGCHUN)
    # the spherical law of cosines, an independent formula on the same sphere
    lat1, lon1, lat2, lon2 = map(math.radians, (51.5142, -0.0931, 43.88, 125.3228))
    cosines = 6371.0088 * math.acos(math.sin(lat1) * math.sin(lat2)
                                    + math.cos(lat1) * math.cos(lat2) * math.cos(lon2 - lon1))
    assert great_circle_km(london, changchun) == pytest.approx(cosines, rel=1e-9)
    assert great_circle_km(london, changchun) == pytest.approx(8182, abs=1)
    assert great_circle_km(london, london) == 0
    assert great_circle_km(Place(latitude=0.0, longitude=0.0), Place(latitude=0.0, longitude=1.0)) == \
        pytest.approx(2 * math.pi * 6371.0088 / 360)  # a degree of the equator: 111.195 km
    assert great_circle_km(Place(latitude=0.0, longitude=0.0), Place(latitude=0.0, longitude=180.0)) == \
        pytest.approx(math.pi * 6371.0088)  # antipodes: no domain error in asin


def test_separation_subtracts_both_radii_and_never_goes_negative():
    a = Place(latitude=0.0, longitude=0.0, radius_km=10)
    b = Place(latitude=0.0, longitude=1.0, radius_km=25)  # 111.2 km apart
    assert separation_km(a, b) == pytest.approx(great_circle_km(a, b) - 35)
    assert separation_km(Place(latitude=0.0, longitude=0.0, radius_km=100), b) == 0
    with pytest.raises(ValueError):
        great_circle_km(Place(), b)


# --- the full GeoLite2 City database: the addresses the end-to-end tests use ---

@pytest.mark.parametrize(("address", "country", "continent", "city", "subdivision", "radius"), [
    (pp.US_BOSTON_A, "US", "NA", "Boston", "MA", 5),
    (pp.US_BOSTON_B, "US", "NA", "Boston", "MA", 5),
    (pp.US_CAMBRIDGE, "US", "NA", "Cambridge", "MA", 5),
    (pp.CN_BEIJING, "CN", "AS", "Beijing", "BJ", 1),
    (pp.JP_TOKYO, "JP", "AS", "Tokyo", "13", 20),
    (pp.CN_BEIJING_V6, "CN", "AS", "Beijing", "BJ", 10),
    (pp.JP_CHOFU_V6, "JP", "AS", "Chofu", "13", 20),
    (pp.MS_OUTLOOK, "NL", "EU", "Amsterdam", "NH", 1000),
    (pp.GOOGLE_FETCHER_V6, "AU", "OC", "", "", 100),
])
def test_the_realistic_addresses_are_where_phish_places_says(full_db, address, country, continent, city,
                                                             subdivision, radius):
    place = full_db.locate(address)
    assert place is not None
    assert (place.country, place.continent, place.city, place.subdivision, place.radius_km) == \
        (country, continent, city, subdivision, radius)


def test_realistic_distances(full_db):
    boston_a, boston_b = full_db.locate(pp.US_BOSTON_A), full_db.locate(pp.US_BOSTON_B)
    beijing, outlook = full_db.locate(pp.CN_BEIJING), full_db.locate(pp.MS_OUTLOOK)
    assert great_circle_km(boston_a, boston_b) < 2
    assert separation_km(boston_a, boston_b) == 0  # the same place for geo-velocity
    assert separation_km(boston_a, beijing) == pytest.approx(10_800, rel=0.02)
    assert 4000 < separation_km(boston_a, outlook) < 5000  # Amsterdam less its 1000 km radius
