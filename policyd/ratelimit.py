"""Rate limits: any number of limits, each counting messages or recipients per key over a sliding window.

All limits that apply to one request are checked, and counted only if every one has room, in a single
atomic script (scripts/ratelimit.lua), so two policyd processes on one Redis count as one. A message is
counted once, at its first recipient, not once per recipient (or, with ``stage = "end-of-message"``, at
END-OF-MESSAGE with ``recipient_count``). Each refusal is logged, counted and added to the
``ev:ratelimit`` stream for the phish detector.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from mailwarden.backend import BackendError
from mailwarden.decision import Action
from mailwarden.directory import LdapSource
from mailwarden.filewatch import FileWatch
from mailwarden.logs import get_logger, log_kv
from mailwarden.redis_guard import unguarded
from mailwarden.redis_pipe import PipelinedRedis
from mailwarden.section import Section
from mailwarden.units import Duration, format_duration, parse_duration
from policyd import keys, metrics
from policyd.check import Check
from policyd.notify import LimitNotifier, NotifySettings
from policyd.request import PolicyRequest
from policyd.settings_types import check_template
from policyd.verdict import Verdict, defer, hold, reject


def _parse_window(value: object) -> float | str:
    if value == "message":
        return "message"
    try:
        return parse_duration(value)
    except ValueError:
        raise ValueError(f"{value!r} is neither a duration ('1h', '1d', 3600) nor \"message\"") from None


RateKey = Literal["sasl_user", "sender", "sender_domain", "client_address", "global"]


class RateLimit(Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    """Shown in the log, the metrics and the reply text; also part of the Redis key."""
    key: RateKey
    """What is counted against: the SASL user (the safe default for outbound), the envelope sender or its
    domain (forgeable: an outsider can exhaust a victim's limit), the client address (network prefix
    from client_prefix_v4/v6), or ``global``: one counter for all matching clients, a server-wide brake."""
    count: Literal["messages", "recipients"] = "messages"
    max: Annotated[int, Field(ge=1)]
    window: Annotated[float | Literal["message"], BeforeValidator(_parse_window)]
    """A sliding window in time ("1h", "1d"), or "message" for a cap on recipients of one message."""
    action: Literal["defer", "reject", "hold"] = "defer"
    """``hold``: Postfix accepts the message into its hold queue (nothing lost, nothing sent) for the
    postmaster to release (postsuper -H) or delete."""
    stage: Literal["rcpt", "end-of-message"] = "rcpt"
    """``rcpt``: counted at RCPT (a message once, at its first recipient). ``end-of-message``: checked at
    RCPT, counted at END-OF-MESSAGE with recipient_count, so only mail that was accepted counts (needs
    check_policy_service in smtpd_end_of_data_restrictions too)."""
    applies_to: Literal["authenticated", "unauthenticated", "all"] | None = None
    """Which clients the limit applies to; by default authenticated clients for key=sasl_user, all others."""

    @model_validator(mode="after")
    def _consistent(self) -> RateLimit:
        if self.window == "message" and self.count != "recipients":
            raise ValueError('window = "message" only makes sense with count = "recipients"')
        if self.window == "message" and self.stage != "rcpt":
            raise ValueError('window = "message" is enforced at RCPT; set stage = "rcpt"')
        if isinstance(self.window, float) and self.window < 1:
            raise ValueError("window must be at least 1s")
        return self

    @property
    def clients(self) -> str:
        return self.applies_to or ("authenticated" if self.key in ("sasl_user", "global") else "all")


def _default_limits() -> list[RateLimit]:
    return [
        RateLimit(name="user-messages-per-hour", key="sasl_user", count="messages", max=200, window=3600),
        RateLimit(name="user-recipients-per-day", key="sasl_user", count="recipients", max=1000, window=86400),
    ]


class RateOverride(Section):
    """A per-key exception: the newsletter account, a mailing-list server."""

    limit: str
    key: str
    """The key value as counted: a SASL user name, an address, a domain or a client network."""
    max: Annotated[int, Field(ge=1)] | None = None
    exempt: bool = False

    @model_validator(mode="after")
    def _one(self) -> RateOverride:
        if self.exempt == (self.max is not None):
            raise ValueError("give either max = N or exempt = true")
        return self


class RateLimitSettings(Section):
    limits: list[RateLimit] = Field(default_factory=_default_limits)
    notify: NotifySettings = Field(default_factory=NotifySettings)
    overrides: list[RateOverride] = []
    ldap_attribute: str | None = None
    """An attribute of the user's directory entry (found with ldap_filter through [policyd.recipients.ldap])
    holding overrides for limits keyed by sasl_user: "exempt", a number (every such limit), or
    "LIMIT=N" / "LIMIT=exempt" (one limit); multi-valued."""
    ldap_filter: str = "(|(uid=%u)(mail=%s))"
    """%s is the SASL user name, %u its local part (the whole name when it has no @)."""
    ldap_cache_ttl: Duration = 300
    overrides_file: Path | None = None
    """More overrides, one per line: ``LIMIT KEY MAX`` or ``LIMIT KEY exempt`` (# comments); re-read when
    it changes. The config's own overrides win over the file's."""
    client_prefix_v4: Annotated[int, Field(ge=8, le=32)] = 32
    client_prefix_v6: Annotated[int, Field(ge=16, le=128)] = 64
    defer_text: str = "Sending limit reached; please try again later or contact the help desk"
    """What the client is told; by default no limit name or number (those are in the log line).
    Placeholders: {name}, {max}, {count}, {window}."""
    reject_text: str = "Sending limit reached; please contact the help desk"
    hold_text: str = "held: sending limit reached"
    """Logged by Postfix with the held message (the client is told nothing: the message is accepted)."""

    @field_validator("defer_text", "reject_text", "hold_text")
    @classmethod
    def _texts(cls, text: str) -> str:
        return check_template(text, {"name", "max", "count", "window"})

    @field_validator("limits")
    @classmethod
    def _unique(cls, limits: list[RateLimit]) -> list[RateLimit]:
        names = [limit.name for limit in limits]
        if len(names) != len(set(names)):
            raise ValueError("limit names must be unique")
        return limits

    @model_validator(mode="after")
    def _overrides_name_limits(self) -> RateLimitSettings:
        names = {limit.name for limit in self.limits}
        for override in self.overrides:
            if override.limit not in names:
                raise ValueError(f"override for unknown limit {override.limit!r}; limits: {', '.join(sorted(names))}")
        return self


log = get_logger("policyd.ratelimit")


@dataclass(frozen=True, slots=True)
class _Use:
    limit: RateLimit
    key_value: str
    amount: int
    commit: bool


class RateLimitCheck(Check):
    name = "ratelimit"
    carries_reads = True

    def __init__(self, settings: RateLimitSettings, redis_pipe: PipelinedRedis, prefix: str,
                 now: Callable[[], float], notifier: LimitNotifier | None = None,
                 directory: LdapSource | None = None) -> None:
        self.settings = settings
        self.notifier = notifier
        self.directory = directory if settings.ldap_attribute else None
        self._ldap_cache: dict[str, tuple[float, dict[str, RateOverride]]] = {}
        self.redis = redis_pipe
        self.prefix = prefix
        self.now = now
        self.per_message = [limit for limit in settings.limits if limit.window == "message"]
        self.windowed = [limit for limit in settings.limits if limit.window != "message"]
        self._limits_for = {authenticated: any(_applies_to(limit, authenticated) for limit in settings.limits)
                            for authenticated in (False, True)}
        """Whether any limit applies to authenticated (True) and to other clients (False): with the default
        limits (per SASL user) inbound mail leaves at once."""
        self.configured = {(o.limit, o.key.lower()): o for o in settings.overrides}
        self.overrides = dict(self.configured)
        self._file_watch = FileWatch([settings.overrides_file] if settings.overrides_file is not None else [])
        self._file_checked = 0.0
        self._read_overrides_file()

    async def on_rcpt(self, request: PolicyRequest) -> Verdict | None:
        if not self._limits_for[request.authenticated]:
            return None
        for limit in self.per_message:
            if not _applies(limit, request) or (key_value := self.key_value(limit, request)) is None:
                continue
            cap = self.configured_max(limit, key_value, request.transaction.ratelimit_user_overrides)
            if cap is not None and request.rcpt_number > cap:
                return self._refuse(limit, f"{request.rcpt_number} recipients in one message")
        await self._load_user_overrides(request)
        counted = request.transaction.ratelimit_counted
        uses = []
        for limit in self.windowed:
            if not _applies(limit, request) or (key_value := self.key_value(limit, request)) is None:
                continue
            if limit.stage == "end-of-message":
                uses.append(_Use(limit, key_value, 1, commit=False))
            elif limit.count == "recipients":
                uses.append(_Use(limit, key_value, 1, commit=True))
            else:
                uses.append(_Use(limit, key_value, 0 if counted else 1, commit=not counted))
        verdict = await self._run(uses, request)
        if verdict is None and any(use.commit and use.limit.count == "messages" for use in uses):
            request.transaction.ratelimit_counted = True
        return verdict

    async def on_eom(self, request: PolicyRequest) -> Verdict | None:
        await self._load_user_overrides(request)
        uses = []
        for limit in self.windowed:
            if limit.stage != "end-of-message" or not _applies(limit, request):
                continue
            if (key_value := self.key_value(limit, request)) is None:
                continue
            amount = 1 if limit.count == "messages" else max(request.recipient_count, 1)
            uses.append(_Use(limit, key_value, amount, commit=True))
        return await self._run(uses, request)

    async def _run(self, uses: list[_Use], request: PolicyRequest) -> Verdict | None:
        if not uses:
            return None
        extra = request.transaction.ratelimit_user_overrides or {}
        uses = [use for use in uses if self.configured_max(use.limit, use.key_value, extra) is not None]
        if not uses:
            return None
        script_keys = [keys.ratelimit_bucket(self.prefix, use.limit.name, use.key_value) for use in uses]
        script_keys += [keys.ratelimit_override(self.prefix, use.limit.name, use.key_value) for use in uses]
        script_keys += [keys.ratelimit_notified(self.prefix, use.limit.name, use.key_value) for use in uses]
        script_keys.append(f"{self.prefix}{keys.RATELIMIT_EVENTS}")
        args: list[str | int | float] = [f"{self.now():.3f}", keys.RATELIMIT_EVENTS_MAXLEN]
        for use in uses:
            window = use.limit.window
            assert isinstance(window, float)
            args += [window, self.configured_max(use.limit, use.key_value, extra) or 0, use.amount, int(use.commit),
                     use.limit.name, use.key_value]
        result = unguarded(await self.redis.run_script("ratelimit", script_keys, args, guard=request.take_guard()))
        assert isinstance(result, list)
        position = int(result[0])
        if position == 0:
            return None
        use = uses[position - 1]
        cap = int(float(result[2]))
        if int(result[3]) and self.notifier is not None:
            self.notifier.limit_reached(use.limit, use.key_value, request, cap)
        return self._refuse(use.limit, f"{use.limit.key}={use.key_value} at {int(result[1])} of {cap}")

    def _read_overrides_file(self) -> None:
        """(Re-)read overrides_file when it changed; a bad line is skipped and logged, a missing file is
        logged and leaves the overrides read before."""
        path = self.settings.overrides_file
        if path is None:
            return
        if not self._file_watch.changed():
            return
        overrides = self._file_watch.reread(lambda: self._parse_overrides_file(path), OSError, log,
                                            "rate-limit overrides file unreadable", file=str(path))
        if overrides is None:
            return
        self.overrides = {**overrides, **self.configured}
        log_kv(log, logging.INFO, "rate-limit overrides loaded", file=str(path), overrides=len(overrides))

    def _parse_overrides_file(self, path: Path) -> dict[tuple[str, str], RateOverride]:
        names = {limit.name for limit in self.settings.limits}
        overrides: dict[tuple[str, str], RateOverride] = {}
        for number, raw in enumerate(path.read_text(errors="replace").splitlines(), start=1):
            fields = raw.split("#", 1)[0].split()
            if not fields:
                continue
            try:
                if len(fields) != 3 or fields[0] not in names:
                    raise ValueError("expected LIMIT KEY MAX|exempt with a configured limit")
                exempt = fields[2].lower() == "exempt"
                override = RateOverride(limit=fields[0], key=fields[1], exempt=exempt,
                                        max=None if exempt else int(fields[2]))
            except (ValueError, ValidationError) as exc:
                log_kv(log, logging.WARNING, "rate-limit override line skipped", file=str(path), line=number,
                       error=str(exc).splitlines()[0])
                continue
            overrides[(override.limit, override.key.lower())] = override
        return overrides

    async def _load_user_overrides(self, request: PolicyRequest) -> None:
        """The authenticated user's overrides from the directory attribute, cached; a directory that cannot
        answer means no override (the limits as configured), logged."""
        if (self.directory is None or not request.sasl_username
                or request.transaction.ratelimit_user_overrides is not None):
            return
        user = request.sasl_username.lower()
        now = time.monotonic()
        kept = self._ldap_cache.get(user)
        if kept is not None and kept[0] > now:
            request.transaction.ratelimit_user_overrides = kept[1]
            return
        attribute = self.settings.ldap_attribute
        assert attribute is not None
        try:
            entries = await self.directory.entries_async(user, self.settings.ldap_filter, [attribute])
        except BackendError as exc:
            log_kv(log, logging.WARNING, "rate-limit overrides from LDAP unavailable; limits as configured",
                   user=user, error=str(exc))
            request.transaction.ratelimit_user_overrides = {}
            return
        found = self._parse_ldap_values(user, [value for entry in entries
                                               for value in _values(entry.get(attribute))])
        if len(self._ldap_cache) > 50_000:
            self._ldap_cache.clear()
        self._ldap_cache[user] = (now + self.settings.ldap_cache_ttl, found)
        request.transaction.ratelimit_user_overrides = found

    def _parse_ldap_values(self, user: str, values: list[str]) -> dict[str, RateOverride]:
        found: dict[str, RateOverride] = {}
        user_limits = [limit.name for limit in self.settings.limits if limit.key == "sasl_user"]
        for value in values:
            name, eq, amount = value.strip().partition("=")
            targets = [name] if eq else user_limits
            amount = amount if eq else name
            for target in targets:
                if target not in user_limits:
                    continue
                try:
                    exempt = amount.strip().lower() == "exempt"
                    found[target] = RateOverride(limit=target, key=user, exempt=exempt,
                                                 max=None if exempt else int(amount))
                except (ValueError, ValidationError):
                    log_kv(log, logging.WARNING, "rate-limit override in LDAP not understood", user=user,
                           value=value)
        return found

    def configured_max(self, limit: RateLimit, key_value: str,
                       user_overrides: dict[str, RateOverride] | None = None) -> int | None:
        """The limit's max for this key after the config's (and the overrides file's) overrides; None when
        the key is exempt. (Overrides set with the CLI live in Redis and are applied inside the script.)"""
        now = time.monotonic()
        if self.settings.overrides_file is not None and now - self._file_checked > 5:
            self._file_checked = now
            self._read_overrides_file()
        override = self.configured.get((limit.name, key_value))
        if override is None and user_overrides and limit.key == "sasl_user":
            override = user_overrides.get(limit.name)
        if override is None:
            override = self.overrides.get((limit.name, key_value))
        if override is None:
            return limit.max
        return None if override.exempt else override.max

    def _refuse(self, limit: RateLimit, detail: str) -> Verdict:
        metrics.RATELIMIT_HITS.labels(limit.name).inc()
        window = "message" if limit.window == "message" else format_duration(float(limit.window))
        fields = {"name": limit.name, "max": limit.max, "count": limit.count, "window": window}
        reason = f"rate limit {limit.name} reached: {detail}"
        if limit.action == "reject":
            return Verdict.refuse(Action.REJECT, reason, reject(self.settings.reject_text.format(**fields)))
        if limit.action == "hold":
            # Postfix takes the message into its hold queue: nothing lost, nothing sent, the postmaster decides
            return Verdict.refuse(Action.HOLD, reason, hold(self.settings.hold_text.format(**fields)))
        return Verdict.refuse(Action.DEFER, reason, defer(self.settings.defer_text.format(**fields)))

    def key_value(self, limit: RateLimit, request: PolicyRequest) -> str | None:
        """What this request is counted against, or None when the request has no such key."""
        if limit.key == "sasl_user":
            return request.sasl_username.lower() or None
        if limit.key == "sender":
            return request.sender.lower() or None
        if limit.key == "sender_domain":
            return request.sender.rpartition("@")[2].lower() or None
        if limit.key == "global":
            return "*"
        if request.client_ip is None:
            return None
        prefix = self.settings.client_prefix_v4 if request.client_ip.version == 4 else self.settings.client_prefix_v6
        return str(ipaddress.ip_network(f"{request.client_ip}/{prefix}", strict=False))


def _values(raw: object) -> list[str]:
    if raw is None:
        return []
    if isinstance(raw, list):
        return [str(v) for v in raw]
    return [str(raw)]


def _applies(limit: RateLimit, request: PolicyRequest) -> bool:
    return _applies_to(limit, request.authenticated)


def _applies_to(limit: RateLimit, authenticated: bool) -> bool:
    clients = limit.clients
    return clients == "all" or authenticated == (clients == "authenticated")
