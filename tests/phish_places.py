"""Real addresses with known places, for phishhook's tests (unit and end-to-end alike).

Two databases:

- MaxMind's small test databases, copied into tests/fixtures/geoip (see SOURCE.md there): synthetic
  records for a few networks, for the exact-value and bad-database cases.
- The full GeoLite2 City database of 2018-07-03 from the PyPI package ``maxminddb-geolite2==2018.703`` (a
  pinned test dependency, so its answers never change): real addresses, for the realistic cases. Each
  address below was looked up in it once; the comment says what it answers (city, subdivision,
  coordinates, accuracy radius, the network of the record). They were chosen as university or research
  networks, whose records are precise (radius 1-20 km) and stable, and, where a pair must be in the same
  city, from different /16s so nothing can match them by prefix. None is in a shipped relay group, except
  the MS_* address, which is meant to be.
"""

from __future__ import annotations

from pathlib import Path

GEOIP_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "geoip"
CITY_TEST_DB = GEOIP_FIXTURES / "GeoIP2-City-Test.mmdb"
ASN_TEST_DB = GEOIP_FIXTURES / "GeoLite2-ASN-Test.mmdb"
COUNTRY_TEST_DB = GEOIP_FIXTURES / "GeoIP2-Country-Test.mmdb"
BROKEN_DATA_DB = GEOIP_FIXTURES / "GeoIP2-City-Test-Broken-Double-Format.mmdb"
"""Opens; its data section is corrupt, so every lookup fails."""
BROKEN_NODES_DB = GEOIP_FIXTURES / "GeoIP2-City-Test-Invalid-Node-Count.mmdb"
"""Its metadata is corrupt: it does not open."""


def full_city_database() -> Path:
    """The full GeoLite2 City database (2018-07-03) installed by the test dependency maxminddb-geolite2."""
    from _maxminddb_geolite2 import geolite2_database

    return Path(geolite2_database())


# --- in the full GeoLite2 City database (2018-07-03) ---

US_BOSTON_A = "128.197.26.35"
"""Boston University: US / NA, Boston, MA, 42.3451 -71.0993, radius 5 km (record 128.197.0.0/16)."""
US_BOSTON_B = "129.10.116.51"
"""Northeastern University: US / NA, Boston, MA, 42.3424 -71.0878, radius 5 km (record 129.10.0.0/16);
about 1 km from US_BOSTON_A, so the two are the same place once the radii are subtracted."""
US_CAMBRIDGE = "18.9.22.169"
"""MIT: US / NA, Cambridge, MA, 42.3646 -71.1028, radius 5 km (record 18.0.0.0/11)."""
CN_BEIJING = "166.111.4.100"
"""Tsinghua University: CN / AS, Beijing, BJ, 39.9289 116.3883, radius 1 km (record 166.111.0.0/16);
about 10,800 km from Boston."""
CN_BEIJING_B = "162.105.129.122"
"""Peking University: CN / AS, Beijing, radius 50 km (record 162.105.0.0/16): a second Beijing address, for a
test that must not meet the block an earlier test's snag put on CN_BEIJING."""
JP_TOKYO = "203.178.141.194"
"""WIDE Project: JP / AS, Tokyo, subdivision 13, 35.685 139.7514, radius 20 km (record 203.178.128.0/19)."""
CN_BEIJING_V6 = "2001:da8:200::1"
"""CERNET (IPv6): CN / AS, Beijing, BJ, 39.9289 116.3883, radius 10 km (record 2001:da8:200::/41)."""
JP_CHOFU_V6 = "2001:200::1"
"""WIDE (IPv6): JP / AS, Chofu, subdivision 13 (Tokyo), 35.6556 139.5522, radius 20 km (record 2001:200::/41)."""
MS_OUTLOOK = "40.107.0.1"
"""Exchange Online (in the shipped microsoft-outlook group, 40.107.0.0/16): NL / EU, Amsterdam, NH,
52.3556 4.9135, radius 1000 km (record 40.107.0.0/24); some 4,500 km from Boston after the radii, so a
login from it an hour after one from Boston would be impossible travel were it not a relay."""
GOOGLE_FETCHER_V6 = "2404:6800:4004::1"
"""Google (in the shipped google-fetchers group, 2404:6800:4000::/36): AU / OC, no city, -27.0 133.0,
radius 100 km (record 2404:6800:4004::/47)."""

# --- in MaxMind's GeoIP2-City-Test database (tests/fixtures/geoip) ---

TEST_LONDON = "81.2.69.142"
"""GB / EU, London, ENG, 51.5142 -0.0931, radius 10 km; not in the ASN test database."""
TEST_CHANGCHUN = "175.16.199.1"
"""CN / AS, Changchun, subdivision 22, 43.88 125.3228, radius 100 km."""
TEST_MILTON = "216.160.83.57"
"""US / NA, Milton, WA, 47.2513 -122.3149, radius 22 km; AS209, no organisation, in the ASN test database."""
TEST_LINKOPING = "89.160.20.113"
"""SE / EU, Linköping, subdivision E, 58.4167 15.6167, radius 76 km; AS29518 Bredband2 AB."""
TEST_JAPAN_V6 = "2001:218::1"
"""JP / AS, no city, 35.68536 139.75309, radius 100 km."""
TEST_NOT_LISTED = "8.8.8.8"
"""In neither test database."""
