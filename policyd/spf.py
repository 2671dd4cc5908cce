"""SPF (RFC 7208) with pyspf: the envelope sender's domain (or the HELO name, for the null sender) asked
whether the client may send its mail.

Each result maps by config to an action: ``reject`` (550 5.7.23), ``defer`` (451 4.7.24), ``header`` (a
``Received-SPF:`` header through PREPEND) or ``ignore``. pyspf is synchronous (dnspython underneath), so
it runs in a small thread pool and the whole evaluation is bounded by ``timeout``: past it the result is
``temperror``, mapped like any other. The result of one transaction is kept for its other recipients and
for the greylist, which uses the sender's domain in place of the client network once SPF passed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ipaddress
import logging
import re
from collections.abc import Sequence
from typing import Annotated, Literal

import spf
from pydantic import Field, field_validator

from mailwarden.backend import BackendError
from mailwarden.decision import Action
from mailwarden.dns import DnsSettings, dnspython_resolver
from mailwarden.inline import bounded
from mailwarden.logs import get_logger, log_kv
from mailwarden.redis_pipe import PipelinedRedis
from mailwarden.section import Section
from mailwarden.units import Duration
from policyd import keys
from policyd.check import Check
from policyd.request import PolicyRequest
from policyd.results import SpfResult, spf_result
from policyd.settings_types import check_template
from policyd.verdict import DEFER_SPF_ERROR, REJECT_SPF_FAIL, Verdict, defer, prepend, reject
from policyd.whitelist import IPNetwork

SpfAction = Literal["reject", "defer", "header", "ignore"]


class SpfSettings(Section):
    """What each SPF result does: reject (550 5.7.23), defer (451 4.7.24), header (PREPEND Received-SPF)
    or ignore. Authenticated clients and trusted networks are not checked."""

    on_pass: SpfAction = "header"  # noqa: S105 - an SPF result, not a password
    on_fail: SpfAction = "reject"
    on_softfail: SpfAction = "header"
    on_neutral: SpfAction = "header"
    on_none: SpfAction = "header"
    on_temperror: SpfAction = "header"
    """A DNS problem at the sender's side; "defer" is the strict choice (the sender retries later)."""
    on_permerror: SpfAction = "header"
    timeout: Duration = 2.0
    """Time for the whole evaluation (all its DNS lookups); past it the result is temperror."""
    threads: Annotated[int, Field(ge=1, le=64)] = 8
    """pyspf is synchronous: evaluations run in this many worker threads."""
    cache_ttl: Duration = 300
    """Results are cached in Redis per client address and sender domain (or HELO name) this long; 0: off.
    pyspf is the costliest check per request: the cache takes it off every repeat sender."""
    reject_text: str = "SPF: {domain} does not allow {client} to send its mail"
    defer_text: str = "SPF: temporary error evaluating the policy of {domain}, please try again later"

    @field_validator("reject_text", "defer_text")
    @classmethod
    def _texts(cls, text: str) -> str:
        return check_template(text, {"domain", "client", "result"})


log = get_logger("policyd.spf")

_COMMENTS = {
    "pass": "domain of {domain} designates {ip} as permitted sender",
    "fail": "domain of {domain} does not designate {ip} as permitted sender",
    "softfail": "transitioning domain of {domain} does not designate {ip} as permitted sender",
    "neutral": "{ip} is neither permitted nor denied by domain of {domain}",
    "none": "domain of {domain} does not designate permitted sender hosts",
    "temperror": "error in processing during lookup of {domain}",
    "permerror": "permanent error in processing domain of {domain}",
}
_DOT_ATOM = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+(@[A-Za-z0-9.-]+)?$")


def evaluate(client: str, sender: str, helo: str, timeout: float) -> tuple[str, str, str, str]:
    """One SPF evaluation, synchronously (pyspf), meant for a worker thread:
    (result, identity, domain, explanation)."""
    query = spf.query(i=client, s=sender, h=helo, querytime=timeout)
    try:
        result, _code, explanation = query.check()
    except Exception as exc:  # pyspf's own bugs or odd input must not take the worker down
        result, explanation = "temperror", f"SPF evaluation failed: {type(exc).__name__}"
    identity = query.ident
    domain = query.o if identity == "mailfrom" else helo
    return result, identity, domain or "", explanation


def received_spf(result: SpfResult, helo: str, receiver: str) -> str:
    """The ``Received-SPF:`` header of RFC 7208 section 9.1, from a fresh or a cached result."""
    comment = _COMMENTS.get(result.result, "{ip}").format(domain=result.domain or "-", ip=result.client)
    pairs = [f"client-ip={result.client};"]
    if result.identity == "mailfrom":
        pairs.append(f"envelope-from={_quoted(result.sender)};")
    if helo:
        pairs.append(f"helo={_quoted(helo)};")
    pairs += [f"receiver={_quoted(receiver)};", f"identity={result.identity}"]
    return f"Received-SPF: {result.result} ({receiver}: {comment}) {' '.join(pairs)}"


def _quoted(value: str) -> str:
    if _DOT_ATOM.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class SpfCheck(Check):
    name = "spf"
    dependency = "dns"

    def __init__(self, settings: SpfSettings, dns: DnsSettings, receiver: str, trusted: Sequence[IPNetwork],
                 redis_pipe: PipelinedRedis, prefix: str) -> None:
        self.settings = settings
        self.redis = redis_pipe
        self.prefix = prefix
        self.trusted = list(trusted)
        self.dns = dns
        self.receiver = receiver
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=settings.threads, thread_name_prefix="spf")

    def start(self) -> None:
        import dns.resolver

        dns.resolver.default_resolver = dnspython_resolver(self.dns)  # pyspf asks through the module default

    def stop(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

    async def on_rcpt(self, request: PolicyRequest) -> Verdict | None:
        ip = request.client_ip
        if request.authenticated or ip is None or any(ip.version == n.version and ip in n for n in self.trusted):
            return None
        result = spf_result(request)
        if result is None:
            result = await self._cached(request) or await self._evaluate(request)
            request.transaction.spf = result
        return self._verdict(result, request)

    def _cache_key(self, request: PolicyRequest, helo: str) -> str:
        """The policy's answer depends on the client and the domain (macros on the local part are rare
        enough to ignore), so a newsletter from one host is evaluated once per cache_ttl."""
        identity = request.sender.rpartition("@")[2].lower() if request.sender else f"helo:{helo.lower()}"
        return f"{self.prefix}{keys.SPF}{keys.digest(f'{request.client_ip}/{identity}')}"

    async def _cached(self, request: PolicyRequest) -> SpfResult | None:
        if self.settings.cache_ttl <= 0:
            return None
        try:
            raw = await self.redis.ask("GET", self._cache_key(request, _helo(request)))
        except BackendError:
            return None  # a cache that fails is a miss
        if not isinstance(raw, bytes):
            return None
        result, _, rest = raw.decode().partition("|")
        identity, _, domain = rest.partition("|")
        return SpfResult(result, identity, domain, "cached", request.client_address, request.sender, cached=True)

    def _store(self, request: PolicyRequest, helo: str, result: SpfResult) -> None:
        if self.settings.cache_ttl <= 0 or result.result == "temperror":
            return
        value = f"{result.result}|{result.identity}|{result.domain}"
        self.redis.post("SET", self._cache_key(request, helo), value, "EX", int(self.settings.cache_ttl))

    async def _evaluate(self, request: PolicyRequest) -> SpfResult:
        loop = asyncio.get_running_loop()
        client = str(request.client_ip)
        helo = _helo(request)
        if not request.sender and not helo:
            return SpfResult("none", "helo", "", "null sender and no usable HELO name", request.client_address,
                             request.sender)
        work = loop.run_in_executor(self.pool, evaluate, client, request.sender, helo, self.settings.timeout)
        try:
            result, identity, domain, explanation = await bounded(work, self.settings.timeout + 0.2)
        except TimeoutError:
            log_kv(log, logging.WARNING, "SPF evaluation timed out; result temperror", client=client,
                   sender=request.sender or "<>", timeout=f"{self.settings.timeout:g}s")
            identity = "mailfrom" if request.sender else "helo"
            domain = request.sender.rpartition("@")[2] if request.sender else helo
            return SpfResult("temperror", identity, domain, "SPF lookup timed out", request.client_address,
                             request.sender)
        found = SpfResult(result, identity, domain, explanation, request.client_address, request.sender)
        self._store(request, helo, found)
        return found

    def _verdict(self, result: SpfResult, request: PolicyRequest) -> Verdict | None:
        action = getattr(self.settings, f"on_{result.result}", "ignore")
        reason = f"spf {result.result} for {result.identity} {result.domain or '-'}" + (" (cached)" if result.cached
                                                                                       else "")
        if action == "reject":
            text = self.settings.reject_text.format(domain=result.domain, client=request.client_address,
                                                    result=result.result)
            return Verdict.refuse(Action.REJECT, reason, reject(text, REJECT_SPF_FAIL))
        if action == "defer":
            text = self.settings.defer_text.format(domain=result.domain, client=request.client_address,
                                                   result=result.result)
            return Verdict.refuse(Action.DEFER, reason, defer(text, DEFER_SPF_ERROR))
        if action == "header" and result.domain and not request.transaction.spf_header_sent:
            request.transaction.spf_header_sent = True
            header = received_spf(result, _helo(request), self.receiver)
            return Verdict.accept(reason, prepend(" ".join(header.split())))
        return Verdict.accept(reason)


def _is_name(helo: str) -> bool:
    """A HELO worth an SPF check: a domain name, not an address literal or a bare word."""
    text = helo.strip().strip("[]")
    if not text or "." not in text:
        return False
    try:
        ipaddress.ip_address(text)
        return False
    except ValueError:
        return True


def _helo(request: PolicyRequest) -> str:
    return request.helo_name.strip().strip("[]") if _is_name(request.helo_name) else ""
