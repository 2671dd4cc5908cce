"""What the postmaster does to the greylist by hand: look a triplet up, let it pass, forget it, and open a
window in which a sender domain is not greylisted (for time-critical mail: password resets, one-time
codes). Synchronous redis-py, for the CLI; the keys are those of policyd/keys.py.

Triplet keys are hashed, so lookups by client, sender or recipient scan the triplets (SCAN, in batches,
never KEYS) and compare the fields each triplet stores.
"""

from __future__ import annotations

import getpass
import ipaddress
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from mailwarden.units import format_duration
from policyd import keys
from policyd.greylist import GreylistSettings, client_network, normalise_sender


@dataclass(frozen=True)
class Selector:
    """Which triplets a command is about; every given field must match."""

    client: str | None = None
    network: str | None = None
    sender: str | None = None
    sender_domain: str | None = None
    recipient: str | None = None

    def empty(self) -> bool:
        return not any(asdict(self).values())


@dataclass(frozen=True)
class TripletInfo:
    key: str
    origin: str
    sender: str
    recipient: str
    first_seen: float | None
    """When the triplet was first seen (epoch seconds); None for one let through by hand before any attempt."""
    last_seen: float | None
    passed: bool
    expires_in: int | None
    verdict: str
    """What the next request of this triplet would get, in words."""
    passed_by_hand: bool = False


@dataclass(frozen=True)
class PassResult:
    triplets: list[TripletInfo]
    """Triplets that now pass (existing ones, or a full triplet created as passed)."""
    client: dict[str, object] | None
    """The client pass opened for a client given alone: network, by, at, expires_in."""


class GreylistAdmin:
    def __init__(self, client: redis.Redis, prefix: str, settings: GreylistSettings,
                 now: float | None = None) -> None:
        self.redis = client
        self.prefix = prefix
        self.settings = settings
        self.now = now if now is not None else time.time()

    # -- finding ------------------------------------------------------------------------------------

    def _origins(self, selector: Selector) -> tuple[str | None, IPNetworkT | None]:
        origin = None
        if selector.client:
            ip = ipaddress.ip_address(selector.client)
            origin = client_network(ip, self.settings.ipv4_prefix, self.settings.ipv6_prefix)
        network = ipaddress.ip_network(selector.network, strict=False) if selector.network else None
        return origin, network

    def find(self, selector: Selector) -> list[TripletInfo]:
        origin, network = self._origins(selector)
        sender = normalise_sender(selector.sender).lower() if selector.sender else None
        domain = selector.sender_domain.lower().lstrip("@") if selector.sender_domain else None
        recipient = selector.recipient.lower() if selector.recipient else None
        found = []
        for key, fields, ttl in self._scan():
            o, s, r = fields.get("o", ""), fields.get("s", ""), fields.get("r", "")
            if origin and o != origin:
                continue
            if network and not _in_network(o, network):
                continue
            if sender and s != sender:
                continue
            if domain and s.rpartition("@")[2] != domain and o != f"spf:{domain}":
                continue
            if recipient and r != recipient:
                continue
            found.append(self._info(key, fields, ttl))
        return sorted(found, key=lambda info: info.last_seen or 0.0, reverse=True)

    def _scan(self) -> Iterator[tuple[str, dict[str, str], int]]:
        pattern = f"{self.prefix}{keys.GREYLIST_TRIPLET}*"
        batch: list[str] = []
        for raw in self.redis.scan_iter(match=pattern, count=1000):
            batch.append(raw.decode() if isinstance(raw, bytes) else raw)
            if len(batch) == 500:
                yield from self._fetch(batch)
                batch = []
        if batch:
            yield from self._fetch(batch)

    def _fetch(self, batch: list[str]) -> Iterator[tuple[str, dict[str, str], int]]:
        pipe = self.redis.pipeline(transaction=False)
        for key in batch:
            pipe.hgetall(key)
            pipe.ttl(key)
        replies = pipe.execute()
        for key, fields, ttl in zip(batch, replies[::2], replies[1::2], strict=True):
            if fields:
                yield key, {k.decode(): v.decode() for k, v in fields.items()}, int(ttl)

    def _info(self, key: str, fields: dict[str, str], ttl: int) -> TripletInfo:
        first = float(fields["f"]) if "f" in fields else None
        last = float(fields["l"]) if "l" in fields else None
        by_hand = fields.get("p") == "1"
        passed = by_hand or (first is not None and last is not None and last - first >= self.settings.delay)
        seen = first if first is not None else self.now
        missing = self.settings.delay - (self.now - seen)
        if by_hand:
            verdict = "passes (let through by 'greylist pass')"
        elif passed:
            verdict = "passes (seen and passed before)"
        elif self.now - seen > self.settings.retry_window:
            verdict = f"deferred as new (not retried within {format_duration(self.settings.retry_window)})"
        elif missing > 0:
            verdict = f"deferred for {format_duration(missing)} more"
        else:
            verdict = "passes (the delay is over)"
        return TripletInfo(key, fields.get("o", "?"), fields.get("s", "?"), fields.get("r", "?"), first, last,
                           passed, ttl if ttl >= 0 else None, verdict, by_hand)

    # -- changing -----------------------------------------------------------------------------------

    @staticmethod
    def client_only(selector: Selector) -> bool:
        return bool(selector.client) and not any((selector.network, selector.sender, selector.sender_domain,
                                                  selector.recipient))

    def pass_(self, selector: Selector) -> PassResult:
        """Let the selected triplets pass from their next attempt, keeping their real sightings (they are
        marked ``p``); a full triplet (client, sender and recipient) that was never seen is created as
        passed. A client given alone also gets a client pass: every triplet of its network passes for
        keys.GREYLIST_PASSED_CLIENT_TTL, seen before or not."""
        targets = [info.key for info in self.find(selector)]
        if not targets and selector.client and selector.sender is not None and selector.recipient:
            origin, _ = self._origins(selector)
            assert origin is not None
            sender, recipient = normalise_sender(selector.sender).lower(), selector.recipient.lower()
            key = keys.greylist_triplet(self.prefix, origin, sender, recipient)
            self.redis.hset(key, mapping={"o": origin, "s": sender, "r": recipient})
            targets = [key]
        pipe = self.redis.pipeline(transaction=False)
        for key in targets:
            pipe.hset(key, "p", "1")
            pipe.expire(key, int(self.settings.max_age))
        client = None
        if self.client_only(selector):
            network, _ = self._origins(selector)
            assert network is not None
            ttl = keys.GREYLIST_PASSED_CLIENT_TTL
            client = {"network": network, "by": getpass.getuser(), "at": self.now}
            pipe.set(keys.greylist_passed_client(self.prefix, network), json.dumps(client), ex=ttl)
            client["expires_in"] = ttl
        pipe.execute()
        return PassResult([self._info(key, self._fields(key), int(self.settings.max_age)) for key in targets],
                          client)

    def flush(self, selector: Selector) -> int:
        """Forget the selected triplets (and a client's auto-whitelist entry and client pass): the next
        attempt is new."""
        targets = [info.key for info in self.find(selector)]
        if selector.client and not any((selector.sender, selector.sender_domain, selector.recipient)):
            targets.append(f"{self.prefix}{keys.GREYLIST_CLIENT}{ipaddress.ip_address(selector.client)}")
            network, _ = self._origins(selector)
            assert network is not None
            targets.append(keys.greylist_passed_client(self.prefix, network))
        return int(self.redis.delete(*targets)) if targets else 0

    def _expect_key(self, domain: str, recipient: str | None) -> tuple[str, str, str | None]:
        domain = domain.lower().lstrip("@").rstrip(".")
        recipient = recipient.lower() if recipient else None
        return keys.greylist_expect(self.prefix, domain, recipient), domain, recipient

    def expect(self, domain: str, recipient: str | None, seconds: float, reason: str) -> dict[str, object]:
        """Open (or re-open, with a new length and reason) a window in which mail from ``domain`` (to
        ``recipient``, or to anyone) is not greylisted; it closes by itself after ``seconds``."""
        if seconds <= 0:
            raise ValueError("a window cannot last 0 seconds; to close one, use 'greylist unexpect'")
        if seconds > self.settings.expect_max:
            raise ValueError(f"{format_duration(seconds)} is longer than the longest window allowed, "
                             f"{format_duration(self.settings.expect_max)} (policyd.greylist.expect_max)")
        key, domain, recipient = self._expect_key(domain, recipient)
        body = {"domain": domain, "recipient": recipient, "by": getpass.getuser(), "at": self.now,
                "reason": reason}
        self.redis.set(key, json.dumps(body), ex=max(1, round(seconds)))
        return {**body, "expires_in": max(1, round(seconds))}

    def unexpect(self, domain: str, recipient: str | None) -> dict[str, object] | None:
        """Close a window before its time; the window that was open, or None if there was none."""
        key, _domain, _recipient = self._expect_key(domain, recipient)
        pipe = self.redis.pipeline(transaction=True)
        pipe.get(key)
        pipe.delete(key)
        value, _deleted = pipe.execute()
        return _window(value, None) if value is not None else None

    def expectations(self) -> list[dict[str, object]]:
        found = []
        for raw in self.redis.scan_iter(match=f"{self.prefix}{keys.GREYLIST_EXPECT}*", count=1000):
            value, ttl = self.redis.get(raw), self.redis.ttl(raw)
            if value is None:
                continue
            found.append(_window(value, ttl))
        return sorted(found, key=lambda w: (str(w.get("domain")), str(w.get("recipient") or "")))

    def _fields(self, key: str) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in self.redis.hgetall(key).items()}


def _window(value: bytes | str, ttl: int | None) -> dict[str, object]:
    try:
        body = json.loads(value)
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    body.setdefault("reason", "")
    return {**body, "expires_in": ttl if ttl is None or ttl >= 0 else None}


IPNetworkT = ipaddress.IPv4Network | ipaddress.IPv6Network


def _in_network(origin: str, network: IPNetworkT) -> bool:
    if origin.startswith("spf:"):
        return False
    try:
        triplet_net = ipaddress.ip_network(origin, strict=False)
    except ValueError:
        return False
    return triplet_net.version == network.version and (triplet_net.subnet_of(network)  # type: ignore[arg-type]
                                                         or network.subnet_of(triplet_net))  # type: ignore[arg-type]


MAX_WHITELIST_BYTES = 5 * 1024 * 1024
SOURCE_SCHEMES = ("file", "http", "https")


class UnsupportedSource(ValueError):
    """A whitelist source whose scheme whitelist-update does not read (ftp:, data: ...)."""


@dataclass(frozen=True)
class FetchedList:
    text: str
    modified: float | None
    """When the source last changed: the http Last-Modified header or the file's mtime (None if unknown)."""


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(//)?")
_KNOWN_URL_SCHEMES = {"ftp", "ftps", "sftp", "scp", "data", "mailto", "ldap", "ldaps", "file", "http", "https",
                      "rsync", "git", "s3", "gs"}


def _source_scheme(source: str) -> str | None:
    """The URL scheme of a whitelist source, or None for a plain file path (``name:with-colon`` is a path)."""
    match = _URL.match(source)
    if match is None:
        return None
    scheme = match.group(1).lower()
    return scheme if match.group(2) or scheme in _KNOWN_URL_SCHEMES else None


def fetch_whitelist(source: str, timeout: float = 30.0) -> FetchedList:
    """The text of a whitelist from a file path, a file:// URL or an http(s) URL (bounded in size and time),
    with when the source last changed; any other scheme is refused by name."""
    import email.utils
    import urllib.parse
    import urllib.request

    scheme = _source_scheme(source)
    if scheme is not None and scheme not in SOURCE_SCHEMES:
        raise UnsupportedSource(f"{scheme}: scheme not supported; use a file path, file://, http:// or https://")
    modified: float | None = None
    if scheme in ("http", "https"):
        request = urllib.request.Request(source, headers={"User-Agent": "mailwarden whitelist-update"})  # noqa: S310
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only, above
            data = response.read(MAX_WHITELIST_BYTES + 1)
            if stamp := response.headers.get("Last-Modified"):
                try:
                    modified = email.utils.parsedate_to_datetime(stamp).timestamp()
                except (TypeError, ValueError):
                    modified = None
    else:
        path = urllib.request.url2pathname(urllib.parse.urlparse(source).path) if scheme == "file" else source
        with open(path, "rb") as handle:
            data = handle.read(MAX_WHITELIST_BYTES + 1)
            modified = os.fstat(handle.fileno()).st_mtime
    if len(data) > MAX_WHITELIST_BYTES:
        raise ValueError(f"{source}: larger than {MAX_WHITELIST_BYTES} bytes; not a whitelist")
    return FetchedList(data.decode("utf-8", errors="replace"), modified)


def update_whitelist(source: str, target: Path, now: float | None = None) -> dict[str, object]:
    """Replace the managed client whitelist with ``source``, atomically, after checking that every line
    parses (an error names the source and its line). A header records when and from where it was fetched,
    and how old the list itself is (``# list dated:``): the date the list carries in a comment, else the
    source's Last-Modified or mtime, else now. The staleness warning follows that date, so re-importing an
    old list does not silence it. The daemons pick the file up within whitelist_check_interval."""
    import tempfile

    from policyd.whitelist import ClientWhitelist, text_date

    fetched = fetch_whitelist(source)
    loaded = ClientWhitelist.parse(fetched.text, source)  # a broken list never replaces a working one
    now = now if now is not None else time.time()
    dated = text_date(fetched.text)
    dated = dated if dated is not None else fetched.modified if fetched.modified is not None else now
    stamp, list_stamp = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) for t in (now, dated))
    body = (f"# mailwarden whitelist-update: updated {stamp} from {source}\n"
            f"# list dated: {list_stamp}\n{fetched.text}")
    if not body.endswith("\n"):
        body += "\n"
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=".whitelist-", dir=target.parent)
    temp = Path(temp_name)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(body)
            out.flush()
            os.fsync(out.fileno())
        temp.chmod(0o644)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return {"file": str(target), "source": source, "updated": stamp, "dated": list_stamp,
            "age_seconds": max(0, round(now - dated)), "entries": loaded.entries()}


def _text(value: bytes | str) -> str:
    """A Redis reply as text (the CLI's client returns bytes; its type stub allows str too)."""
    return value.decode() if isinstance(value, bytes) else value
