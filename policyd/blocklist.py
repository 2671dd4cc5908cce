"""Snagged accounts: SASL users (and optionally client addresses and networks) refused with 5.7.1.

The list lives in Redis so every MX host refuses at once; the phish detector (a later capability)
writes to it through BlockList, and operators use ``mailwarden block``.

A client network is blocked under its own key (``block:client:203.0.113.0/24``). To stay one read per
request, ``block:nets`` names the prefix lengths in use ("4/24 6/48"); the check reads it with the blocks,
together with the client's covering networks of the lengths it last saw, and reads again only on the
request where that list changed. When the rate limit or the greylist comes next, the check makes no Redis
call of its own: its keys ride as a guard on their script (policyd/check.py, mailwarden/redis_guard.py),
so the default checks cost one round trip.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from dataclasses import asdict, dataclass
from typing import cast

import redis
from pydantic import field_validator

from mailwarden.decision import Action
from mailwarden.redis_guard import Guard
from mailwarden.redis_pipe import PipelinedRedis
from mailwarden.section import Section
from policyd import keys
from policyd.check import DeferringCheck
from policyd.request import PolicyRequest
from policyd.settings_types import check_template
from policyd.verdict import Verdict, reject


class BlocklistSettings(Section):
    """Snagged accounts (and, optionally, client addresses) refused with 5.7.1."""

    check_clients: bool = True
    """Also refuse client addresses on the block list (one more key in the same Redis round trip)."""
    user_text: str = (
        "Your account has been blocked for security reasons; please contact the help desk"
    )
    client_text: str = "Mail from your address is blocked; please contact the postmaster"

    @field_validator("user_text", "client_text")
    @classmethod
    def _texts(cls, text: str) -> str:
        return check_template(text, {"user", "client"})


@dataclass(frozen=True)
class BlockEntry:
    kind: str
    """``user`` or ``client``."""
    value: str
    reason: str
    by: str
    at: float
    expires_in: int | None = None
    """Seconds left, or None for a block that stays until removed."""


class BlocklistCheck(DeferringCheck):
    name = "blocklist"

    def __init__(self, settings: BlocklistSettings, redis_pipe: PipelinedRedis, prefix: str) -> None:
        self.settings = settings
        self.redis = redis_pipe
        self.prefix = prefix
        self._nets_seen: bytes | None = None
        self._lengths: dict[int, list[int]] = {}
        """Prefix lengths of blocked networks by IP version, as ``block:nets`` last said."""

    def _network_keys(self, ip: IPAddress) -> list[str]:
        if not self._lengths:
            return []  # no network is blocked (the usual case): nothing to mask
        ip = ip.ipv4_mapped or ip if ip.version == 6 else ip
        number, bits = int(ip), ip.max_prefixlen
        found = []
        for length in self._lengths.get(ip.version, ()):
            masked = number & (((1 << length) - 1) << (bits - length))
            if ip.version == 4:
                body = socket.inet_ntop(socket.AF_INET, masked.to_bytes(4, "big"))
            else:
                body = ipaddress.IPv6Address(masked).compressed
            found.append(f"{self.prefix}{keys.BLOCK_CLIENT}{body}/{length}")
        return found

    def _learn_lengths(self, raw: bytes | None) -> None:
        self._nets_seen = raw
        self._lengths = {}
        for item in (raw or b"").decode(errors="replace").split():
            version, _, length = item.partition("/")
            if version in ("4", "6") and length.isdigit():
                self._lengths.setdefault(int(version), []).append(int(length))

    def rcpt_read(self, request: PolicyRequest) -> Guard | None:
        """The block keys of this user and client (expected: none set), with ``block:nets`` (expected: what
        it said last time), or None when the request has neither."""
        wanted = []
        if request.sasl_username:
            wanted.append(("user", keys.block_user(self.prefix, request.sasl_username)))
        ip = request.client_ip if self.settings.check_clients else None
        if ip is not None:
            wanted.append(("client", f"{self.prefix}{keys.BLOCK_CLIENT}{request.client_ip_text}"))
            if networks := self._network_keys(ip):
                wanted.extend(("client", key) for key in networks)
        if not wanted:
            return None
        read_keys = [key for _kind, key in wanted]
        expected: list[bytes | None] = [None] * len(wanted)
        if ip is not None:
            read_keys.append(f"{self.prefix}{keys.BLOCK_NETS}")
            expected.append(self._nets_seen)
        return Guard(read_keys, expected, context=(wanted, ip))

    async def rcpt_check(self, request: PolicyRequest, read: Guard) -> Verdict | None:
        found = await self.redis.ask("MGET", *read.keys)
        assert isinstance(found, list)
        return await self.rcpt_judge(request, read, found)

    async def rcpt_judge(self, request: PolicyRequest, read: Guard, found: list[bytes | None]) -> Verdict | None:
        wanted, ip = cast("tuple[list[tuple[str, str]], IPAddress | None]", read.context)
        found = list(found)
        if ip is not None and (nets := found.pop()) != self._nets_seen:
            self._learn_lengths(nets)  # a network block was added or removed since the last request
            more = [("client", key) for key in self._network_keys(ip) if ("client", key) not in wanted]
            if more:
                again = await self.redis.ask("MGET", *(key for _kind, key in more))
                assert isinstance(again, list)
                wanted, found = wanted + more, found + again
        for (kind, key), raw in zip(wanted, found, strict=True):
            if raw is None:
                continue
            reason = _reason(raw)
            if kind == "user":
                text = self.settings.user_text.format(user=request.sasl_username, client=request.client_address)
                return Verdict.refuse(Action.REJECT, f"account blocked: {reason}", reject(text))
            text = self.settings.client_text.format(user=request.sasl_username, client=request.client_address)
            network = key.rpartition(keys.BLOCK_CLIENT)[2]
            listed = f" ({network})" if "/" in network else ""
            return Verdict.refuse(Action.REJECT, f"client blocked{listed}: {reason}", reject(text))
        return None


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _reason(raw: object) -> str:
    try:
        return str(json.loads(raw).get("reason", ""))  # type: ignore[arg-type]
    except (ValueError, TypeError, AttributeError):
        return "listed"


class BlockList:
    """The block list for commands and other capabilities (synchronous redis-py)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix

    def _key(self, kind: str, value: str) -> str:
        if kind == "user":
            return keys.block_user(self.prefix, value)
        if kind == "client":
            return keys.block_client(self.prefix, value)
        raise ValueError(f"unknown block kind {kind!r}: use user or client")

    def add(self, kind: str, value: str, reason: str, by: str, expires: float | None = None) -> BlockEntry:
        """Block a SASL user, a client address or a client network (``203.0.113.0/24``)."""
        if expires is not None and expires <= 0:
            raise ValueError("a block cannot expire after 0 seconds; to lift a block, remove it")
        key = self._key(kind, value)
        at = time.time()
        body = {"reason": reason, "by": by, "at": at}
        ttl = max(1, round(expires)) if expires else None
        self.client.set(key, json.dumps(body), ex=ttl)
        if kind == "client":
            self._write_lengths()
        value = value.strip().lower() if kind == "user" else keys.block_client_body(value)
        return BlockEntry(kind, value, reason, by, at, ttl)

    def remove(self, kind: str, value: str) -> bool:
        removed = bool(self.client.delete(self._key(kind, value)))
        if kind == "client":
            self._write_lengths()
        return removed

    def _write_lengths(self) -> None:
        """Rewrite ``block:nets`` from the network blocks present (after this command's own change, so of
        two commands at once the later rewrite sees both)."""
        lengths = set()
        for key in self.client.scan_iter(match=f"{self.prefix}{keys.BLOCK_CLIENT}*/*", count=500):
            body = key.decode()[len(self.prefix) + len(keys.BLOCK_CLIENT):]
            lengths.add((6 if ":" in body else 4, int(body.rpartition("/")[2])))
        target = f"{self.prefix}{keys.BLOCK_NETS}"
        if lengths:
            self.client.set(target, " ".join(f"{version}/{length}" for version, length in sorted(lengths)))
        else:
            self.client.delete(target)

    def entries(self) -> list[BlockEntry]:
        found = []
        for kind, marker in (("user", keys.BLOCK_USER), ("client", keys.BLOCK_CLIENT)):
            pattern = f"{self.prefix}{marker}*"
            for key in self.client.scan_iter(match=pattern, count=500):
                raw = self.client.get(key)
                if raw is None:
                    continue
                ttl = self.client.ttl(key)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {}
                value = key.decode()[len(self.prefix) + len(marker):]
                found.append(BlockEntry(kind, value, str(body.get("reason", "")), str(body.get("by", "")),
                                        float(body.get("at", 0)), ttl if ttl and ttl > 0 else None))
        return sorted(found, key=lambda entry: (entry.kind, entry.value))

    @staticmethod
    def as_dict(entry: BlockEntry) -> dict[str, object]:
        return asdict(entry)
