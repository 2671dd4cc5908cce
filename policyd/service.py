"""Assembles the policy daemon from its settings: Redis, the checks in order, the pipeline, the server."""

from __future__ import annotations

import concurrent.futures
import socket
import time
from collections.abc import Callable
from importlib import resources
from typing import get_args

from mailwarden.config import Config
from mailwarden.dns import DnsSettings
from mailwarden.logs import DecisionLog
from mailwarden.redis_pipe import PipelinedRedis, Script
from mailwarden.redis_settings import RedisSettings
from policyd import metrics
from policyd.access import AccessCheck
from policyd.blocklist import BlocklistCheck
from policyd.check import Check, Pipeline
from policyd.directory import LdapSource
from policyd.dnsbl import DnsblCheck
from policyd.greylist import GreylistCheck
from policyd.notify import LimitNotifier
from policyd.quota import QuotaCheck
from policyd.ratelimit import RateLimitCheck
from policyd.recipients import RecipientCheck
from policyd.server import PolicyServer
from policyd.settings import CheckName, PolicydSettings
from policyd.spf import SpfCheck


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
        self.redis = PipelinedRedis(redis_settings, load_scripts(),
                                    on_state=lambda up: metrics.REDIS_UP.set(1 if up else 0))
        checks = build_checks(settings, self.redis, redis_settings.key_prefix, dns)
        self.checks = checks
        self.server = PolicyServer(settings, Pipeline(settings, checks), decisions)

    async def start(self) -> None:
        for check in self.checks:
            check.start()
        self.redis.start()
        await self.redis.wait_connected(self.redis.settings.connect_timeout)
        await self.server.start(self.settings.listen)

    def reload(self) -> None:
        for check in self.checks:
            check.reload()

    async def stop(self) -> None:
        await self.server.stop(drain_seconds=self.settings.answer_within + 1)
        for check in self.checks:
            check.stop()
        await self.redis.close()


def make_service(config: Config, decisions: DecisionLog) -> PolicyDaemon:
    return PolicyDaemon(config.section("policyd"), config.section("redis"), config.section("dns"), decisions)
