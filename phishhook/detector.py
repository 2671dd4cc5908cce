"""The detector: every login and every outbound message judged, snags raised, their actions run.

Called from the phish milter's worker threads, from the HTTP service's thread pool (Dovecot, the intake)
and from the CLI: synchronous and thread-safe (a redis-py client is, and the SQL store is).

A successful login is located, classified (private, trusted, relay, public) and compared with the user's
recent logins (``velocity.judge``). A travel found is then weighed against what the site knows: the user's
usual places and the organisation's, travel notices, allow entries. What is left snags the account, in
alert mode (nothing blocked) when the site runs alert-only, the geo database could not be opened and
``[phishhook.geo] on_error = "alert-only"``, or the account is still in its learning period.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from mailwarden.decision import Action, Decision
from mailwarden.logs import DecisionLog, get_logger, log_kv
from phishhook import metrics
from phishhook.actions import ActionResult, ActionRunner, ActionWorker, Evidence
from phishhook.bruteforce import FailedLogins
from phishhook.events import LoginEvent
from phishhook.geo import GeoLocator, Place
from phishhook.history import LoginHistory, Recall
from phishhook.mode import Mode
from phishhook.networks import AddressClass, NetworkClassifier
from phishhook.outbound import OutboundFinding, OutboundVerdict, judge_outbound
from phishhook.snags import Snag, SnagStore
from phishhook.velocity import Sighting, Travel, judge
from policyd import keys as block_keys
from policyd.blocklist import BlockList

log = get_logger("phishhook")

WORKER_DRAIN = 30.0
"""Seconds a stopping service waits for queued slow actions (tickets, commands, webhooks) to finish."""


@dataclass(frozen=True)
class LoginOutcome:
    sighting: Sighting
    travel: Travel | None
    """The impossible travel found, before exemptions."""
    exempt: str
    """Why a travel found did not snag ("" when none was found or it snagged)."""
    snag: Snag | None


@dataclass(frozen=True)
class OutboundOutcome:
    finding: OutboundFinding
    snag: Snag | None


@dataclass
class DetectorParts:
    """What the detector is built from (``phishhook/app.py`` assembles them from the config)."""

    settings: Any
    """The ``[phishhook]`` section."""
    client: redis.Redis
    prefix: str
    geo: GeoLocator | None
    classifier: NetworkClassifier
    snags: SnagStore
    actions: ActionRunner
    worker: ActionWorker | None
    decisions: DecisionLog | None = None
    forced_alert: str = ""
    """Why every snag is alert-only whatever ``mode`` says (the geo database could not be opened), or ""."""


class Detector:
    def __init__(self, parts: DetectorParts, now: Callable[[], float] = time.time) -> None:
        self.parts = parts
        self.settings = parts.settings
        self.now = now
        self.history = LoginHistory(parts.client, parts.prefix, self.settings.history, now)
        self.failures = FailedLogins(parts.client, parts.prefix, self.settings.bruteforce)

    # --- logins ------------------------------------------------------------------------------------------

    def locate(self, address: str) -> Place | None:
        return self.parts.geo.locate(address) if self.parts.geo is not None else None

    def sighting(self, event: LoginEvent) -> Sighting:
        classified = self.parts.classifier.classify(event.address)
        place = self.locate(classified.address) if classified.kind is not AddressClass.INVALID else None
        return Sighting(at=event.at, address=classified.address, place=place, kind=classified.kind,
                        group=classified.group, service=event.service)

    def login(self, event: LoginEvent) -> LoginOutcome:
        """Judge one successful login and remember it."""
        started = time.monotonic()
        sighting = self.sighting(event)
        recall = self.history.recall(event.user, sighting.place, event.at, self.settings.velocity.compare_within)
        earlier = [s for s in recall.earlier if recall.cleared is None or s.at > recall.cleared]
        travel = judge(sighting, earlier, self.settings.velocity)
        exempt = self._exemption(event.user, sighting, recall) if travel is not None else ""
        snag = None
        if travel is not None and not exempt:
            mode = self._mode(recall, event.at)
            snag = self.raise_snag(event.user, travel.rule, _travel_reason(travel), {
                "finding": "login", "travel": travel.as_dict(), "sightings": _sighting_rows(travel),
                "service": event.service, "via": event.via, "session": event.session}, sighting.address, mode,
                learning=mode is Mode.ALERT and self.history.in_learning(recall, event.at))
        self.history.remember(event.user, sighting, recall)
        self._decide(event, sighting, travel, exempt, snag, time.monotonic() - started)
        outcome = "snag" if snag is not None else "exempt" if exempt else "accept"
        metrics.LOGINS.labels(event.via.partition(":")[0], outcome).inc()
        return LoginOutcome(sighting, travel, exempt, snag)

    def failed_login(self, event: LoginEvent) -> None:
        """Count a failed login; block its address or alert on the account when a limit is crossed."""
        started = time.monotonic()
        classified = self.parts.classifier.classify(event.address)
        counted = self.failures.count(event.user, classified.address)
        action, reason = Action.ACCEPT, "failed login counted"
        if counted.block_address and classified.kind is AddressClass.PUBLIC:
            BlockList(self.parts.client, self.parts.prefix).add(
                "client", classified.address, f"phishhook: {counted.block_address}", "phishhook",
                expires=self.settings.bruteforce.block_for)
            action, reason = Action.REJECT, f"address blocked: {counted.block_address}"
        if counted.alert_user:
            self.raise_snag(event.user, "brute-force", counted.alert_user,
                            {"finding": "failed-logins", "failures": counted.user_failures,
                             "service": event.service}, classified.address, Mode.ALERT)
            reason += f"; account alert: {counted.alert_user}"
        metrics.LOGINS.labels(event.via.partition(":")[0], "failed").inc()
        self._emit(Decision("phishhook", "login", "brute-force", action, reason, time.monotonic() - started,
                            queue_id=event.session, client=classified.address, user=event.user,
                            extra={"service": event.service, "via": event.via, "result": "failed"}))

    def _mode(self, recall: Recall, at: float) -> Mode:
        if self.parts.forced_alert or self.settings.mode == Mode.ALERT:
            return Mode.ALERT
        return Mode.ALERT if self.history.in_learning(recall, at) else Mode.ENFORCE

    def _exemption(self, user: str, sighting: Sighting, recall: Recall) -> str:
        """Why a travel to ``sighting`` does not snag: the user's or the organisation's usual place, a
        travel notice, an allow entry; "" when nothing exempts it."""
        history = self.settings.history
        if recall.place_days >= history.regular_days:
            return f"a usual place of the user ({recall.place_days} days)"
        if history.org_regular_users and recall.org_users >= history.org_regular_users:
            return f"a usual place of the organisation (~{recall.org_users} users)"
        place = sighting.place
        at = datetime.datetime.fromtimestamp(sighting.at, datetime.UTC)
        country = place.country if place is not None else None
        for notice in self.parts.snags.travel_for(user, at):
            if (not notice.countries and not notice.places) or notice.matches(country, place.city if place else None):
                return f"travel notice {notice.id} ({notice.note or 'registered'})"
        for entry in self.parts.snags.allows_for(user):
            if entry.matches(sighting.address, country):
                return f"allow entry {entry.id} ({entry.network or entry.country})"
        return ""

    # --- outbound ----------------------------------------------------------------------------------------

    def outbound(self, *, queue_id: str, auth_user: str, client_address: str, sender: str,
                 from_header: str | None, recipients: list[str], subject: str = "") -> OutboundOutcome:
        finding = judge_outbound(self.settings.outbound, auth_user, sender, from_header, recipients)
        if finding.verdict != OutboundVerdict.ANOMALY:
            return OutboundOutcome(finding, None)
        user = auth_user.strip().lower()
        recall = self.history.recall(user, None)
        mode = self._mode(recall, self.now())
        snag = self.raise_snag(user, "outbound", finding.reason, {
            "finding": "outbound", "client": client_address, "messages": [{
                "queue_id": queue_id, "sender": sender, "header_from": finding.from_address,
                "recipients": finding.recipients, "subject": subject[:200], "at": self.now()}]},
            client_address, mode)
        return OutboundOutcome(finding, snag)

    def rate_limit_hit(self, user: str, reason: str, details: dict[str, Any], mode: Mode) -> Snag:
        """policyd refused the user's mail for a rate limit (``ratelimit_signal``): a snag of its own kind."""
        started = time.monotonic()
        snag = self.raise_snag(user, "rate-limit", reason, details, "", mode)
        self._emit(Decision("phishhook", "other", "rate-limit", Action.SNAG, reason, time.monotonic() - started,
                            user=user, extra={"snag": snag.public_id, "mode": str(mode)}))
        return snag

    # --- snags -------------------------------------------------------------------------------------------

    def raise_snag(self, user: str, kind: str, reason: str, details: dict[str, Any], source_address: str,
                   mode: Mode, learning: bool = False) -> Snag:
        """Record the snag (or add this finding to the user's open one) and run its actions: the blocks at
        once, the slower ones (commands, ticket, webhook) on the worker, in order."""
        details = {**details, "address": source_address}
        if source_address and self.parts.classifier.classify(source_address).kind is not AddressClass.PUBLIC:
            source_address = ""  # never block a campus, VPN, relay or private address: its users are many
        if learning:
            details = {**details, "learning": True}
        if self.parts.forced_alert:
            details = {**details, "alert_only": self.parts.forced_alert}
        snag = self.parts.snags.create(user, kind, reason, details, str(mode), source_address)
        evidence = Evidence(snag_id=snag.public_id, user=user, kind=kind, reason=reason,
                            source_address=source_address, mode=str(mode), at=self.now(), details=details,
                            review_url=self._review_url(snag))

        def record(result: ActionResult) -> None:
            self.record_action(snag, result)

        metrics.SNAGS.labels(kind, str(mode)).inc()
        self.parts.actions.immediate(evidence, record)
        if snag.run_actions:  # a finding added to an undecided snag: the team was told already

            def deferred(evidence: Evidence) -> object:
                return self.parts.actions.deferred(evidence, record)

            if self.parts.worker is not None:
                self.parts.worker.submit(evidence, deferred)
            else:
                deferred(evidence)
        log_kv(log, 30, "account snagged" if snag.new else "finding added to an open snag", snag=snag.public_id,
               user=user, kind=kind, mode=str(mode), reason=reason, address=source_address)
        return snag

    def record_action(self, snag: Snag, result: ActionResult) -> None:
        started = datetime.datetime.fromtimestamp(self.now() - result.seconds, datetime.UTC)
        detail = f"skipped: {result.detail}" if result.skipped else result.detail
        try:
            self.parts.snags.record_action(snag.public_id, result.name, result.ok, detail, started, result.seconds)
        except Exception as exc:  # the action happened; only its record is lost, and the log has it
            log_kv(log, 40, "could not record a snag action", snag=snag.public_id, action=result.name,
                   ok=result.ok, error=str(exc))

    def _review_url(self, snag: Snag) -> str:
        base = self.settings.review.public_url
        return f"{base.rstrip('/')}/snags/{snag.public_id}" if base else ""

    def _decide(self, event: LoginEvent, sighting: Sighting, travel: Travel | None, exempt: str,
                snag: Snag | None, seconds: float) -> None:
        place = sighting.place.label() if sighting.place is not None else "unknown"
        extra: dict[str, object] = {"service": event.service, "via": event.via, "place": place,
                                    "class": str(sighting.kind)}
        if sighting.group:
            extra["group"] = sighting.group
        if travel is None:
            action, reason = Action.ACCEPT, "no impossible travel"
        elif exempt:
            action, reason = Action.ACCEPT, f"{travel.rule}: {_travel_reason(travel)}; exempt: {exempt}"
        else:
            action, reason = Action.SNAG, f"{travel.rule}: {_travel_reason(travel)}"
            assert snag is not None
            extra["snag"] = snag.public_id
            extra["mode"] = snag.mode
        self._emit(Decision("phishhook", "login", "geo-velocity", action, reason, seconds, queue_id=event.session,
                            client=sighting.address, user=event.user, extra=extra))

    def _emit(self, decision: Decision) -> None:
        if self.parts.decisions is not None:
            self.parts.decisions.emit(decision.logfmt())

    def close(self) -> None:
        """Drain the action worker (bounded), then close the stores."""
        if self.parts.worker is not None:
            self.parts.worker.close(WORKER_DRAIN)
        self.parts.snags.close()
        if self.parts.geo is not None:
            self.parts.geo.close()
        self.parts.client.close()

    # --- what Dovecot's allow and the review need ---------------------------------------------------------

    def blocked(self, user: str, address: str) -> str | None:
        """Why a login must be refused now (the account or the address is blocked), or None. One MGET."""
        names = [block_keys.block_user(self.parts.prefix, user)] if user else []
        if address:
            names.append(f"{self.parts.prefix}{block_keys.BLOCK_CLIENT}{address}")
        if not names:
            return None
        found = self.parts.client.mget(names)
        for name, value in zip(names, found, strict=True):
            if value is not None:
                return "account blocked" if block_keys.BLOCK_USER in name else "address blocked"
        return None


def _travel_reason(travel: Travel) -> str:
    before, after = travel.before, travel.after
    where = f"{_label(before.place)} -> {_label(after.place)}"
    speed = "instantly" if travel.hours <= 0 else f"{travel.speed_kmh:.0f} km/h"
    return f"{where}, {travel.distance_km:.0f} km in {travel.hours:.2f} h ({speed})"


def _sighting_rows(travel: Travel) -> list[dict[str, object]]:
    """The two logins of a travel as the ticket lists them: the later with its distance, hours and speed."""
    first = {"at": travel.before.at, "address": travel.before.address, "place": _label(travel.before.place)}
    speed = travel.speed_kmh if travel.speed_kmh != float("inf") else None
    second = {"at": travel.after.at, "address": travel.after.address, "place": _label(travel.after.place),
              "distance_km": travel.distance_km, "hours": travel.hours, "speed_kmh": speed}
    return [first, second]


def _label(place: Place | None) -> str:
    return place.label() if place is not None else "unknown"
