"""Assembles the policy daemon from its settings: Redis, the checks in order, the pipeline, the server."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import time
from collections.abc import Callable
from importlib import resources
from typing import get_args

from mailwarden.config import Config, ConfigError
from mailwarden.directory import LdapSource
from mailwarden.dns import DnsSettings
from mailwarden.logs import DecisionLog, get_logger, log_kv
from mailwarden.redis_pipe import PipelinedRedis, Script
from mailwarden.redis_settings import RedisSettings
from mailwarden.service import raise_open_files_limit
from policyd import metrics
from policyd.access import AccessCheck
from policyd.blocklist import BlocklistCheck
from policyd.check import Check, Pipeline
from policyd.dnsbl import DnsblCheck
from policyd.greylist import GreylistCheck
from policyd.notify import LimitNotifier
from policyd.quota import QuotaCheck
from policyd.ratelimit import RateLimitCheck
from policyd.recipients import RecipientCheck
from policyd.server import PolicyServer
from policyd.settings import PolicydSettings
from policyd.settings_types import CheckName
from policyd.spf import SpfCheck

log = get_logger("policyd.service")

RESTART_KEYS = ("listen", "max_connections")
"""Keys of [policyd] that a SIGHUP cannot change: the listeners stay open as they are."""
DESCRIPTOR_RESERVE = 64
"""File descriptors kept beside max_connections: listeners, Redis (and Sentinel), directory and SQL
connections, DNS, the metrics endpoint, logs and the files the checks read."""


def require_descriptors(max_connections: int) -> int:
    """Raise the soft open files limit to the hard one, then refuse to start (a ConfigError: exit 78) when
    max_connections clients plus DESCRIPTOR_RESERVE do not fit in it. Past that limit the kernel would
    refuse the descriptor for a client (dropped without a word) or for a Redis reconnect; refusing over
    max_connections is ours to count and log. Returns the limit."""
    limit = raise_open_files_limit()
    needed = max_connections + DESCRIPTOR_RESERVE
    if needed > limit:
        raise ConfigError(
            f"policyd.max_connections = {max_connections} does not fit the open files limit of {limit}: it needs "
            f"{needed} descriptors ({max_connections} clients + {DESCRIPTOR_RESERVE} for Redis, directories, "
            f"metrics and logs); raise LimitNOFILE= in the unit (ulimit -n) or lower max_connections to at most "
            f"{max(limit - DESCRIPTOR_RESERVE, 0)}")
    return limit

def load_scripts() -> list[Script]:
    folder = resources.files("policyd") / "scripts"
    return [Script(name, (folder / f"{name}.lua").read_text()) for name in ("greylist", "ratelimit")]


def ratelimit_directory(settings: PolicydSettings) -> LdapSource | None:
    """The directory that per-user rate-limit overrides are read from (the recipients' LDAP servers)."""
    if not settings.ratelimit.ldap_attribute:
        return None
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="ratelimit-ldap")
    return LdapSource(settings.recipients.ldap, pool)


def build_checks(settings: PolicydSettings, redis_pipe: PipelinedRedis, prefix: str, dns: DnsSettings,
                 now: Callable[[], float] = time.time) -> list[Check]:
    hostname = settings.hostname or socket.getfqdn()
    factories: dict[str, Callable[[], Check]] = {
        "access": lambda: AccessCheck(settings.access.files, set(get_args(CheckName)), settings.access.check_interval),
        "blocklist": lambda: BlocklistCheck(settings.blocklist, redis_pipe, prefix),
        "ratelimit": lambda: RateLimitCheck(settings.ratelimit, redis_pipe, prefix, now,
                                            LimitNotifier(settings.ratelimit.notify), ratelimit_directory(settings)),
        "dnsbl": lambda: DnsblCheck(settings.dnsbl, dns, redis_pipe, prefix),
        "spf": lambda: SpfCheck(settings.spf, dns, hostname, settings.trusted_networks, redis_pipe, prefix),
        "recipients": lambda: RecipientCheck(settings.recipients, redis_pipe, prefix),
        "quota": lambda: QuotaCheck(settings.quota, settings.trusted_networks, redis_pipe, prefix),
        "greylist": lambda: GreylistCheck(settings.greylist, settings.trusted_networks, redis_pipe, prefix, now,
                                          hostname),
    }
    return [factories[name]() for name in settings.checks]


class PolicyDaemon:
    def __init__(self, settings: PolicydSettings, redis_settings: RedisSettings, dns: DnsSettings,
                 decisions: DecisionLog) -> None:
        self.settings = settings
        self.dns = dns
        self.redis = PipelinedRedis(redis_settings, load_scripts(),
                                    on_state=lambda up: metrics.REDIS_UP.set(1 if up else 0))
        checks = build_checks(settings, self.redis, redis_settings.key_prefix, dns)
        self.checks = checks
        self.server = PolicyServer(settings, Pipeline(settings, checks), decisions)
        self._retired: list[Check] = []
        self._retire_timer: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        for check in self.checks:
            check.start()
        self.redis.start()
        await self.redis.wait_connected(self.redis.settings.connect_timeout)
        await self.server.start(self.settings.listen)

    def reload(self) -> None:
        for check in self.checks:
            check.reload()

    def reconfigure(self, config: Config) -> None:
        """SIGHUP with a valid config: build the checks and the pipeline from the new settings and swap
        them in for new requests, keeping Redis and the listeners (``RESTART_KEYS`` arrive unchanged).
        Requests in flight finish with the old checks, which stop once they have had time to answer."""
        settings, dns = config.section("policyd"), config.section("dns")
        if settings == self.settings and dns == self.dns:
            self.reload()  # the same config: re-read the files only
            return
        checks: list[Check] = []
        try:
            checks = build_checks(settings, self.redis, self.redis.settings.key_prefix, dns)
            pipeline = Pipeline(settings, checks)
            for check in checks:
                check.start()
        except Exception as exc:
            for check in checks:
                check.stop()
            log_kv(log, logging.ERROR, "SIGHUP: new policyd settings not applied; keeping those in use",
                   error=f"{type(exc).__name__}: {exc}")
            log.debug("reconfigure failed", exc_info=True)
            return
        self._retire(self.checks, grace=max(self.settings.answer_within, settings.answer_within) + 1)
        self.settings, self.dns, self.checks = settings, dns, checks
        self.server.swap(settings, pipeline)
        log_kv(log, logging.INFO, "SIGHUP: policyd settings applied", checks=",".join(settings.checks))

    def _retire(self, checks: list[Check], grace: float) -> None:
        self._retired += checks
        if self._retire_timer is not None:
            self._retire_timer.cancel()  # the newest retired checks get their full grace too
        self._retire_timer = asyncio.get_running_loop().call_later(grace, self._stop_retired)

    def _stop_retired(self) -> None:
        self._retire_timer = None
        retired, self._retired = self._retired, []
        for check in retired:
            check.stop()

    async def stop(self) -> None:
        await self.server.stop(drain_seconds=self.settings.answer_within + 1)
        if self._retire_timer is not None:
            self._retire_timer.cancel()
        self._stop_retired()
        for check in self.checks:
            check.stop()
        await self.redis.close()


def make_service(config: Config, decisions: DecisionLog) -> PolicyDaemon:
    require_descriptors(config.section("policyd").max_connections)
    return PolicyDaemon(config.section("policyd"), config.section("redis"), config.section("dns"), decisions)
