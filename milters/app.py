"""Assembling one milter process from the config: its checks, in its order, the quarantine store and the
recipients' mailboxes."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mailwarden.config import Config
from mailwarden.logs import DecisionLog
from milters.banned import BannedCheck
from milters.base import MilterApp
from milters.check import MessageCheck
from milters.clamav import ClamavCheck
from milters.holding import StoreHolder
from milters.mailbox import MailboxResolver
from milters.spamassassin import SpamAssassinCheck
from quarantine.preferences import SpamPreferences


@dataclass(frozen=True)
class Shared:
    """What a process's checks may share: the ``[milters]`` section, the store, the mailbox resolver, and the
    whole config and decision log (the phish check builds phishhook's detector from them)."""

    section: Any
    holder: StoreHolder
    mailboxes: MailboxResolver
    config: Config
    decisions: DecisionLog


def _spamassassin(shared: Shared) -> SpamAssassinCheck:
    settings = shared.section.spamassassin
    preferences = SpamPreferences(shared.holder.store, cache_ttl=settings.preferences_cache)
    return SpamAssassinCheck(settings, shared.mailboxes, preferences)


def _phish(shared: Shared) -> MessageCheck:
    from milters.phish import PhishCheck
    from phishhook.app import build_detector

    return PhishCheck(build_detector(shared.config, shared.decisions), shared.section.phish)


CHECKS: dict[str, Callable[[Shared], MessageCheck]] = {
    "banned": lambda shared: BannedCheck(shared.section.banned),
    "clamav": lambda shared: ClamavCheck(shared.section.clamav),
    "spamassassin": _spamassassin,
    "phish": _phish,
}
"""Every check a milter's ``checks`` may name."""

MILTERS = ("clamav", "phish", "spamassassin")
"""The milter processes there are (``mailwarden milter NAME``), each with its ``[milters.NAME]`` section."""


def build_app(config: Config, name: str, decisions: DecisionLog) -> MilterApp:
    section = config.section("milters")
    settings = getattr(section, name)
    holder = StoreHolder.open(config.section("quarantine"))
    recipients = config.section("policyd").recipients
    shared = Shared(section, holder, MailboxResolver(recipients, recipients.cache_ttl), config, decisions)
    checks = [CHECKS[check](shared) for check in settings.checks]
    return MilterApp(name=name, checks=checks, decisions=decisions, holder=holder,
                     spool_memory=section.spool_memory, mailboxes=shared.mailboxes)
