"""Assembling one milter process from the config: its checks, in its order, and the quarantine store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailwarden.config import Config
from mailwarden.logs import DecisionLog
from milters.banned import BannedCheck
from milters.base import MilterApp
from milters.check import MessageCheck
from milters.clamav import ClamavCheck
from milters.holding import StoreHolder
from milters.mailbox import MailboxResolver

CHECKS: dict[str, Callable[[Any], MessageCheck]] = {
    "banned": lambda section: BannedCheck(section.banned),
    "clamav": lambda section: ClamavCheck(section.clamav),
}
"""Every check a milter's ``checks`` may name, built from the ``[milters]`` section."""

MILTERS = ("clamav",)
"""The milter processes there are (``mailwarden milter NAME``), each with its ``[milters.NAME]`` section."""


def build_app(config: Config, name: str, decisions: DecisionLog) -> MilterApp:
    section = config.section("milters")
    settings = getattr(section, name)
    checks = [CHECKS[check](section) for check in settings.checks]
    holder = StoreHolder.open(config.section("quarantine"))
    recipients = config.section("policyd").recipients
    return MilterApp(name=name, checks=checks, decisions=decisions, holder=holder,
                     spool_memory=section.spool_memory,
                     mailboxes=MailboxResolver(recipients, recipients.cache_ttl))
