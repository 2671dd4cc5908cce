"""Snagged accounts: SASL users (and optionally client addresses) refused with 5.7.1.

The list lives in Redis so every MX host refuses at once; the phish detector (a later capability)
writes to it through BlockList, and operators use ``mailwarden block``.
"""

from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import asdict, dataclass

import redis

from mailwarden.decision import Action
from mailwarden.redis_pipe import PipelinedRedis
from policyd import keys
from policyd.check import Check
from policyd.request import PolicyRequest
from policyd.settings import BlocklistSettings
from policyd.verdict import Verdict, reject


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


class BlocklistCheck(Check):
    name = "blocklist"

    def __init__(self, settings: BlocklistSettings, redis_pipe: PipelinedRedis, prefix: str) -> None:
        self.settings = settings
        self.redis = redis_pipe
        self.prefix = prefix

    async def on_rcpt(self, request: PolicyRequest) -> Verdict | None:
        wanted = []
        if request.sasl_username:
            wanted.append(("user", keys.block_user(self.prefix, request.sasl_username)))
        if self.settings.check_clients and request.client_ip is not None:
            wanted.append(("client", f"{self.prefix}{keys.BLOCK_CLIENT}{request.client_ip.compressed}"))
        if not wanted:
            return None
        found = await self.redis.call("MGET", *(key for _kind, key in wanted))
        assert isinstance(found, list)
        for (kind, _key), raw in zip(wanted, found, strict=True):
            if raw is None:
                continue
            reason = _reason(raw)
            if kind == "user":
                text = self.settings.user_text.format(user=request.sasl_username, client=request.client_address)
                return Verdict.refuse(Action.REJECT, f"account blocked: {reason}", reject(text))
            text = self.settings.client_text.format(user=request.sasl_username, client=request.client_address)
            return Verdict.refuse(Action.REJECT, f"client blocked: {reason}", reject(text))
        return None


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
        key = self._key(kind, value)
        body = {"reason": reason, "by": by, "at": time.time()}
        self.client.set(key, json.dumps(body), ex=int(expires) if expires else None)
        return BlockEntry(kind, value.strip().lower() if kind == "user" else str(ipaddress.ip_address(value.strip())),
                          reason, by, body["at"], int(expires) if expires else None)

    def remove(self, kind: str, value: str) -> bool:
        return bool(self.client.delete(self._key(kind, value)))

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
