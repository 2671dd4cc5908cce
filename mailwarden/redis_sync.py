"""A plain redis-py client for the CLI and other short-lived commands, Sentinel-aware like the daemons.

With Sentinel the master is found by the same bounded lookup as the daemons' (``redis_sentinel.py``: all
sentinels at once, at most ``sentinel_timeout``), not by redis-py's ``Sentinel``, which retries each
sentinel in turn; then ROLE confirms it is the master. A short-lived command keeps that address.
"""

from __future__ import annotations

from typing import Any

import redis

from mailwarden.redis_pipe import parse_url
from mailwarden.redis_sentinel import SentinelLookupError, find_master
from mailwarden.redis_settings import RedisSettings


def sync_client(settings: RedisSettings) -> redis.Redis:
    """Raises redis.ConnectionError (the CLI's "cannot reach Redis") when no sentinel names a master."""
    ep = parse_url(settings.url)
    common: dict[str, Any] = {
        "password": ep.password,
        "username": ep.username,
        "db": ep.db,
        "socket_timeout": max(settings.timeout, 2.0),
        "socket_connect_timeout": settings.connect_timeout,
    }
    if settings.sentinels:
        return _sentinel_master(settings, common)
    if ep.path:
        return redis.Redis(unix_socket_path=ep.path, **common)
    return redis.Redis(host=ep.host or "127.0.0.1", port=ep.port or 6379, **common)


def _sentinel_master(settings: RedisSettings, common: dict[str, Any]) -> redis.Redis:
    avoid = None
    for _attempt in range(2):  # a sentinel that has not heard of a failover yet: ask once more, avoiding it
        try:
            host, port = find_master(settings, avoid)
        except SentinelLookupError as exc:
            raise redis.ConnectionError(str(exc)) from None
        client = redis.Redis(host=host, port=port, **common)
        role = client.execute_command("ROLE")
        if isinstance(role, list | tuple) and role and role[0] in (b"master", "master"):
            return client
        client.close()
        avoid = (host, port)
    raise redis.ConnectionError(f"{host}:{port}, named by the sentinels, is not a master (a failover under way?)")
