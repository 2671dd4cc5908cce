"""DNSBL and DNSWL: the client's address looked up in the configured lists, weighed, and refused when the
weights of the lists that list it reach the threshold (so one weak list alone does not reject).

Lookups go through pydnsbl (async, c-ares) with the nameservers of ``[dns]``. All lists of one request are
asked at once and the whole lookup is bounded by ``budget``: a list that has not answered by then, or
answers with an error or with a code outside its filter, counts as "not listed" and the log says so.
Answers are cached in Redis for the answer's TTL (negative answers for ``negative_ttl``), so a client
that retries, or that several MX hosts see, costs one query per list. The result of one mail
transaction is kept for its other recipients. SASL-authenticated clients are not looked up unless
``check_authenticated`` is set (a user at home is on a list of dynamic addresses, and is no spammer).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Annotated, Any, Literal, cast

from pydantic import Field, field_validator
from pydnsbl import DNSBLIpChecker
from pydnsbl.providers import Provider

from mailwarden.backend import BackendError
from mailwarden.decision import Action
from mailwarden.dns import DnsSettings, aiodns_resolver
from mailwarden.logs import get_logger, log_kv
from mailwarden.redis_pipe import PipelinedRedis
from mailwarden.section import Section
from mailwarden.units import Duration
from policyd import keys
from policyd.check import Check
from policyd.request import PolicyRequest
from policyd.results import ListAnswer, dnsbl_answers
from policyd.settings_types import check_template
from policyd.verdict import Verdict, defer, reject


def code_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    first = int(ipaddress.IPv4Address(low.strip()))
    last = int(ipaddress.IPv4Address(high.strip())) if high else first
    if last < first:
        raise ValueError(f"{text!r}: the range ends before it starts")
    return first, last


class DnsList(Section):
    zone: Annotated[str, Field(max_length=200, pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)+\.?$")]
    weight: float = 1.0
    """Added when the list lists the client; negative for allow lists (DNSWL)."""
    codes: list[str] = []
    """Return codes that count, as addresses or ranges ("127.0.0.2", "127.0.0.2-127.0.0.11"); empty: any
    code in 127.0.0.0/8 except 127.255.255.0/24 (the codes lists use to say "query refused")."""
    name: str | None = None
    """Shown in the reply text and the log; the zone by default."""

    @field_validator("codes")
    @classmethod
    def _codes(cls, codes: list[str]) -> list[str]:
        for code in codes:
            try:
                code_range(code)
            except ValueError as exc:
                raise ValueError(f"bad return code {code!r}: {exc}") from None
        return codes

    @property
    def label(self) -> str:
        return self.name or self.zone.rstrip(".")


class DnsblSettings(Section):
    lists: list[DnsList] = []
    """The lists to ask. None by default: a site chooses lists whose terms it meets."""
    threshold: float = 1.0
    """Refuse when the weights of the listing lists add up to at least this."""
    budget: Duration = 1.5
    """Total time for all lookups of one request; a list not answered by then counts as not listed."""
    negative_ttl: Duration = 300
    """How long a "not listed" answer is cached (listed answers: the answer's own TTL)."""
    max_ttl: Duration = 3600
    action: Literal["reject", "defer"] = "reject"
    text: str = "Service unavailable; client [{client}] blocked using {lists}{lookup}"
    """Placeholders: {client}, {lists} (the public names of the lists that list it), {lookup}."""
    lookup_url: str | None = None
    """Where a refused sender can look its address up, e.g. "https://mx.example.org/blocked?ip={client}";
    {lookup} is then "; see <url>", else empty."""
    check_authenticated: bool = False
    """Look SASL-authenticated clients up too. Off by default: a user sending from home is often on a
    list of dynamic addresses (Spamhaus PBL) and must not be refused for it; they skip greylisting too."""

    @field_validator("text")
    @classmethod
    def _text(cls, text: str) -> str:
        return check_template(text, {"client", "lists", "lookup"})

    @field_validator("lookup_url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        if url is not None:
            if not url.startswith(("https://", "http://")):
                raise ValueError("lookup_url must be an http(s) URL")
            check_template(url, {"client"})
        return url


log = get_logger("policyd.dnsbl")



class _ZoneProvider(Provider):
    """pydnsbl's provider, with the list's return-code filter."""

    def __init__(self, dns_list: DnsList) -> None:
        super().__init__(dns_list.zone.rstrip("."))
        self.dns_list = dns_list
        self.ranges = [code_range(code) for code in dns_list.codes]

    def counts(self, code: str) -> bool:
        try:
            value = int(ipaddress.IPv4Address(code))
        except ValueError:
            return False
        if self.ranges:
            return any(low <= value <= high for low, high in self.ranges)
        return (value >> 24) == 127 and (value >> 8) != 0x7FFFFF


class DnsblCheck(Check):
    name = "dnsbl"
    dependency = "dns"

    def __init__(self, settings: DnsblSettings, dns: DnsSettings, redis_pipe: PipelinedRedis, prefix: str) -> None:
        self.settings = settings
        self.dns = dns
        self.redis = redis_pipe
        self.prefix = prefix
        self.providers = [_ZoneProvider(dns_list) for dns_list in settings.lists]
        self._checker: DNSBLIpChecker | None = None

    def start(self) -> None:
        if not self.providers:
            return
        loop = asyncio.get_running_loop()
        checker = DNSBLIpChecker(providers=self.providers, timeout=self.dns.timeout, tries=self.dns.tries,
                                 loop=loop)
        checker._resolver = aiodns_resolver(self.dns)  # pydnsbl takes no nameserver: give it ours
        self._checker = checker

    async def on_rcpt(self, request: PolicyRequest) -> Verdict | None:
        if not self.providers or request.client_ip is None:
            return None
        if request.client_ip.is_loopback:
            return None
        if request.authenticated and not self.settings.check_authenticated:
            return Verdict.accept("authenticated client, not looked up")
        result = dnsbl_answers(request)
        if result is None:
            result = await self.lookup(request.client_ip)
            request.transaction.dnsbl = (request.client_ip, result)
        return self._verdict(request, result)

    def _verdict(self, request: PolicyRequest, answers: list[ListAnswer]) -> Verdict | None:
        listed = [answer for answer in answers if answer.codes]
        score = sum(answer.weight for answer in listed)
        problems = [f"{answer.label}: {answer.problem}" for answer in answers if answer.problem]
        detail = ", ".join(f"{a.label}={'/'.join(a.codes)} ({a.weight:+g})" for a in listed) or "not listed"
        if problems:
            detail += "; no answer from " + ", ".join(problems)
        if not listed:
            return Verdict.accept(detail) if problems else None
        if score < self.settings.threshold:
            return Verdict.accept(f"score {score:g} below {self.settings.threshold:g}: {detail}")
        lists = ", ".join(answer.label for answer in listed if answer.weight > 0)
        lookup = f"; see {self.settings.lookup_url.format(client=request.client_address)}" \
            if self.settings.lookup_url else ""
        text = self.settings.text.format(client=request.client_address, lists=lists, lookup=lookup)
        reason = f"score {score:g} reached {self.settings.threshold:g}: {detail}"
        if self.settings.action == "defer":
            return Verdict.refuse(Action.DEFER, reason, defer(text))
        return Verdict.refuse(Action.REJECT, reason, reject(text))

    async def lookup(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> list[ListAnswer]:
        """Every list's answer for ``ip``: from the Redis cache where fresh, else asked now, all at once."""
        address = ip.compressed
        cache_keys = [f"{self.prefix}{keys.DNSBL}{p.host}:{address}" for p in self.providers]
        try:
            cached = cast("list[bytes | None]", await self.redis.ask("MGET", *cache_keys))
        except BackendError as exc:  # a cache that fails is a miss, never a failed lookup
            log_kv(log, logging.WARNING, "dnsbl cache unavailable; asking DNS", error=str(exc))
            cached = [None] * len(cache_keys)
        answers: dict[int, ListAnswer] = {}
        missing = []
        for index, (provider, raw) in enumerate(zip(self.providers, cached, strict=True)):
            if raw is None:
                missing.append(index)
                continue
            codes = tuple(code for code in raw.decode().split(",") if code)
            answers[index] = ListAnswer(provider.dns_list.label, provider.dns_list.weight, codes, cached=True)
        if missing:
            fresh = await self._ask(address, [self.providers[i] for i in missing])
            for index, (answer, ttl) in zip(missing, fresh, strict=True):
                answers[index] = answer
                if not answer.problem:
                    self._store(cache_keys[index], answer.codes, ttl)
        return [answers[index] for index in range(len(self.providers))]

    async def _ask(self, address: str, providers: list[_ZoneProvider]) -> list[tuple[ListAnswer, int]]:
        assert self._checker is not None
        tasks = [asyncio.ensure_future(self._checker.dnsbl_request(address, p)) for p in providers]
        _done, pending = await asyncio.wait(tasks, timeout=self.settings.budget)
        for task in pending:
            task.cancel()
        results = []
        for provider, task in zip(providers, tasks, strict=True):
            label, weight = provider.dns_list.label, provider.dns_list.weight
            if task in pending:
                problem = f"no answer within {self.settings.budget:g}s"
                log_kv(log, logging.WARNING, "dnsbl lookup timed out; counted as not listed", list=label,
                       client=address)
                results.append((ListAnswer(label, weight, (), problem), 0))
                continue
            response = task.result()
            if response.error is not None:
                problem = f"lookup failed ({_dns_error(response.error)})"
                log_kv(log, logging.WARNING, "dnsbl lookup failed; counted as not listed", list=label,
                       client=address, error=_dns_error(response.error))
                results.append((ListAnswer(label, weight, (), problem), 0))
                continue
            results.append(self._answer(provider, address, response.response))
        return results

    def _answer(self, provider: _ZoneProvider, address: str, records: Any) -> tuple[ListAnswer, int]:
        label, weight = provider.dns_list.label, provider.dns_list.weight
        if not records:
            return ListAnswer(label, weight, ()), int(self.settings.negative_ttl)
        codes = tuple(sorted({record.host for record in records}))
        counting = tuple(code for code in codes if provider.counts(code))
        ttl = min(int(min(getattr(record, "ttl", 60) for record in records)), int(self.settings.max_ttl))
        if not counting:
            log_kv(log, logging.WARNING, "dnsbl answered with codes outside its filter; counted as not listed",
                   list=label, client=address, codes=",".join(codes))
            return ListAnswer(label, weight, (), f"unexpected code {','.join(codes)}"), 0
        return ListAnswer(label, weight, counting), ttl  # TTL 0: the list asks not to be cached

    def _store(self, key: str, codes: tuple[str, ...], ttl: int) -> None:
        if ttl <= 0:
            return
        self.redis.post("SET", key, ",".join(codes), "EX", ttl)  # a failed cache write only costs a later query


def _dns_error(exc: BaseException) -> str:
    args: tuple[Any, ...] = getattr(exc, "args", ())
    return str(args[1]) if len(args) > 1 else str(exc) or type(exc).__name__
