"""Greylisting with Postgrey's semantics, which operators know.

The triplet is (client network, normalised sender, recipient): the client's IPv4 /24 or IPv6 /64 (both
configurable), the sender with VERP/BATV noise removed as postgrey does, and the recipient as given. A
new triplet is deferred for ``delay``; a retry inside the delay is deferred again; a retry after it
passes and the triplet is remembered for ``max_age``; a triplet not retried within ``retry_window``
starts over; a client address that passed ``auto_whitelist_clients`` times is no longer greylisted.
The decision and its bookkeeping are one atomic script (scripts/greylist.lua), so every MX host sharing
the Redis behaves as one. Answers use DEFER_IF_PERMIT so a later hard reject still wins.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import math
import re
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator

from mailwarden.decision import Action
from mailwarden.filewatch import FileWatch
from mailwarden.logs import get_logger, log_kv
from mailwarden.paths import MANAGED_WHITELIST, system_path
from mailwarden.redis_guard import unguarded
from mailwarden.redis_pipe import PipelinedRedis
from mailwarden.rules_files import shipped_rules_file
from mailwarden.section import Section
from mailwarden.units import Duration
from policyd import keys, metrics
from policyd.check import Check
from policyd.optout import OptOutSqlSettings, SqlOptOut
from policyd.request import PolicyRequest
from policyd.results import allow_listing, dnsbl_score, spf_result
from policyd.settings_types import check_template
from policyd.verdict import Verdict, defer_if_permit, prepend
from policyd.whitelist import (
    ClientWhitelist,
    IPNetwork,
    RecipientWhitelist,
    WhitelistError,
    listed_suffix,
    whitelist_date,
)


class GreylistSettings(Section):
    """Greylisting with Postgrey's semantics (delay, retry window, max age, client auto-whitelist)."""

    delay: Duration = 300
    """Seconds a new triplet is deferred for; a retry inside the delay is deferred again."""
    max_age: Duration = 35 * 86400
    """A passed triplet (and an auto-whitelisted client) is forgotten this long after it was last seen."""
    retry_window: Duration = 2 * 86400
    """A triplet that is not retried successfully within this time is forgotten and starts over."""
    auto_whitelist_clients: Annotated[int, Field(ge=0)] = 5
    """A client network that passed greylisting this many times is no longer greylisted; 0 turns it off."""
    ipv4_prefix: Annotated[int, Field(ge=8, le=32)] = 24
    ipv6_prefix: Annotated[int, Field(ge=16, le=128)] = 64
    whitelist_clients: list[Path] = Field(default_factory=lambda: [shipped_rules_file("postgrey_whitelist_clients")])
    """Files in Postgrey's whitelist_clients format: hostnames (and their subdomains), /regex/, IPs, CIDRs."""
    whitelist_recipients: list[Path] = Field(
        default_factory=lambda: [shipped_rules_file("postgrey_whitelist_recipients")]
    )
    """Files in Postgrey's whitelist_recipients format: user@, @domain, user@domain, domain, /regex/."""
    managed_whitelist: Path = Field(default_factory=lambda: system_path(MANAGED_WHITELIST))
    """The client whitelist that ``mailwarden greylist whitelist-update`` writes; read beside
    whitelist_clients when it exists."""
    whitelist_max_age: Duration = 180 * 86400
    """Warn (log and metric) when the client whitelist is older than this: lists of senders that do not
    retry go out of date, and a stale list greylists the mail of senders it was meant to spare."""
    whitelist_check_interval: Duration = 60
    """How often the whitelist files are checked for changes (and the warning repeated, at most daily)."""
    expect_max: Duration = 7 * 86400
    """The longest window ``mailwarden greylist expect --for`` may open; a longer one is refused."""
    greylist_authenticated: bool = False
    """Greylist SASL-authenticated clients too (never sensible for submission; kept for odd set-ups)."""
    add_header: bool = True
    """PREPEND ``X-Greylist: delayed N seconds`` to a message that passed after being delayed."""
    skip_dnswl: bool = True
    """Clients listed on an allow list (a dnsbl list with a negative weight; dnsbl runs first) are not
    greylisted."""
    skip_spf_domains: list[str] = []
    """Senders whose SPF passes for one of these domains (or a subdomain) are not greylisted: banks, the
    university's own partners, whoever sends password resets and one-time codes (spf runs first)."""
    opt_out_sql: OptOutSqlSettings | None = None
    """Recipients who opted out of greylisting, from an SQL table (the file form: whitelist_recipients)."""
    only_suspicious: bool = False
    """Greylist only clients that look suspicious, as large providers do: no verified reverse DNS, a
    hostname that looks dynamic (``dynamic_patterns``), or a DNSBL score above zero (dnsbl runs first)."""
    dynamic_patterns: list[str] = [
        r"(^|[.-])(dyn|dynamic|dhcp|dsl|adsl|vdsl|cable|pool|ppp|pppoe|dialup|dial|client|broadband|"
        r"customer|user|host|ip)[.-]?\d",
        r"\d{1,3}[.-]\d{1,3}[.-]\d{1,3}[.-]\d{1,3}",
    ]
    """Regular expressions (searched, case-insensitive) for hostnames of end-user access networks."""
    spf_domain_triplets: bool = True
    """When SPF passed for the sender's domain (the spf check runs before greylist), the triplet uses that
    domain in place of the client network, so a retry from another host of the sender's pool (Outlook.com,
    Gmail) counts as the same triplet."""
    text: str = "Greylisted, please try again in {retry_in}"
    """The defer text; placeholders: {retry_in} (e.g. "5 minutes"), {seconds}, {recipient_domain}."""

    _text_fields = {"retry_in", "seconds", "recipient_domain"}

    @field_validator("text")
    @classmethod
    def _text(cls, text: str) -> str:
        return check_template(text, cls._text_fields.default)  # type: ignore[attr-defined]

    @field_validator("dynamic_patterns")
    @classmethod
    def _patterns(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
        return patterns

    @model_validator(mode="after")
    def _windows(self) -> GreylistSettings:
        if self.retry_window <= self.delay:
            raise ValueError("retry_window must be longer than delay, or no retry could ever pass")
        if self.max_age < self.retry_window:
            raise ValueError("max_age must be at least retry_window")
        return self


log = get_logger("policyd.greylist")

_BATV_TAG = re.compile(r"^[0-9a-z]{10}")
_NUMBER = re.compile(r"\b\d+\b")


_DIGIT = re.compile(r"\d")


def normalise_sender(sender: str) -> str:
    """Postgrey 1.37's do_sender_substitutions: strip BATV (prvs=tag=user), +extension, numbers -> '#'."""
    user, at, domain = sender.partition("@")
    if not at:
        return sender
    if "+" not in user and not user.startswith("prvs=") and _DIGIT.search(user) is None:
        return sender  # nothing to substitute (most senders): skip the split, the sub and the re-join
    if user.startswith("prvs="):
        parts = user.split("=")
        if len(parts) == 3:
            first_is_tag = bool(_BATV_TAG.match(parts[1]))
            second_is_tag = bool(_BATV_TAG.match(parts[2]))
            user = parts[1] if second_is_tag and not first_is_tag else parts[2]
    user = user.split("+", 1)[0]
    user = _NUMBER.sub("#", user)
    return f"{user}@{domain}"


def client_network(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, ipv4_prefix: int, ipv6_prefix: int) -> str:
    """The client part of the triplet, e.g. ``192.0.2.0/24`` (integer masking: this is on the hot path)."""
    if ip.version == 4:
        masked = int(ip) & (0xFFFFFFFF << (32 - ipv4_prefix))
        return f"{socket.inet_ntop(socket.AF_INET, masked.to_bytes(4, 'big'))}/{ipv4_prefix}"
    masked = int(ip) & (((1 << ipv6_prefix) - 1) << (128 - ipv6_prefix))
    return f"{ipaddress.IPv6Address(masked)}/{ipv6_prefix}"


def human_wait(seconds: float) -> str:
    seconds = max(1, math.ceil(seconds))
    if seconds < 120:
        return f"{seconds} seconds"
    if seconds < 7200:
        return f"{math.ceil(seconds / 60)} minutes"
    return f"{math.ceil(seconds / 3600)} hours"


class GreylistCheck(Check):
    name = "greylist"
    carries_reads = True

    def __init__(self, settings: GreylistSettings, trusted: Sequence[IPNetwork], redis_pipe: PipelinedRedis,
                 prefix: str, now: Callable[[], float], hostname: str) -> None:
        self.settings = settings
        self.trusted = list(trusted)
        self.redis = redis_pipe
        self.prefix = prefix
        self.now = now
        self.hostname = hostname
        self.watch = FileWatch(dict.fromkeys([*settings.whitelist_clients, settings.managed_whitelist,
                                              *settings.whitelist_recipients]))
        self.clients, self.recipients = self.watch.read(self._load_lists)
        self.clients.log_loaded()
        self._warned = float("-inf")
        self.opt_out = SqlOptOut(settings.opt_out_sql) if settings.opt_out_sql is not None else None
        self._watcher: asyncio.TimerHandle | None = None
        self._dynamic = re.compile("|".join(f"(?:{p})" for p in settings.dynamic_patterns) or "(?!)", re.IGNORECASE)
        self._spf_domains = {d.lower().strip(".") for d in settings.skip_spf_domains}
        self._static_args = (settings.delay, settings.retry_window, settings.max_age, settings.auto_whitelist_clients)
        self._trusted = trusted_index(self.trusted)
        self._deferrals: dict[tuple[str, int, str], Verdict] = {}
        self._text_names_domain = "recipient_domain" in settings.text
        self._ipv4_slash24 = settings.ipv4_prefix == 24

    def _client_files(self) -> list[Path]:
        files = list(self.settings.whitelist_clients)
        if self.settings.managed_whitelist.exists() and self.settings.managed_whitelist not in files:
            files.append(self.settings.managed_whitelist)
        return files

    def _load_lists(self) -> tuple[ClientWhitelist, RecipientWhitelist]:
        return ClientWhitelist.load(self._client_files()), RecipientWhitelist.load(self.settings.whitelist_recipients)

    def reload(self) -> None:
        """Re-read the whitelist files (SIGHUP, or a change on disk); a broken file keeps the lists in use
        and the log says where it broke."""
        loaded = self.watch.reread(self._load_lists, WhitelistError, log,
                                   "whitelist reload failed; keeping the previous lists")
        if loaded is None:
            return
        self.clients, self.recipients = loaded
        self.clients.log_loaded()
        self.check_age(force=True)

    def check_age(self, force: bool = False) -> float | None:
        """Age of the newest client whitelist; warns when it is past whitelist_max_age (at most daily)."""
        dates = [date for path in self._client_files() if (date := whitelist_date(path)) is not None]
        if not dates:
            return None
        age = max(0.0, time.time() - max(dates))
        stale = age > self.settings.whitelist_max_age
        metrics.WHITELIST_AGE.set(age)
        metrics.WHITELIST_STALE.set(1 if stale else 0)
        if stale and (force or time.monotonic() - self._warned >= 86400):
            self._warned = time.monotonic()
            log_kv(log, logging.WARNING, "greylist client whitelist is out of date; run "
                   "'mailwarden greylist whitelist-update SOURCE'", age_days=int(age // 86400),
                   max_age_days=int(self.settings.whitelist_max_age // 86400))
        return age

    def start(self) -> None:
        loop = asyncio.get_running_loop()

        def tick() -> None:
            if self.watch.changed():
                self.reload()
            else:
                self.check_age()
            self._watcher = loop.call_later(self.settings.whitelist_check_interval, tick)

        self.check_age(force=True)
        self._watcher = loop.call_later(self.settings.whitelist_check_interval, tick)

    def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        if self.opt_out is not None:
            self.opt_out.close()

    def exemption(self, request: PolicyRequest) -> str | None:
        """Why this request is not greylisted at all, or None."""
        if request.authenticated and not self.settings.greylist_authenticated:
            return "authenticated client"
        ip = request.client_ip
        if ip is None:
            return "no usable client address"
        if trusted := self._trusted.get(ip.version):
            number = int(ip)
            for mask, network, text in trusted:
                if number & mask == network:
                    return f"trusted network {text}"
        if entry := self.clients.matches(ip, request.client_name):
            return f"client whitelisted ({entry})"
        if entry := self.recipients.matches(request.recipient):
            return f"recipient whitelisted ({entry})"
        if self.settings.skip_dnswl and (allow_list := allow_listing(request)):
            return f"client on allow list {allow_list}"
        if self._spf_domains and (domain := self._spf_pass_domain(request)):
            return f"SPF pass for {domain}"
        if self.settings.only_suspicious and (why := self.looks_trustworthy(request)):
            return why
        return None

    def _spf_pass_domain(self, request: PolicyRequest) -> str | None:
        spf = spf_result(request)
        if spf is None or spf.result != "pass" or spf.identity != "mailfrom":
            return None
        domain = spf.domain.lower().rstrip(".")
        return listed_suffix(domain, self._spf_domains)

    def looks_trustworthy(self, request: PolicyRequest) -> str | None:
        """With only_suspicious: why this client is not suspicious (so not greylisted), or None."""
        name = request.client_name.lower()
        if not name or name == "unknown":
            return None
        if self._dynamic.search(name):
            return None
        score = dnsbl_score(request)
        if score is not None and score > 0:
            return None
        return f"client not suspicious ({name})"

    def triplet(self, request: PolicyRequest, network: str | None = None) -> tuple[str, str, str]:
        """(origin, normalised sender, recipient): the origin is the client network (``network`` when the
        caller has it already), or ``spf:domain`` when SPF passed for the sender's domain, so the sender's
        whole pool counts as one."""
        origin = network or self.network(request)
        if self.settings.spf_domain_triplets and request.sender:
            spf = spf_result(request)
            if spf is not None and spf.result == "pass" and spf.identity == "mailfrom":
                origin = f"spf:{spf.domain.lower()}"
        return origin, normalise_sender(request.sender).lower(), request.recipient.lower()

    def network(self, request: PolicyRequest) -> str:
        """The client's network of the configured prefix (what a client pass of ``greylist pass`` names).
        With the default /24 and an IPv4 client it is cut from the address text, which is what
        client_network prints, for a third of its cost."""
        if self._ipv4_slash24 and type(request.client_ip) is ipaddress.IPv4Address:
            return f"{request.client_ip_text.rpartition('.')[0]}.0/24"
        assert request.client_ip is not None
        return client_network(request.client_ip, self.settings.ipv4_prefix, self.settings.ipv6_prefix)

    async def on_rcpt(self, request: PolicyRequest) -> Verdict | None:
        if why := self.exemption(request):
            return Verdict.accept(why)
        if self.opt_out is not None and await self.opt_out.opted_out(request.recipient):
            return Verdict.accept("recipient opted out of greylisting")
        network = self.network(request)  # once: the triplet's origin and the client-pass key use it
        origin, sender, recipient = self.triplet(request, network)
        domain = request.sender.rpartition("@")[2].lower() if "@" in request.sender else ""
        script_keys = (
            keys.greylist_triplet(self.prefix, origin, sender, recipient),
            f"{self.prefix}{keys.GREYLIST_CLIENT}{request.client_ip_text}",
            keys.greylist_expect(self.prefix, domain),
            keys.greylist_expect(self.prefix, domain, recipient),
            keys.greylist_passed_client(self.prefix, network),
        )
        result = unguarded(await self.redis.run_script(
            "greylist", script_keys, (f"{self.now():.3f}", *self._static_args, origin, sender, recipient),
            guard=request.take_guard()))
        assert isinstance(result, list)
        status = result[0].decode()
        if status == "expected":
            return Verdict.accept(f"inside an expect window for {domain}{_window_reason(result[1])}")
        if status == "client_pass":
            return Verdict.accept("client let through by 'greylist pass'")
        seconds = float(result[1])
        if status in ("new", "early"):
            return self.deferral(status, math.ceil(seconds), request.recipient.rpartition("@")[2])
        if status == "awl":
            return Verdict.accept(f"client auto-whitelisted after {int(seconds)} passes")
        if status == "pass":
            return Verdict.accept("triplet passed before")
        reason = f"retried after {int(seconds)}s"
        if self.settings.add_header and not request.transaction.greylist_header_sent:
            request.transaction.greylist_header_sent = True
            date = time.strftime("%a, %d %b %Y %H:%M:%S %z", time.localtime())
            header = f"X-Greylist: delayed {int(seconds)} seconds by mailwarden-policyd at {self.hostname}; {date}"
            return Verdict.accept(reason, prepend(header))
        return Verdict.accept(reason)

    def deferral(self, status: str, seconds: int, recipient_domain: str) -> Verdict:
        """The answer to a "new" or "early" triplet, ``seconds`` (rounded up) before it may pass. Kept per
        (status, seconds, domain) because every new triplet gets the same one (the delay is fixed) and its
        formatting and the Verdict cost about 2.5 µs; the domain is part of the key only when the text names
        it. At most DEFERRALS_KEPT answers are kept (an early retry's seconds vary up to the delay)."""
        domain = recipient_domain if self._text_names_domain else ""
        if (kept := self._deferrals.get((status, seconds, domain))) is not None:
            return kept
        text = self.settings.text.format(retry_in=human_wait(seconds), seconds=seconds, recipient_domain=domain)
        reason = "new triplet" if status == "new" else f"early retry, {seconds}s missing"
        verdict = Verdict.refuse(Action.DEFER, reason, defer_if_permit(text))
        if len(self._deferrals) >= DEFERRALS_KEPT:
            self._deferrals.clear()
        self._deferrals[status, seconds, domain] = verdict
        return verdict


DEFERRALS_KEPT = 4096
"""Deferral answers a GreylistCheck keeps (a few hundred bytes each); past it the store starts over."""


def trusted_index(networks: Sequence[IPNetwork]) -> dict[int, tuple[tuple[int, int, str], ...]]:
    """Trusted networks by IP version, as (netmask, network address, text) in the configured order:
    ``int(ip) & netmask == network address`` is what ``ip in network`` tests, without its type checks and
    property calls for each network; the first network that holds the client names it, as before."""
    index: dict[int, list[tuple[int, int, str]]] = {}
    for network in networks:
        index.setdefault(network.version, []).append((int(network.netmask), int(network.network_address),
                                                      str(network)))
    return {version: tuple(members) for version, members in index.items()}


def _window_reason(raw: bytes) -> str:
    """``: why`` from an expect window's JSON (what `greylist expect --reason` said), or nothing."""
    try:
        reason = json.loads(raw).get("reason")
    except (ValueError, AttributeError):
        return ""
    return f": {reason}" if reason else ""
