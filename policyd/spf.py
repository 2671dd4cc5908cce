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
from collections.abc import Sequence
from dataclasses import dataclass

import spf

from mailwarden.decision import Action
from mailwarden.dns import DnsSettings, dnspython_resolver
from mailwarden.logs import get_logger, log_kv
from policyd.check import Check
from policyd.request import PolicyRequest
from policyd.settings import SpfSettings
from policyd.verdict import Verdict, prepend
from policyd.whitelist import IPNetwork

log = get_logger("policyd.spf")

_RESULT = "spf.result"


@dataclass(frozen=True, slots=True)
class SpfResult:
    result: str
    """pass, fail, softfail, neutral, none, temperror or permerror."""
    identity: str
    """``mailfrom`` or ``helo``."""
    domain: str
    """The domain whose policy was evaluated."""
    explanation: str
    header: str
    client: str
    sender: str


def spf_result(request: PolicyRequest) -> SpfResult | None:
    """The SPF result of this request's transaction, if the SPF check ran (for other checks, e.g. greylist)."""
    kept = request.message.get(_RESULT)
    if isinstance(kept, SpfResult) and kept.client == request.client_address and kept.sender == request.sender:
        return kept
    return None


def evaluate(client: str, sender: str, helo: str, receiver: str, timeout: float) -> SpfResult:
    """One SPF evaluation, synchronously (pyspf): meant for a worker thread."""
    query = spf.query(i=client, s=sender, h=helo, receiver=receiver, querytime=timeout)
    try:
        result, _code, explanation = query.check()
    except Exception as exc:  # pyspf's own bugs or odd input must not take the worker down
        result, explanation = "temperror", f"SPF evaluation failed: {type(exc).__name__}"
    identity = query.ident
    domain = query.o if identity == "mailfrom" else helo
    if not hasattr(query, "mechanism"):
        query.mechanism = None  # pyspf sets it only when a mechanism matched (not for none/temperror)
    try:
        # pyspf gives "Pass (comment) key=value; ..."; RFC 7208 writes the result in lower case
        header = f"Received-SPF: {result} {query.get_header(result, receiver=receiver).split(' ', 1)[1]}"
    except Exception:
        header = f"Received-SPF: {result} ({receiver}: {explanation}) client-ip={client}; identity={query.ident}"
    return SpfResult(result, identity, domain or "", explanation, header, client, sender)


class SpfCheck(Check):
    name = "spf"
    dependency = "dns"

    def __init__(self, settings: SpfSettings, dns: DnsSettings, receiver: str, trusted: Sequence[IPNetwork]) -> None:
        self.settings = settings
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
            result = await self._evaluate(request)
            request.message[_RESULT] = result
        return self._verdict(result, request)

    async def _evaluate(self, request: PolicyRequest) -> SpfResult:
        loop = asyncio.get_running_loop()
        client = str(request.client_ip)
        helo = request.helo_name.strip("[]") if _is_name(request.helo_name) else ""
        if not request.sender and not helo:
            return SpfResult("none", "helo", "", "null sender and no usable HELO name", "", request.client_address,
                             request.sender)
        work = loop.run_in_executor(self.pool, evaluate, client, request.sender, helo, self.receiver,
                                    self.settings.timeout)
        try:
            result = await asyncio.wait_for(work, self.settings.timeout + 0.2)
        except TimeoutError:
            log_kv(log, logging.WARNING, "SPF evaluation timed out; result temperror", client=client,
                   sender=request.sender or "<>", timeout=f"{self.settings.timeout:g}s")
            return SpfResult("temperror", "mailfrom" if request.sender else "helo", "", "SPF lookup timed out",
                             f"Received-SPF: temperror (timed out) client-ip={client};", request.client_address,
                             request.sender)
        return SpfResult(result.result, result.identity, result.domain, result.explanation, result.header,
                         request.client_address, request.sender)

    def _verdict(self, result: SpfResult, request: PolicyRequest) -> Verdict | None:
        action = getattr(self.settings, f"on_{result.result}", "ignore")
        reason = f"spf {result.result} for {result.identity} {result.domain or '-'}"
        if action == "reject":
            text = self.settings.reject_text.format(domain=result.domain, client=request.client_address,
                                                    result=result.result)
            return Verdict.refuse(Action.REJECT, reason, f"550 5.7.23 {text}")
        if action == "defer":
            text = self.settings.defer_text.format(domain=result.domain, client=request.client_address,
                                                   result=result.result)
            return Verdict.refuse(Action.DEFER, reason, f"451 4.7.24 {text}")
        if action == "header" and result.header and not request.message.get("spf.header"):
            request.message["spf.header"] = True
            return Verdict.accept(reason, prepend(_one_line(result.header)))
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


def _one_line(header: str) -> str:
    return " ".join(header.split())
