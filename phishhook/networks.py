"""Which kind of network a login came from: private, the site's trusted networks, a known relay, or public.

Geo-velocity compares only PUBLIC logins. The others are recorded but never compared: a private or
trusted address says nothing about where the person is, and a relay (Outlook mobile and New Outlook log
in from Microsoft's datacentres, Gmail fetches mail from Google's, Apple Private Relay and zero-trust
egress hide the user behind the provider's address) geolocates to the provider, not the user.

The relay networks ship in ``rules/phishhook/relays.toml``: named groups, each with the URL where its
provider publishes the list. They are a snapshot and go stale; a site keeps its own file (``relay_file``,
the same format, written by ``mailwarden phish relays import GROUP FILE``) whose groups replace the
shipped groups of the same name and add new ones.

Classification is on the login path, and Apple's full list alone is ~200,000 prefixes, so every set of
networks is flattened once into disjoint sorted integer ranges per IP version (the most specific prefix
wins) and an address is found with one ``bisect`` per set: microseconds, whatever the size.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import socket
import tempfile
import tomllib
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydantic import field_validator

from mailwarden.filewatch import FileWatch
from mailwarden.logs import get_logger, log_kv
from mailwarden.rules_files import shipped_rules_file
from mailwarden.section import Section

log = get_logger("phishhook.networks")

RELAYS_FILE = "phishhook/relays.toml"
"""The shipped relay networks, relative to the rules directory (see mailwarden.rules_files)."""

MAX_ADDRESS_LENGTH = 64
"""Longer input is not an address (the longest IPv6 text with a zone id is well under this)."""


class AddressClass(StrEnum):
    PRIVATE = "private"
    """Not routable on the Internet: RFC 1918, loopback, link-local, CGNAT 100.64.0.0/10, IPv6 ULA
    fc00::/7, unspecified, multicast and reserved. The documentation ranges (192.0.2.0/24,
    198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32) are PUBLIC here: tests use them as public addresses."""
    TRUSTED = "trusted"
    """One of the site's configured trusted networks (campus, VPN exits)."""
    RELAY = "relay"
    """In a relay group (shipped or the site's own)."""
    PUBLIC = "public"
    INVALID = "invalid"
    """Not an IP address."""


@dataclass(frozen=True)
class Classified:
    kind: AddressClass
    group: str
    """The relay group's name or the trusted network (as configured) that matched; "" otherwise."""
    address: str
    """Normalised: compressed IPv6, an IPv4-mapped IPv6 address as IPv4, no zone id; the input as given
    (cut to 64 characters) when INVALID."""


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(text: str) -> IPAddress | None:
    """An address as Postfix, Dovecot or a web front end may give it, or None when it is not one.

    Accepts surrounding blanks, ``[brackets]``, Postfix's ``IPv6:`` prefix and a zone id (``fe80::1%eth0``,
    dropped); an IPv4-mapped IPv6 address (``::ffff:81.2.69.142``) becomes the IPv4 address it carries.
    """
    if not isinstance(text, str) or len(text) > MAX_ADDRESS_LENGTH:
        return None
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if text[:5].lower() == "ipv6:":
        text = text[5:]
    text = text.split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_PRIVATE_NETWORKS = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8",
)
"""Never compared: not routable, or not a place (the 'this network', benchmarking, multicast, reserved and
IETF protocol blocks ride along with RFC 1918, loopback, link-local, CGNAT and ULA)."""


class RelayFileError(Exception):
    """A relay file that cannot be used; the message names the file (and line) and what to do."""


@dataclass(frozen=True)
class RelayGroup:
    name: str
    description: str
    source: str
    """Where the provider publishes its list, for updating."""
    networks: tuple[str, ...]
    origin: Path
    """The file the group came from (the shipped file or the site's)."""


class NetworkSettings(Section):
    """The networks whose logins are recorded but never compared (see the module docstring)."""

    trusted: list[str] = []
    """The site's own networks in CIDR form (campus, VPN exits): their logins never trigger geo-velocity.
    Default: none."""
    relay_file: Path | None = None
    """The site's relay groups (format of the shipped ``rules/phishhook/relays.toml``): a group of the same
    name replaces the shipped one (``mailwarden phish relays import GROUP FILE`` writes it). Default: none."""
    relay_groups_disabled: list[str] = []
    """Relay groups (shipped or the site's) not used, by name, e.g. ``["zscaler"]`` where Zscaler is what
    the attackers use. Default: none."""

    @field_validator("trusted")
    @classmethod
    def _networks(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            _network(entry)
        return entries


def _network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR (or a bare address, as /32 or /128); host bits set is an error that shows the intended form."""
    try:
        return ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{text!r} is not a network: use CIDR form, e.g. 192.0.2.0/24 or 2001:db8::/32") from exc
        raise ValueError(f"{text!r} has host bits set: did you mean {loose}?") from None


def _cidr_range(text: str) -> tuple[int, int, int]:
    """(IP version, first, last address as integers) of a CIDR in canonical form, about ten times faster
    than ipaddress (a provider's list has 200,000 of them); anything unusual goes through ``_network``
    (its checks and messages)."""
    address, slash, length = text.partition("/")
    family, bits = (socket.AF_INET6, 128) if ":" in address else (socket.AF_INET, 32)
    try:
        value = int.from_bytes(socket.inet_pton(family, address), "big")
        prefix = int(length) if slash else bits
    except (OSError, ValueError):
        prefix = -1
    if 0 <= prefix <= bits and length == (str(prefix) if slash else ""):
        host = (1 << (bits - prefix)) - 1
        if not value & host:
            return (4 if bits == 32 else 6), value, value | host
    network = _network(text)
    return network.version, int(network.network_address), int(network.broadcast_address)


class _RangeTable:
    """Disjoint integer ranges [start, end] with a label each, for one IP version; the most specific
    prefix wins where prefixes nest (CIDR prefixes either nest or are disjoint)."""

    __slots__ = ("ends", "labels", "starts")

    def __init__(self, ranges: Iterable[tuple[int, int, str]]) -> None:
        starts: list[int] = []
        ends: list[int] = []
        labels: list[str] = []

        def emit(start: int, end: int, label: str) -> None:
            if start > end:
                return
            if ends and ends[-1] + 1 == start and labels[-1] == label:
                ends[-1] = end
            else:
                starts.append(start)
                ends.append(end)
                labels.append(label)

        stack: list[tuple[int, int, str]] = []  # the open prefixes, outermost first
        position = 0  # the first address not yet emitted
        for start, end, label in sorted(ranges, key=lambda r: (r[0], -r[1])):
            while stack and stack[-1][1] < start:
                _, top_end, top_label = stack.pop()
                emit(position, top_end, top_label)
                position = max(position, top_end + 1)
            if stack:
                emit(position, start - 1, stack[-1][2])
            position = max(position, start)
            stack.append((start, end, label))
        while stack:
            _, top_end, top_label = stack.pop()
            emit(position, top_end, top_label)
            position = max(position, top_end + 1)
        self.starts, self.ends, self.labels = starts, ends, labels

    def find(self, value: int) -> str | None:
        index = bisect_right(self.starts, value) - 1
        if index >= 0 and value <= self.ends[index]:
            return self.labels[index]
        return None


class _Tables:
    """One range table per IP version for one set of labelled networks (CIDR strings)."""

    __slots__ = ("count", "v4", "v6")

    def __init__(self, labelled: Iterable[tuple[str, str]]) -> None:
        v4: list[tuple[int, int, str]] = []
        v6: list[tuple[int, int, str]] = []
        for network, label in labelled:
            version, first, last = _cidr_range(network)
            (v4 if version == 4 else v6).append((first, last, label))
        self.count = len(v4) + len(v6)
        self.v4 = _RangeTable(v4)
        self.v6 = _RangeTable(v6)

    def find(self, address: IPAddress) -> str | None:
        return (self.v4 if address.version == 4 else self.v6).find(int(address))


def read_relay_file(path: Path) -> dict[str, RelayGroup]:
    """The groups of one relay file, by name; RelayFileError naming the file, group and network at fault.

    Format: ``[[group]]`` tables with ``name``, ``description``, ``source`` and ``networks = ["cidr", ...]``.
    """
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise RelayFileError(f"{path}: cannot read the relay networks: {exc.strerror}; fix the path or the "
                             "file's permissions") from None
    except tomllib.TOMLDecodeError as exc:
        raise RelayFileError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(data) - {"group"}
    if unknown:
        raise RelayFileError(f"{path}: unknown key(s) {sorted(unknown)}: a relay file holds only [[group]] tables")
    groups: dict[str, RelayGroup] = {}
    for number, table in enumerate(data.get("group", []), start=1):
        where = f"{path}: group {number}"
        if not isinstance(table, dict):
            raise RelayFileError(f"{where}: expected a [[group]] table")
        extra = set(table) - {"name", "description", "source", "networks"}
        if extra:
            raise RelayFileError(f"{where}: unknown key(s) {sorted(extra)}; allowed: name, description, source, "
                                 "networks")
        name = table.get("name")
        if not isinstance(name, str) or not name:
            raise RelayFileError(f"{where}: 'name' (a string) is required")
        where = f"{path}: group {name!r}"
        if name in groups:
            raise RelayFileError(f"{where}: defined twice in the same file")
        networks = table.get("networks")
        if not isinstance(networks, list) or not all(isinstance(n, str) for n in networks):
            raise RelayFileError(f"{where}: 'networks' must be a list of CIDR strings")
        for network in networks:
            try:
                _cidr_range(network)
            except ValueError as exc:
                raise RelayFileError(f"{where}: {exc}") from None
        description, source = table.get("description", ""), table.get("source", "")
        if not isinstance(description, str) or not isinstance(source, str):
            raise RelayFileError(f"{where}: 'description' and 'source' must be strings")
        groups[name] = RelayGroup(name, description, source, tuple(networks), path)
    return groups


def import_relay_list(group: str, text: str) -> list[str]:
    """The networks of a provider's published list, normalised, in order, without duplicates.

    One network per line: a plain CIDR or address, or Apple's egress CSV (``prefix,country,region,city,``:
    the first field is taken); ``#`` comments and blank lines are skipped. A line that is not a network
    raises RelayFileError naming the group and the line number; so does a list with no network at all
    (importing it would silently empty the group).
    """
    found: dict[str, None] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        field = line.split(",", 1)[0].strip()
        try:
            network = ipaddress.ip_network(field, strict=False)
        except ValueError:
            raise RelayFileError(f"{group}: line {number}: {raw.strip()[:80]!r} is not a network (expected a CIDR "
                                 "per line, or Apple's 'prefix,country,region,city,' CSV)") from None
        found[str(network)] = None
    if not found:
        raise RelayFileError(f"{group}: the list holds no network: is it the right file?")
    return list(found)


def write_relay_file(path: Path, groups: Mapping[str, Sequence[str]], *,
                     sources: Mapping[str, str] | None = None) -> None:
    """Write a site relay file holding ``groups`` (name -> networks), atomically (a reader sees the old or
    the new file, never half of one). ``sources`` optionally names where each group's list came from."""
    sources = sources or {}
    lines = ["# Relay networks of this site (mailwarden phish relays import GROUP FILE writes this file).",
             "# A group here replaces the shipped group of the same name.", ""]
    for name, networks in groups.items():
        for network in networks:
            _cidr_range(network)
        lines += ["[[group]]", f"name = {json.dumps(name)}",
                  f"description = {json.dumps(f'{len(networks)} networks imported')}",
                  f"source = {json.dumps(sources.get(name, ''))}", "networks = ["]
        lines += [f"  {json.dumps(network)}," for network in networks]
        lines += ["]", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write("\n".join(lines))
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class _Relays:
    groups: dict[str, RelayGroup]
    tables: _Tables


class NetworkClassifier:
    """Classifies login addresses; safe to share between threads (a reload swaps one reference)."""

    def __init__(self, settings: NetworkSettings, shipped: Path | None = None) -> None:
        """Reads the shipped and site relay files; RelayFileError when one is missing or broken."""
        self.settings = settings
        self.shipped = shipped if shipped is not None else shipped_rules_file(RELAYS_FILE)
        self._private = _Tables((network, "") for network in _PRIVATE_NETWORKS)
        self._trusted = _Tables((str(_network(entry)), entry.strip()) for entry in settings.trusted)
        files = [self.shipped] + ([settings.relay_file] if settings.relay_file else [])
        self._watch = FileWatch(files)
        self._relays: _Relays = self._watch.read(self._read_relays)

    def _read_relays(self) -> _Relays:
        groups = read_relay_file(self.shipped)
        if self.settings.relay_file is not None:
            groups.update(read_relay_file(self.settings.relay_file))
        unknown = sorted(set(self.settings.relay_groups_disabled) - set(groups))
        if unknown:
            log_kv(log, logging.WARNING, "relay_groups_disabled names groups that do not exist",
                   groups=",".join(unknown), known=",".join(sorted(groups)))
        used = {name: group for name, group in groups.items() if name not in self.settings.relay_groups_disabled}
        tables = _Tables((network, name) for name, group in used.items() for network in group.networks)
        return _Relays(used, tables)

    def reload(self) -> bool:
        """Re-read the relay files; on an error the old set stays (one log line says why). True if re-read."""
        relays = self._watch.reread(self._read_relays, RelayFileError, log, "relay networks not reloaded, "
                                    "keeping the previous set", files=",".join(map(str, self._watch.paths)))
        if relays is None:
            return False
        self._relays = relays
        return True

    def reload_if_changed(self) -> bool:
        """``reload()`` when a relay file changed on disk since the last read (one stat per file)."""
        return self._watch.changed() and self.reload()

    @property
    def networks_count(self) -> int:
        """Relay and trusted networks in use (as listed, before nested prefixes are merged)."""
        return self._relays.tables.count + self._trusted.count

    @property
    def groups(self) -> dict[str, RelayGroup]:
        """The relay groups in use (disabled ones left out), by name."""
        return dict(self._relays.groups)

    def classify(self, address: str) -> Classified:
        parsed = parse_address(address)
        if parsed is None:
            return Classified(AddressClass.INVALID, "", address[:MAX_ADDRESS_LENGTH] if isinstance(address, str)
                              else "")
        text = str(parsed)
        if self._private.find(parsed) is not None:
            return Classified(AddressClass.PRIVATE, "", text)
        if (trusted := self._trusted.find(parsed)) is not None:
            return Classified(AddressClass.TRUSTED, trusted, text)
        if (group := self._relays.tables.find(parsed)) is not None:
            return Classified(AddressClass.RELAY, group, text)
        return Classified(AddressClass.PUBLIC, "", text)


def check_relay_files(settings: NetworkSettings, shipped: Path | None = None) -> list[str]:
    """Problems with the relay files, for ``config check``: each message names the file and what to do."""
    problems: list[str] = []
    files = [shipped if shipped is not None else shipped_rules_file(RELAYS_FILE)]
    if settings.relay_file is not None:
        files.append(settings.relay_file)
    names: set[str] = set()
    for path in files:
        try:
            names |= set(read_relay_file(path))
        except RelayFileError as exc:
            problems.append(str(exc))
    unknown = sorted(set(settings.relay_groups_disabled) - names)
    if unknown and not problems:
        problems.append(f"relay_groups_disabled: no relay group named {', '.join(unknown)} (known: "
                        f"{', '.join(sorted(names))})")
    return problems
