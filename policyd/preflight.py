"""What policyd would refuse or misread at start-up beyond what the settings schema sees: the files it
reads, and a check order that defeats itself. ``mailwarden config check`` (the unit's ExecStartPre) and
start-up both call ``preflight``, so the two never disagree.

Files, by what start-up does when one is missing or unreadable:

=========================================  =============================================================
key                                        at start-up
=========================================  =============================================================
policyd.access.files                       refused (read and validated: the rules must be usable)
policyd.greylist.whitelist_clients         refused (read and parsed)
policyd.greylist.whitelist_recipients      refused (read and parsed)
policyd.greylist.managed_whitelist         read only when it exists; refused when it exists but is
                                           unreadable or broken (``greylist whitelist-update`` writes it)
policyd.recipients.file.paths              refused (read at once; a lookup could only fail later)
policyd.quota.file                         tolerated, a warning: read at each recipient, and until it
                                           exists the quota check fails (the quota fail mode answers)
policyd.ratelimit.overrides_file           tolerated, a warning: read when it appears; until then only
                                           the overrides in the config apply
=========================================  =============================================================

Only the files of the checks in ``policyd.checks`` are looked at (the others are never read).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import get_args

from mailwarden.config import ConfigError, Loc, Problem
from policyd.access import load_rules
from policyd.settings import PolicydSettings
from policyd.settings_types import CheckName
from policyd.whitelist import ClientWhitelist, RecipientWhitelist

ORDER: tuple[tuple[str, str, str], ...] = (
    ("recipients", "greylist", "mail for unknown recipients is greylisted (and its triplets kept) instead of "
                               "refused at once"),
    ("recipients", "quota", "quota needs the mailbox that recipients finds for an alias; it asks about the "
                            "address as given"),
    ("dnsbl", "greylist", "greylist reads the DNSBL score that dnsbl sets (skip_dnswl, only_suspicious)"),
    ("spf", "greylist", "greylist reads the SPF result that spf sets (skip_spf_domains, spf_domain_triplets)"),
)
"""(first, then, why): ``then`` running before ``first`` defeats part of what the site configured. Every
check also belongs after access, whose skip and permit rules cannot spare a check that has already run."""


def preflight(settings: PolicydSettings) -> list[Problem]:
    return check_files(settings) + order_warnings(settings)


def order_warnings(settings: PolicydSettings) -> list[Problem]:
    """A warning for each pair of checks in an order that defeats itself."""
    position = {name: index for index, name in enumerate(settings.checks)}
    pairs = [("access", name, "access rules (skip, permit) cannot spare a check that has already run")
             for name in settings.checks if name != "access"]
    found = []
    for first, then, why in [*pairs, *ORDER]:
        if first in position and then in position and position[then] < position[first]:
            found.append(Problem(("policyd", "checks"), f"{then} runs before {first}: {why}; put {first} first",
                                 warning=True))
    return found


def check_files(settings: PolicydSettings) -> list[Problem]:
    """An error for each file that start-up would refuse (missing, unreadable, broken), a warning for each
    one it tolerates but cannot use yet."""
    checks = set(settings.checks)
    problems: list[Problem] = []
    if "access" in checks:
        known = set(get_args(CheckName))
        for index, path in enumerate(settings.access.files):
            problems += _read(("policyd", "access", "files", index), path, lambda p: load_rules(p, known),
                              content_is_report=True)
    if "greylist" in checks:
        greylist = settings.greylist
        for index, path in enumerate(greylist.whitelist_clients):
            problems += _read(("policyd", "greylist", "whitelist_clients", index), path,
                              lambda p: ClientWhitelist.load([p]))
        for index, path in enumerate(greylist.whitelist_recipients):
            problems += _read(("policyd", "greylist", "whitelist_recipients", index), path,
                              lambda p: RecipientWhitelist.load([p]))
        if greylist.managed_whitelist.exists():
            problems += _read(("policyd", "greylist", "managed_whitelist"), greylist.managed_whitelist,
                              lambda p: ClientWhitelist.load([p]))
    if "recipients" in checks and "file" in settings.recipients.sources:
        for index, path in enumerate(settings.recipients.file.paths):
            problems += _read(("policyd", "recipients", "file", "paths", index), path)
    if "quota" in checks and "file" in settings.quota.sources and settings.quota.file is not None:
        problems += _tolerated(("policyd", "quota", "file"), settings.quota.file,
                               "until it exists, the quota check fails and the fail mode for quota answers")
    if "ratelimit" in checks and settings.ratelimit.overrides_file is not None:
        problems += _tolerated(("policyd", "ratelimit", "overrides_file"), settings.ratelimit.overrides_file,
                               "read when it appears; until then only the overrides in the config apply")
    return problems


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be read, or None."""
    if not path.exists():
        return f"{path}: no such file"
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as exc:
        return f"{path}: cannot read: {exc.strerror}"
    return None


def _read(key: Loc, path: Path, parse: Callable[[Path], object] | None = None,
          content_is_report: bool = False) -> Iterable[Problem]:
    if (why := _unreadable(path)) is not None:
        return [Problem(key, why)]
    if parse is not None:
        try:
            parse(path)
        except ConfigError as exc:
            # a rules file's own report names that file and the rule; a whitelist's names file and line
            return [Problem((), str(exc)) if content_is_report else Problem(key, str(exc))]
    return []


def _tolerated(key: Loc, path: Path, consequence: str) -> list[Problem]:
    why = _unreadable(path)
    return [] if why is None else [Problem(key, f"{why}; {consequence}", warning=True)]
