"""What the postmaster does to rate limits by hand: see where a key stands, reset its counters, raise or
lift one key's limit. Synchronous redis-py, for the CLI; the keys and the estimate are those of the
ratelimit script (scripts/ratelimit.lua)."""

from __future__ import annotations

import ipaddress
import math
import time
from dataclasses import dataclass

import redis

from mailwarden.units import format_duration
from policyd import keys
from policyd.ratelimit import RateLimit, RateLimitSettings


@dataclass(frozen=True)
class Standing:
    limit: str
    key: str
    count: int
    """Estimated count in the sliding window now."""
    max: int | None
    """The max that applies to this key (after overrides); None when the key is exempt."""
    window: str
    """The window as people write it (``1h``, ``1d``)."""
    override: str | None
    """``exempt``, a max set from the CLI, or ``config`` for an override in the config file; None if none."""
    override_expires_in: int | None


class RateLimitAdmin:
    def __init__(self, client: redis.Redis, prefix: str, settings: RateLimitSettings, now: float | None = None):
        self.redis = client
        self.prefix = prefix
        self.settings = settings
        self.now = now if now is not None else time.time()

    def limits(self, name: str | None) -> list[RateLimit]:
        chosen = [limit for limit in self.settings.limits if limit.window != "message"
                  and (name is None or limit.name == name)]
        if name is not None and not chosen:
            known = ", ".join(limit.name for limit in self.settings.limits if limit.window != "message")
            raise ValueError(f"no windowed limit named {name!r}; limits: {known}")
        return chosen

    def key_value(self, limit: RateLimit, key: str) -> str:
        """The key as the check counts it: a client address becomes its network, names are lower case."""
        if limit.key == "global":
            return "*"
        if limit.key == "client_address":
            ip = ipaddress.ip_address(key.split("/")[0])
            prefix = self.settings.client_prefix_v4 if ip.version == 4 else self.settings.client_prefix_v6
            return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))
        return key.strip().lower()

    def show(self, key: str, name: str | None = None) -> list[Standing]:
        standings = []
        for limit in self.limits(name):
            value = self.key_value(limit, key)
            bucket = self.redis.hmget(keys.ratelimit_bucket(self.prefix, limit.name, value), "i", "c", "p")
            override_key = keys.ratelimit_override(self.prefix, limit.name, value)
            override, ttl = self.redis.get(override_key), self.redis.ttl(override_key)
            configured = next((o for o in self.settings.overrides if o.limit == limit.name and o.key.lower() == value),
                              None)
            cap: int | None = limit.max
            label = None
            if configured is not None:
                cap, label = (None if configured.exempt else configured.max), "config"
            if override is not None:
                text = override.decode() if isinstance(override, bytes) else str(override)
                cap, label = (None, "exempt") if text == "exempt" else (int(float(text)), text)
            window = float(limit.window)
            standings.append(Standing(limit.name, value, self._estimate(bucket, window), cap,
                                      format_duration(window), label, ttl if ttl and ttl > 0 else None))
        return standings

    def _estimate(self, bucket: list[bytes | str | None], window: float) -> int:
        """The script's two-bucket sliding-window estimate, read without changing anything."""
        index = math.floor(self.now / window)
        stored = int(bucket[0]) if bucket[0] is not None else None
        cur = float(bucket[1] or 0)
        prev = float(bucket[2] or 0)
        if stored is None or stored < index - 1:
            return 0
        if stored == index - 1:
            prev, cur = cur, 0.0
        elapsed = self.now - index * window
        return round(prev * (window - elapsed) / window + cur)

    def reset(self, key: str, name: str | None = None) -> int:
        targets = [keys.ratelimit_bucket(self.prefix, limit.name, self.key_value(limit, key))
                   for limit in self.limits(name)]
        return int(self.redis.delete(*targets)) if targets else 0

    def override(self, key: str, name: str, max_value: int | None, exempt: bool, seconds: float | None) -> str:
        [limit] = self.limits(name)
        target = keys.ratelimit_override(self.prefix, limit.name, self.key_value(limit, key))
        value = "exempt" if exempt else str(max_value)
        self.redis.set(target, value, ex=int(seconds) if seconds else None)
        return value

    def remove_override(self, key: str, name: str) -> bool:
        [limit] = self.limits(name)
        return bool(self.redis.delete(keys.ratelimit_override(self.prefix, limit.name, self.key_value(limit, key))))
