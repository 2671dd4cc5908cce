"""A plain redis-py client for the CLI and other short-lived commands, Sentinel-aware like the daemons."""

from __future__ import annotations

import redis
from redis.sentinel import Sentinel

from mailwarden.redis_pipe import parse_url
from mailwarden.redis_settings import RedisSettings


def sync_client(settings: RedisSettings) -> redis.Redis:
    ep = parse_url(settings.url)
    common = {
        "password": ep.password,
        "username": ep.username,
        "db": ep.db,
        "socket_timeout": max(settings.timeout, 2.0),
        "socket_connect_timeout": settings.connect_timeout,
    }
    if settings.sentinels:
        extra = {"password": settings.sentinel_password} if settings.sentinel_password else {}
        sentinel = Sentinel(settings.sentinel_addresses(), sentinel_kwargs={"socket_timeout": 2.0, **extra})
        return sentinel.master_for(settings.sentinel_service, **common)
    if ep.path:
        return redis.Redis(unix_socket_path=ep.path, **common)
    return redis.Redis(host=ep.host or "127.0.0.1", port=ep.port or 6379, **common)
