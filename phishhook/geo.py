"""Where a login address is, from MaxMind databases (GeoIP2/GeoLite2 City, optionally ASN), and how far apart
two places are.

A database is opened and checked once, at start-up: a file that is missing, unreadable, corrupt or of
the wrong type (an ASN database given as the City one) is a GeoDatabaseError that names the file, the
key and what to do; ``on_error`` chooses between refusing to start and running with the geo rules in
alert-only mode. A lookup never raises: an address that is junk, private, or not in the database has no
place (None), and such a login is recorded without one and never compared.

Distances are great-circle (haversine) distances between the located points, less both accuracy radii
(``separation_km``): MaxMind places an address somewhere within ``radius_km`` of its point, so two logins
are only known to be as far apart as the gap between their circles.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import geoip2.database
import geoip2.errors
import geoip2.models
import maxminddb
from maxminddb import InvalidDatabaseError

from mailwarden.logs import Throttled, get_logger
from mailwarden.section import Section
from phishhook.networks import parse_address

log = get_logger("phishhook.geo")

EARTH_RADIUS_KM = 6371.0088
"""The mean Earth radius (IUGG), which haversine distances use."""

PROBE_RECORDS = 16
"""How many records of a database are decoded at start-up to find a corrupt data section early."""


class GeoSettings(Section):
    """The MaxMind databases phishhook locates logins with.

    Without ``city_database`` there are no geo lookups at all: logins are recorded without places and
    geo-velocity can never trigger (the other signals still work).
    """

    city_database: Path | None = None
    """A GeoIP2 or GeoLite2 City database (.mmdb), e.g. /var/lib/GeoIP/GeoLite2-City.mmdb as geoipupdate
    keeps it. Default: none (no geo-velocity)."""
    asn_database: Path | None = None
    """A GeoLite2/GeoIP2 ASN database (.mmdb), optional: with it, logins carry their network's AS number and
    organisation, and two logins from the same AS (a mobile carrier) are not compared. Default: none."""
    on_error: Literal["refuse", "alert-only"] = "refuse"
    """A database that is missing, unreadable, corrupt or of the wrong type: ``refuse`` to start, with an
    error naming the file; or ``alert-only``: log the error and run with the geo rules alerting only (no
    snag), with no lookups from the broken database."""


class GeoDatabaseError(Exception):
    """A database that cannot be used; the message names the file and key, what is wrong and what to do."""


@dataclass(frozen=True)
class Place:
    """Where MaxMind puts an address."""

    country: str = ""
    """ISO 3166-1 alpha-2 code, e.g. "US"; "" when unknown."""
    continent: str = ""
    """Continent code: AF, AN, AS, EU, NA, OC, SA; "" when unknown."""
    city: str = ""
    """English name; "" when unknown."""
    subdivision: str = ""
    """ISO code of the largest subdivision (a US state: "MA"); "" when unknown."""
    latitude: float | None = None
    longitude: float | None = None
    radius_km: float = 0.0
    """MaxMind's accuracy radius: the address is somewhere within this distance of the point; 0 if unknown."""
    asn: int | None = None
    """The autonomous system number, from the ASN database; None without one, or when not listed."""
    org: str = ""
    """The autonomous system's organisation; "" when unknown."""

    @property
    def has_coordinates(self) -> bool:
        return self.latitude is not None and self.longitude is not None

    def label(self) -> str:
        """For people: "Changchun, CN", "CN" or "unknown"."""
        if self.city and self.country:
            return f"{self.city}, {self.country}"
        return self.country or self.city or "unknown"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (the login history is stored as JSON)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Place:
        """The inverse of ``as_dict``; missing keys take their defaults and unknown ones are ignored, so an
        older or newer history entry still reads. ValueError when a value has the wrong type."""

        def text(key: str) -> str:
            value = data.get(key, "")
            if not isinstance(value, str):
                raise ValueError(f"place: {key} must be a string, not {value!r}")
            return value

        def number(key: str) -> float | None:
            value = data.get(key)
            if value is None:
                return None
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"place: {key} must be a number, not {value!r}")
            return float(value)

        asn = data.get("asn")
        if asn is not None and (isinstance(asn, bool) or not isinstance(asn, int)):
            raise ValueError(f"place: asn must be an integer, not {asn!r}")
        return cls(country=text("country"), continent=text("continent"), city=text("city"),
                   subdivision=text("subdivision"), latitude=number("latitude"), longitude=number("longitude"),
                   radius_km=number("radius_km") or 0.0, asn=asn, org=text("org"))


def great_circle_km(a: Place, b: Place) -> float:
    """The haversine distance between two located places; ValueError when either has no coordinates."""
    if a.latitude is None or a.longitude is None or b.latitude is None or b.longitude is None:
        raise ValueError("a distance needs both places' coordinates")
    lat1, lon1, lat2, lon2 = map(math.radians, (a.latitude, a.longitude, b.latitude, b.longitude))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(h)))


def separation_km(a: Place, b: Place) -> float:
    """How far apart two places are at least: the great-circle distance less both accuracy radii (0 when
    the circles overlap)."""
    return max(0.0, great_circle_km(a, b) - a.radius_km - b.radius_km)


def _open(path: Path, key: str, expect: str) -> geoip2.database.Reader:
    """Open and check one database; GeoDatabaseError naming the file and key otherwise."""
    what = f"{key} = {str(path)!r}"
    if not path.exists():
        raise GeoDatabaseError(f"{what}: the file does not exist; install the database there (geoipupdate "
                               f"downloads it) or fix the path")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise GeoDatabaseError(f"{what}: cannot read the file: {exc.strerror}; give the mailwarden user read "
                               "access") from None
    try:
        reader = geoip2.database.Reader(str(path), mode=geoip2.database.MODE_AUTO)
    except (InvalidDatabaseError, ValueError, OSError) as exc:
        raise GeoDatabaseError(f"{what}: not a usable MaxMind database ({exc}); download it again") from None
    database_type = reader.metadata().database_type
    if expect not in database_type:
        reader.close()
        raise GeoDatabaseError(f"{what}: this is a {database_type} database where a {expect} one is expected: point "
                               f"{key} at a GeoIP2/GeoLite2 {expect} database (.mmdb)")
    try:  # a corrupt data section opens fine and fails on lookups: decode a few records now
        with maxminddb.open_database(str(path), maxminddb.MODE_AUTO) as probe:
            for count, _record in enumerate(probe, start=1):
                if count >= PROBE_RECORDS:
                    break
    except (InvalidDatabaseError, ValueError, OSError) as exc:
        reader.close()
        raise GeoDatabaseError(f"{what}: the database is corrupt ({exc}); download it again") from None
    return reader


class GeoLocator:
    """Looks addresses up in the City (and ASN) database. Thread-safe: the readers serve concurrent lookups
    (libmilter's threads, the event loop), and ``close()`` waits for lookups in progress."""

    def __init__(self, settings: GeoSettings) -> None:
        """Opens and checks the configured databases; GeoDatabaseError when one cannot be used."""
        self.settings = settings
        self.problem = ""
        """Why the locator runs degraded ("" when it does not): set by ``open`` in alert-only mode."""
        self._city: geoip2.database.Reader | None = None
        self._asn: geoip2.database.Reader | None = None
        self._lock = threading.Lock()
        self._failed = Throttled(log, logging.ERROR, "geo lookup failed: the database may be corrupt", 300)
        if settings.city_database is not None:
            self._city = _open(settings.city_database, "city_database", "City")
            if settings.asn_database is not None:
                try:
                    self._asn = _open(settings.asn_database, "asn_database", "ASN")
                except GeoDatabaseError:
                    self.close()
                    raise

    @classmethod
    def disabled(cls) -> GeoLocator:
        """A locator without databases: every lookup is None (no city database configured)."""
        return cls(GeoSettings())

    @classmethod
    def open(cls, settings: GeoSettings) -> GeoLocator:
        """The locator ``settings.on_error`` asks for: with ``refuse``, GeoDatabaseError propagates (refuse to
        start); with ``alert-only``, the error is logged and the locator returned uses what still works (no
        City database: no lookups; a broken ASN database: City only), with ``problem`` saying why, so the
        caller runs the geo rules in alert-only mode."""
        try:
            return cls(settings)
        except GeoDatabaseError as exc:
            if settings.on_error == "refuse":
                raise
            problem = str(exc)
        log.error("geo database unusable, geo rules in alert-only mode: %s", problem)
        try:
            locator = cls(settings.model_copy(update={"asn_database": None}))
        except GeoDatabaseError:
            locator = cls.disabled()
        locator.problem = problem
        return locator

    @property
    def enabled(self) -> bool:
        """True when a City database is open (lookups can find places)."""
        return self._city is not None

    def locate(self, address: str) -> Place | None:
        """Where ``address`` is, or None: no database, not an address, not in the database, no coordinates,
        or a failed lookup (logged). Never raises for bad input."""
        city_reader = self._city
        if city_reader is None:
            return None
        parsed = parse_address(address)
        if parsed is None:
            return None
        text = str(parsed)
        try:
            with self._lock:
                if self._city is None:
                    return None
                city = self._city.city(text)
                asn = self._asn_of(text)
        except geoip2.errors.AddressNotFoundError:
            return None
        except (InvalidDatabaseError, ValueError, OSError) as exc:
            self._failed.hit(database=str(self.settings.city_database), error=str(exc))
            return None
        latitude, longitude = city.location.latitude, city.location.longitude
        if latitude is None or longitude is None:
            return None
        subdivision = city.subdivisions[0] if city.subdivisions else None  # the largest: a US state
        return Place(
            country=city.country.iso_code or "",
            continent=city.continent.code or "",
            city=city.city.names.get("en", "") if city.city.names else "",
            subdivision=(subdivision.iso_code or "") if subdivision is not None else "",
            latitude=float(latitude),
            longitude=float(longitude),
            radius_km=float(city.location.accuracy_radius or 0),
            asn=asn.autonomous_system_number if asn is not None else None,
            org=(asn.autonomous_system_organization or "") if asn is not None else "",
        )

    def _asn_of(self, address: str) -> geoip2.models.ASN | None:
        """The ASN record, or None: no ASN database, not listed, or a failed lookup (logged: the place is
        still good without it)."""
        if self._asn is None:
            return None
        try:
            return self._asn.asn(address)
        except geoip2.errors.AddressNotFoundError:
            return None
        except (InvalidDatabaseError, ValueError, OSError) as exc:
            self._failed.hit(database=str(self.settings.asn_database), error=str(exc))
            return None

    def close(self) -> None:
        with self._lock:
            for reader in (self._city, self._asn):
                if reader is not None:
                    reader.close()
            self._city = self._asn = None


def check_databases(settings: GeoSettings) -> list[str]:
    """Problems with the configured databases, for ``config check`` (empty when all is well)."""
    problems: list[str] = []
    for key, expect in (("city_database", "City"), ("asn_database", "ASN")):
        path = getattr(settings, key)
        if path is None:
            continue
        try:
            _open(path, key, expect).close()
        except GeoDatabaseError as exc:
            problems.append(str(exc))
    if settings.asn_database is not None and settings.city_database is None:
        problems.append("asn_database is set but city_database is not: without a City database there are no "
                        "lookups at all; set city_database too")
    return problems
