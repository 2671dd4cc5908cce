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
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import redis

from policyd import keys
from policyd.greylist import client_network, normalise_sender
from policyd.settings import GreylistSettings


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
    first_seen: float
    last_seen: float
    passed: bool
    expires_in: int | None
    verdict: str
    """What the next request of this triplet would get, in words."""


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
        return sorted(found, key=lambda info: info.last_seen, reverse=True)

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
        first, last = float(fields.get("f", 0)), float(fields.get("l", 0))
        passed = last - first >= self.settings.delay
        missing = self.settings.delay - (self.now - first)
        if passed:
            verdict = "passes (seen and passed before)"
        elif self.now - first > self.settings.retry_window:
            verdict = f"deferred as new (not retried within {self.settings.retry_window:g}s)"
        elif missing > 0:
            verdict = f"deferred for {missing:.0f} more seconds"
        else:
            verdict = "passes (the delay is over)"
        return TripletInfo(key, fields.get("o", "?"), fields.get("s", "?"), fields.get("r", "?"), first, last,
                           passed, ttl if ttl >= 0 else None, verdict)

    # -- changing -----------------------------------------------------------------------------------

    def pass_(self, selector: Selector) -> list[TripletInfo]:
        """Let the selected triplets pass from their next attempt; a full triplet (client, sender and
        recipient) that was never seen is created as passed."""
        first = self.now - self.settings.delay - 1
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
            pipe.hset(key, mapping={"f": f"{first:.3f}", "l": f"{self.now:.3f}"})
            pipe.expire(key, int(self.settings.max_age))
        pipe.execute()
        return [self._info(key, self._fields(key), int(self.settings.max_age)) for key in targets]

    def flush(self, selector: Selector) -> int:
        """Forget the selected triplets (and a client's auto-whitelist entry): the next attempt is new."""
        targets = [info.key for info in self.find(selector)]
        if selector.client and not any((selector.sender, selector.sender_domain, selector.recipient)):
            targets.append(f"{self.prefix}{keys.GREYLIST_CLIENT}{ipaddress.ip_address(selector.client)}")
        return int(self.redis.delete(*targets)) if targets else 0

    def expect(self, domain: str, recipient: str | None, seconds: float, reason: str) -> dict[str, object]:
        domain = domain.lower().lstrip("@").rstrip(".")
        key = keys.greylist_expect(self.prefix, domain, recipient.lower() if recipient else None)
        body = {"domain": domain, "recipient": recipient, "by": getpass.getuser(), "at": self.now,
                "reason": reason}
        self.redis.set(key, json.dumps(body), ex=max(1, int(seconds)))
        return {**body, "expires_in": int(seconds)}

    def expectations(self) -> list[dict[str, object]]:
        found = []
        for raw in self.redis.scan_iter(match=f"{self.prefix}{keys.GREYLIST_EXPECT}*", count=1000):
            value, ttl = self.redis.get(raw), self.redis.ttl(raw)
            if value is None:
                continue
            try:
                body = json.loads(value)
            except ValueError:
                body = {}
            found.append({**body, "expires_in": ttl})
        return found

    def _fields(self, key: str) -> dict[str, str]:
        return {k.decode(): v.decode() for k, v in self.redis.hgetall(key).items()}


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


def fetch_whitelist(source: str, timeout: float = 30.0) -> str:
    """The text of a whitelist from a file path or an http(s) URL (bounded in size and time)."""
    if source.startswith(("http://", "https://")):
        import urllib.request

        request = urllib.request.Request(source, headers={"User-Agent": "mailwarden whitelist-update"})  # noqa: S310
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only, above
            data = response.read(MAX_WHITELIST_BYTES + 1)
    else:
        with open(source, "rb") as handle:
            data = handle.read(MAX_WHITELIST_BYTES + 1)
    if len(data) > MAX_WHITELIST_BYTES:
        raise ValueError(f"{source}: larger than {MAX_WHITELIST_BYTES} bytes; not a whitelist")
    return data.decode("utf-8", errors="replace")


def update_whitelist(source: str, target: Path, now: float | None = None) -> dict[str, object]:
    """Replace the managed client whitelist with ``source``, atomically, after checking that every line
    parses; records the source and the date in a header line. The daemons pick it up within
    whitelist_check_interval."""
    import os
    import tempfile

    from policyd.whitelist import ClientWhitelist

    text = fetch_whitelist(source)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now if now is not None else time.time()))
    body = f"# mailwarden whitelist-update: updated {stamp} from {source}\n{text}"
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
        loaded = ClientWhitelist.load([temp])  # a broken list never replaces a working one
        temp.chmod(0o644)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    entries = len(loaded.networks) + len(loaded.name_suffixes) + len(loaded.name_patterns)
    return {"file": str(target), "source": source, "updated": stamp, "entries": entries}
