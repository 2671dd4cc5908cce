"""Access rules: the site's own per-network and per-address policy, evaluated before any other check.

A rules file (TOML) is a list of ``[[rule]]`` tables. A rule matches when every condition it names
matches (a condition with several patterns matches when any of them does). Rules are tried in order:
``skip`` rules add the checks they name to the request's skip set and evaluation goes on; the first
``permit``, ``reject`` or ``defer`` rule ends it. ``permit`` skips every remaining check and answers
DUNNO, so Postfix's own restrictions (reject_unauth_destination ...) still apply: a rule can never make
an open relay.

The file is re-read on SIGHUP and when it changes on disk. A file that does not parse or validate keeps
the rules in use, and the log line says which file, rule (by its name) and key is wrong.

    [[rule]]
    name = "campus"                         # shown in the log line
    client = ["137.143.0.0/16", "2001:db8:17::/48"]
    action = "skip"
    skip = ["dnsbl", "greylist"]

    [[rule]]
    name = "known-spammer"
    client_name = ["*.spam.example", "/^dyn-\\d+\\.isp\\.example$/"]
    action = "reject"
    text = "Mail from your host is refused; contact postmaster@example.org"
"""

from __future__ import annotations

import asyncio
import logging
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from mailwarden.config import ConfigError, Loc, dotted, format_errors
from mailwarden.decision import Action
from mailwarden.filewatch import FileWatch
from mailwarden.logs import get_logger, log_kv
from mailwarden.rules_files import shipped_rules_file
from mailwarden.section import Section
from mailwarden.units import Duration
from policyd.check import ALL_CHECKS, Check
from policyd.request import PolicyRequest
from policyd.settings_types import CheckName, IPNetwork, Network
from policyd.verdict import DEFER_POLICY, REJECT_POLICY, Verdict, defer, reject


class AccessSettings(Section):
    """The site's access rules (see rules/access.toml for the format)."""

    files: list[Path] = Field(default_factory=lambda: [shipped_rules_file("access.toml")])
    """Rules files, read in order; their rules are tried in that order."""
    check_interval: Duration = 5
    """How often the files are checked for changes (they are also re-read on SIGHUP)."""


log = get_logger("policyd.access")


class AccessRule(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    client: list[Network] = []
    """Client address in any of these networks (a bare address is a /32 or /128)."""
    client_name: list[str] = []
    """Verified client hostname: ``host.example``, ``*.example`` (subdomains), or ``/regex/``."""
    helo: list[str] = []
    """HELO/EHLO name, same patterns as client_name."""
    sender: list[str] = []
    """Envelope sender: ``user@domain``, ``@domain`` (and subdomains with ``@.domain``), ``user@``,
    ``<>`` (the null sender) or ``/regex/``."""
    recipient: list[str] = []
    sasl_user: list[str] = []
    """SASL user name (exact, case-insensitive) or ``/regex/``."""
    authenticated: bool | None = None
    """true: only authenticated clients; false: only unauthenticated ones."""
    action: Literal["permit", "reject", "defer", "skip"]
    skip: list[CheckName] = []
    """With action = "skip": the checks to leave out (e.g. ["dnsbl", "greylist"]); only names of checks."""
    text: str | None = None
    """Reply text for reject/defer; default "Access denied" / "Try again later"."""
    code: Annotated[str, Field(pattern=r"^[45]\d\d [45]\.\d{1,3}\.\d{1,3}$")] | None = None
    """Reply code and enhanced status, e.g. "554 5.7.1"; default 550 5.7.1 / 450 4.7.1."""

    @field_validator("client_name", "helo", "sender", "recipient", "sasl_user")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if len(pattern) > 1 and pattern.startswith("/") and pattern.endswith("/"):
                try:
                    re.compile(pattern[1:-1])
                except re.error as exc:
                    raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
            elif not pattern:
                raise ValueError("an empty pattern matches nothing; remove it")
        return patterns

    @model_validator(mode="after")
    def _consistent(self) -> AccessRule:
        if self.action == "skip" and not self.skip:
            raise ValueError('action = "skip" needs skip = ["check", ...]')
        if self.action != "skip" and self.skip:
            raise ValueError('skip = [...] only goes with action = "skip"')
        if self.text and ("\n" in self.text or "\r" in self.text):
            raise ValueError("text must be one line")
        if self.code and self.action not in ("reject", "defer"):
            raise ValueError("code only goes with reject or defer")
        if self.code and self.code[0] != ("5" if self.action == "reject" else "4"):
            raise ValueError(f"code {self.code!r} does not fit action {self.action!r}")
        return self


class AccessRulesFile(Section):
    rule: list[AccessRule] = []


def _name_matcher(patterns: list[str]) -> re.Pattern[str] | None:
    """One compiled regex for all hostname patterns of a condition."""
    parts = []
    for pattern in patterns:
        if len(pattern) > 1 and pattern.startswith("/") and pattern.endswith("/"):
            parts.append(f"(?:{pattern[1:-1]})")
        elif pattern.startswith("*."):
            parts.append(rf"(?:^(?:.+\.)?{re.escape(pattern[2:].lower())}$)")
        else:
            parts.append(rf"(?:^{re.escape(pattern.lower().rstrip('.'))}$)")
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


def _address_matcher(patterns: list[str]) -> re.Pattern[str] | None:
    parts = []
    for pattern in patterns:
        if len(pattern) > 1 and pattern.startswith("/") and pattern.endswith("/"):
            parts.append(f"(?:{pattern[1:-1]})")
        elif pattern == "<>":
            parts.append("(?:^$)")
        elif pattern.startswith("@."):
            parts.append(rf"(?:@(?:.+\.)?{re.escape(pattern[2:])}$)")
        elif pattern.startswith("@"):
            parts.append(rf"(?:@{re.escape(pattern[1:])}$)")
        elif pattern.endswith("@"):
            parts.append(rf"(?:^{re.escape(pattern[:-1])}(?:\+[^@]*)?@)")
        else:
            parts.append(rf"(?:^{re.escape(pattern)}$)")
    return re.compile("|".join(parts), re.IGNORECASE) if parts else None


@dataclass(frozen=True)
class CompiledRule:
    rule: AccessRule
    networks: tuple[IPNetwork, ...]
    client_name: re.Pattern[str] | None
    helo: re.Pattern[str] | None
    sender: re.Pattern[str] | None
    recipient: re.Pattern[str] | None
    sasl_user: re.Pattern[str] | None

    @classmethod
    def build(cls, rule: AccessRule) -> CompiledRule:
        users = [p if p.startswith("/") and p.endswith("/") and len(p) > 1 else f"/^{re.escape(p)}$/"
                 for p in rule.sasl_user]
        return cls(rule, tuple(rule.client), _name_matcher(rule.client_name), _name_matcher(rule.helo),
                   _address_matcher(rule.sender), _address_matcher(rule.recipient), _address_matcher(users))

    def matches(self, request: PolicyRequest) -> bool:
        rule = self.rule
        if rule.authenticated is not None and request.authenticated != rule.authenticated:
            return False
        if self.networks:
            ip = request.client_ip
            if ip is None or not any(ip.version == net.version and ip in net for net in self.networks):
                return False
        if self.client_name and not self.client_name.search(request.client_name.rstrip(".")):
            return False
        if self.helo and not self.helo.search(request.helo_name.rstrip(".")):
            return False
        if self.sender and not self.sender.search(request.sender):
            return False
        if self.recipient and not self.recipient.search(request.recipient):
            return False
        return not (self.sasl_user and not self.sasl_user.search(request.sasl_username))


def load_rules(path: Path, known_checks: set[str]) -> list[CompiledRule]:
    """Read and validate a rules file; raises ConfigError naming the file, the rule and the key."""
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        parsed = AccessRulesFile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_errors(str(path), exc, AccessRulesFile,
                                        key_of=lambda loc: rule_key(data, loc))) from None
    for rule in parsed.rule:
        unknown = set(rule.skip) - known_checks
        if unknown:
            raise ConfigError(f'{path}: rule "{rule.name}": skip names unknown check(s) '
                              f"{', '.join(sorted(unknown))}; known: {', '.join(sorted(known_checks))}")
    return [CompiledRule.build(rule) for rule in parsed.rule]


def rule_key(data: Any, loc: Loc) -> str:
    """A key in a rules file with the rule named as the file names it: ``rule "campus".client.0``
    (``rule.3`` only for a rule without a usable name)."""
    if len(loc) >= 2 and loc[0] == "rule" and isinstance(loc[1], int):
        rules = data.get("rule") if isinstance(data, dict) else None
        entry = rules[loc[1]] if isinstance(rules, list) and loc[1] < len(rules) else None
        name = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(name, str) and name:
            return dotted((f'rule "{name}"', *loc[2:]))
    return dotted(loc)


class AccessCheck(Check):
    name = "access"
    dependency = None

    def __init__(self, files: list[Path], known_checks: set[str], check_interval: float) -> None:
        self.files = files
        self.known_checks = known_checks
        self.check_interval = check_interval
        self.watch = FileWatch(files)
        self.rules = self.watch.read(self._load_all)
        self._watcher: asyncio.TimerHandle | None = None

    def _load_all(self) -> list[CompiledRule]:
        rules: list[CompiledRule] = []
        for path in self.files:
            rules += load_rules(path, self.known_checks)
        log_kv(log, logging.INFO, "access rules loaded", files=",".join(map(str, self.files)), rules=len(rules))
        return rules

    def reload(self) -> None:
        """SIGHUP, or a changed file: a broken file keeps the rules in use, and the log says where."""
        rules = self.watch.reread(self._load_all, ConfigError, log,
                                  "access rules not reloaded; keeping the rules in use")
        if rules is not None:
            self.rules = rules

    def poll(self) -> bool:
        """Re-read the files if one changed on disk; True if they had."""
        if not self.watch.changed():
            return False
        self.reload()
        return True

    def start(self) -> None:
        """Watch the files from the event loop (a stat every check_interval, off the request path)."""
        loop = asyncio.get_running_loop()

        def tick() -> None:
            self.poll()
            self._watcher = loop.call_later(self.check_interval, tick)

        self._watcher = loop.call_later(self.check_interval, tick)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()

    async def on_rcpt(self, request: PolicyRequest) -> Verdict | None:
        return self.evaluate(request)

    on_eom = on_rcpt

    def evaluate(self, request: PolicyRequest) -> Verdict | None:
        skipped: list[str] = []
        for compiled in self.rules:
            if not compiled.matches(request):
                continue
            rule = compiled.rule
            if rule.action == "skip":
                request.skip.update(rule.skip)
                skipped.append(rule.name)
                continue
            if rule.action == "permit":
                request.skip.add(ALL_CHECKS)
                return Verdict.accept(f"access rule {rule.name}: permit")
            if rule.action == "reject":
                text = rule.text or "Access denied"
                return Verdict.refuse(Action.REJECT, f"access rule {rule.name}: reject",
                                      reject(text, rule.code or REJECT_POLICY))
            text = rule.text or "Try again later"
            return Verdict.refuse(Action.DEFER, f"access rule {rule.name}: defer",
                                  defer(text, rule.code or DEFER_POLICY))
        if skipped:
            return Verdict.accept(f"access rule {','.join(skipped)}: skip {','.join(sorted(request.skip))}")
        return None
