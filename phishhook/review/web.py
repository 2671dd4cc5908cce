"""The security team's review page: the snags, each one's evidence (the login timeline, the messages, what
the actions did, its audit log) and the verdicts, served on ``[phishhook.review] listen`` by
``mailwarden phish serve`` (``phishhook/service.py`` mounts ``review_app``).

The verdicts call ``phishhook.resolution.Resolver``, the same code as ``mailwarden phish confirm|release|
dismiss``, with the reviewer's login name as the actor (``review:NAME``). Every page but ``/login`` (and its
stylesheet) needs a login (``auth.py``); every POST needs the session's CSRF token (``csrf.py``). Text that
came from outside (login names, reasons, places, details) is only ever rendered by Jinja2 with autoescape
on. The stylesheet is a file of its own (``/static/review.css``), so the Content-Security-Policy allows no
inline style or script at all.

Links are relative to the path of ``public_url`` (``https://mail-admin.example.org/phish`` -> ``/phish/...``):
a reverse proxy that serves the page under a path strips that path before passing the request on.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import math
import re
import secrets
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import redis

from mailwarden.logs import get_logger, log_kv
from phishhook.review import csrf
from phishhook.review.auth import SESSION_COOKIE, Gate, LoginLimiter, PasswordCheck, actor, clean_name
from quarantine.store import StoreError

if TYPE_CHECKING:
    from starlette.applications import Starlette
    from starlette.datastructures import FormData
    from starlette.requests import Request
    from starlette.responses import Response

    from phishhook.detector import Detector
    from phishhook.snags import Snag
    from phishhook.velocity import Sighting
    from quarantine.store import QuarantineStore

log = get_logger("phishhook.review")

TEMPLATES = Path(__file__).resolve().parent.parent / "templates" / "review"
STYLESHEET = "review.css"
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}
NO_STORE = {"Cache-Control": "no-store"}
MAX_FORM_FIELDS = 16
MAX_FIELD = 4096
"""Bytes of one form field (a note is a few lines)."""
MAX_NOTE = 1000
"""Characters of a note kept."""
MAX_TRAVEL_DAYS = 366
SNAGS_SHOWN = 300
MESSAGES_SHOWN = 50
"""Held messages of one snag looked up in the quarantine."""
LOGINS_SHOWN = 50
COUNTRY = re.compile(r"^[A-Z]{2}$")
NEXT = "next"
"""Session key: the page asked for before the login, where the login leads (a ticket's link to a snag)."""
VERDICTS = ("confirm", "safe", "dismiss")
"""The verdict forms' paths: confirm compromised, confirm safe, dismiss."""
MAX_BODY = 64 * 1024
"""Bytes of a posted form: a verdict with a long note is a few kilobytes."""


class FormError(ValueError):
    """A verdict form with a value that cannot be used: the message says which field and why."""


# --- what the templates show ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimelineRow:
    at: float
    address: str
    service: str
    kind: str
    group: str
    place: str
    distance_km: float | None
    """From the previous login of the table (None: first row, or a place unknown)."""
    hours: float | None
    speed_kmh: float | None
    mark: str
    """"before"/"after": one of the snag's travel pair; "" otherwise."""


def timeline(sightings: Iterable[Sighting], travels: Iterable[dict[str, Any]] = ()) -> list[TimelineRow]:
    """The logins oldest first, each with the distance, time and implied speed from the one before it; the
    logins of each travel (``travel["before"]``/``["after"]``, sighting dicts as the evidence keeps them)
    added when the history no longer has them, and marked. A login found twice (in the history and in the
    evidence) is shown once."""
    from phishhook.velocity import Sighting, speed

    pair: dict[tuple[float, str], str] = {}
    extra: list[Sighting] = []
    for travel in travels:
        for mark in ("before", "after"):
            raw = travel.get(mark)
            if isinstance(raw, dict):
                try:
                    sighting = Sighting.from_dict(raw)
                except (KeyError, TypeError, ValueError):
                    continue
                pair.setdefault(_moment(sighting), mark)
                extra.append(sighting)
    unique: dict[tuple[float, str], Sighting] = {}
    for sighting in [*extra, *sightings]:
        unique.setdefault(_moment(sighting), sighting)
    rows: list[TimelineRow] = []
    previous: Sighting | None = None
    for sighting in sorted(unique.values(), key=lambda s: s.at):
        distance = hours = kmh = None
        if previous is not None:
            distance, hours, kmh = speed(previous, sighting)
        rows.append(TimelineRow(at=sighting.at, address=sighting.address, service=sighting.service,
                                kind=str(sighting.kind), group=sighting.group or "",
                                place=sighting.place.label() if sighting.place is not None else "unknown",
                                distance_km=distance, hours=hours, speed_kmh=kmh,
                                mark=pair.get(_moment(sighting), "")))
        previous = sighting
    return rows


def _moment(sighting: Sighting) -> tuple[float, str]:
    return round(sighting.at, 3), sighting.address


def evidences(snag: Snag) -> list[dict[str, Any]]:
    """Each kept finding's evidence (the detector's details: ``finding``, ``travel``, ``messages`` ...)."""
    return [finding.evidence for finding in snag.findings if isinstance(finding.evidence, dict)]


def travels_of(snag: Snag) -> list[dict[str, Any]]:
    """The travels of the snag's login findings, first found first."""
    return [evidence["travel"] for evidence in evidences(snag) if isinstance(evidence.get("travel"), dict)]


@dataclass(frozen=True)
class MessageRow:
    """A message that triggered an outbound finding."""

    at: object
    queue_id: str
    sender: str
    header_from: str
    recipients: object
    """A count, or the list of them."""
    subject: str
    client: str


def messages_of(snag: Snag) -> list[MessageRow]:
    """The messages of the snag's outbound findings (``messages`` lists, or a finding that is one message)."""
    rows = []
    for evidence in evidences(snag):
        if evidence.get("finding") != "outbound":
            continue
        listed = evidence.get("messages")
        items = listed if isinstance(listed, list) else [evidence]
        for item in items:
            if isinstance(item, dict):
                rows.append(MessageRow(
                    at=item.get("at"), queue_id=str(item.get("queue_id", "")), sender=str(item.get("sender", "")),
                    header_from=str(item.get("header_from", item.get("from", "")) or ""),
                    recipients=item.get("recipients", ""), subject=str(item.get("subject", "")),
                    client=str(item.get("client", evidence.get("client", "")) or "")))
    return rows


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _utc(value: object) -> str:
    """``2026-12-02 05:28:39`` (UTC) from epoch seconds, a datetime (naive ones are UTC, as the SQL store
    gives them back from SQLite) or ISO text; anything else as it is."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int | float) and math.isfinite(value):
        value = datetime.datetime.fromtimestamp(value, datetime.UTC)
    elif isinstance(value, str):
        try:
            value = datetime.datetime.fromisoformat(value)
        except ValueError:
            return str(value)
    if isinstance(value, datetime.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=datetime.UTC)
        return value.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


def _number(value: object, digits: int = 0) -> str:
    """``1,234`` (``digits`` decimals); "unknown" for NaN (a place without coordinates), "instant" for an
    infinite speed (two logins in the same second), "" for None."""
    if value is None:
        return ""
    if not isinstance(value, int | float):
        return str(value)
    if math.isnan(value):
        return "unknown"
    if math.isinf(value):
        return "instant"
    return f"{value:,.{digits}f}"


def _count(value: object) -> str:
    """A finding's recipients: a count, or the list of them."""
    if isinstance(value, list | tuple):
        return str(len(value))
    return _number(value)


def _quote(value: object) -> str:
    return urllib.parse.quote(str(value), safe="")


def environment(root: str) -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(utc=_utc, number=_number, count=_count, quote=_quote)
    env.globals["root"] = root
    return env


# --- the verdict forms ----------------------------------------------------------------------------------------


def form_text(form: FormData, name: str, limit: int = MAX_NOTE) -> str:
    value = form.get(name, "")
    if not isinstance(value, str):
        raise FormError(f"{name}: expected text")
    text = "".join(char for char in value if char in "\t\n" or ord(char) >= 32).strip()
    if len(text) > limit:
        raise FormError(f"{name}: longer than {limit} characters")
    return text


def parse_learn(form: FormData) -> Any:
    """The optional "learn" part of confirm safe; FormError names the field that is wrong."""
    from phishhook.resolution import Learn, parse_countries

    days_text = form_text(form, "travel_days", 16)
    try:
        days = float(days_text) if days_text else 0.0
    except ValueError:
        raise FormError("travel notice days: expected a number of days") from None
    if not 0 <= days <= MAX_TRAVEL_DAYS:
        raise FormError(f"travel notice days: between 0 and {MAX_TRAVEL_DAYS}")
    countries = parse_countries(form_text(form, "travel_countries", 200))
    for country in countries:
        if not COUNTRY.match(country):
            raise FormError(f"travel notice countries: {country!r} is not a two-letter country code")
    if countries and not days:
        raise FormError("travel notice countries given without days: say how many days the notice lasts")
    if days and not countries:
        raise FormError("travel notice: name the countries the user travels to (a notice for anywhere would "
                        "let any login through)")
    network = form_text(form, "allow_network", 64)
    if network:
        try:
            network = str(ipaddress.ip_network(network, strict=False))
        except ValueError:
            raise FormError(f"allow network: {network!r} is not an address or CIDR network") from None
    country = form_text(form, "allow_country", 8).upper()
    if country and not COUNTRY.match(country):
        raise FormError(f"allow country: {country!r} is not a two-letter country code")
    if not days and not network and not country:
        return None
    return Learn(days, countries, network, country)


# --- the application ------------------------------------------------------------------------------------------


Handler = Callable[["Request", str, "FormData | None"], Awaitable["Response"]]


class ReviewPage:
    """The endpoints, with what they share: the detector, the login gate, the templates."""

    def __init__(self, detector: Detector, quarantine: QuarantineStore | None = None) -> None:
        self.detector = detector
        self.quarantine = quarantine
        self.settings = detector.settings.review
        self.gate = Gate(self.settings, detector.now)
        self.passwords = PasswordCheck(self.settings.accounts)
        self.limiter = LoginLimiter(detector.parts.client, detector.parts.prefix, self.settings.failed_logins,
                                    self.settings.failed_window)
        self.root = urllib.parse.urlsplit(self.settings.public_url).path.rstrip("/")
        self.env = environment(self.root)

    # -- rendering

    def render(self, request: Request, template: str, status: int = 200, user: str = "",
               headers: dict[str, str] | None = None, **context: Any) -> Response:
        from starlette.responses import HTMLResponse

        flash = request.session.pop("flash", None)
        body = self.env.get_template(template).render(user=user, csrf_token=csrf.token(request.session),
                                                      flash=flash if isinstance(flash, dict) else None, **context)
        return HTMLResponse(body, status_code=status, headers={**NO_STORE, **(headers or {})})

    def error(self, request: Request, status: int, title: str, text: str, user: str = "",
              headers: dict[str, str] | None = None) -> Response:
        return self.render(request, "error.html.j2", status, user, headers, title=title, text=text)

    def redirect(self, path: str) -> Response:
        from starlette.responses import RedirectResponse

        return RedirectResponse(f"{self.root}{path}", status_code=303, headers=NO_STORE)

    @staticmethod
    def flash(request: Request, kind: str, text: str) -> None:
        request.session["flash"] = {"kind": kind, "text": text}

    # -- the login gate

    def peer(self, request: Request) -> str:
        return request.client.host if request.client is not None else ""

    async def form(self, request: Request) -> FormData | None:
        """The posted form, bounded; None when it cannot be read (too many fields, too large, not a form)."""
        from starlette.exceptions import HTTPException

        length = request.headers.get("content-length", "")
        if not length.isdigit() or int(length) > MAX_BODY:
            return None
        try:
            return await request.form(max_files=0, max_fields=MAX_FORM_FIELDS, max_part_size=MAX_FIELD)
        except (HTTPException, ValueError, UnicodeDecodeError):
            return None

    def protected(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` behind the login (a redirect to /login for a page, 401 for a POST) and, for a POST, the
        CSRF token (403)."""

        async def endpoint(request: Request) -> Response:
            identity = self.gate.identify(self.peer(request), request.headers)
            user = self.gate.user(identity, request.session)
            if user is None:
                if request.method == "GET":
                    raw = request.scope.get("raw_path") or request.url.path.encode()
                    request.session[NEXT] = raw.decode("latin-1")  # back here after the login (a ticket's link)
                    return self.redirect("/login")
                return self.error(request, 401, "Log in first", "This needs a login: your session has ended or "
                                  "you were never logged in. Log in again and repeat what you did.")
            form = None
            if request.method == "POST":
                form = await self.form(request)
                if form is None or not csrf.valid(request.session, form.get(csrf.FIELD)):
                    log_kv(log, logging.WARNING, "review: POST refused, CSRF token missing or wrong",
                           path=request.url.path, user=user, peer=identity.peer)
                    return self.error(request, 403, "Refused: the form's security token is missing or wrong",
                                      "The request did not come from a form of this page in your current "
                                      "session (or the session ended). Reload the page and try again.", user)
            return await handler(request, user, form)

        return endpoint

    # -- /login, /logout

    async def login_page(self, request: Request) -> Response:
        identity = self.gate.identify(self.peer(request), request.headers)
        if self.gate.user(identity, request.session) is not None:
            return self.redirect("/")
        return self.render(request, "login.html.j2", name="", problem="")

    async def login(self, request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        identity = self.gate.identify(self.peer(request), request.headers)
        form = await self.form(request)
        if form is None or not csrf.valid(request.session, form.get(csrf.FIELD)):
            log_kv(log, logging.WARNING, "review: login refused, CSRF token missing or wrong", peer=identity.peer)
            return self.error(request, 403, "Refused: the form's security token is missing or wrong",
                              "Log in from the login page of this site, with cookies allowed. Reload it and try "
                              "again.")
        raw_name, password = form.get("name", ""), form.get("password", "")
        name = clean_name(raw_name)
        if not isinstance(password, str):
            password = ""
        account = name or "-"
        counted = await run_in_threadpool(self.limiter.current, identity.address, account)
        over = self.limiter.over(counted)
        if over:
            return await run_in_threadpool(self._refuse, request, identity.address, account, over)
        ok = bool(name) and bool(password) and await run_in_threadpool(self.passwords.verify, name, password)
        if not ok:
            await run_in_threadpool(self._failed, identity.address, account)
            return self.render(request, "login.html.j2", 401, name=name,
                               problem="Wrong login name or password.")
        wanted = request.session.get(NEXT)
        self.gate.log_in(request.session, name)
        await run_in_threadpool(self.detector.parts.snags.log_audit, actor(name), "login",
                                f"review page login from {identity.address}")
        log_kv(log, logging.INFO, "review: logged in", user=name, address=identity.address)
        return self.redirect(wanted if isinstance(wanted, str) and _local_path(wanted) else "/")

    def _failed(self, address: str, account: str) -> None:
        counted = self.limiter.count(address, account)
        detail = (f"wrong password for {account!r} from {address} ({counted.address} from the address, "
                  f"{counted.account} for the name within {self.settings.failed_window:.0f} s)")
        log_kv(log, logging.WARNING, "review: login failed", name=account, address=address,
               address_failures=counted.address, name_failures=counted.account)
        self.detector.parts.snags.log_audit("review", "login-failed", detail)

    def _refuse(self, request: Request, address: str, account: str, over: str) -> Response:
        counted = self.limiter.count(address, account)
        retry = self.limiter.retry_after(address, account)
        limit = self.settings.failed_logins
        log_kv(log, logging.WARNING, "review: login refused, too many failed logins", name=account,
               address=address, by=over, attempts=max(counted.address, counted.account), retry_after=retry)
        if counted.address == limit + 1 or counted.account == limit + 1:  # the window's first refusal
            self.detector.parts.snags.log_audit(
                "review", "login-rate-limited",
                f"login for {account!r} from {address} refused: {limit} failed logins by {over} within "
                f"{self.settings.failed_window:.0f} s; further attempts refused for {retry} s")
        return self.error(request, 429, "Too many failed logins",
                          f"Logins are refused for a while after {limit} wrong passwords. Try again in "
                          f"{_minutes(retry)}.", headers={"Retry-After": str(retry)})

    async def logout(self, request: Request, user: str, _form: FormData | None) -> Response:
        request.session.clear()
        log_kv(log, logging.INFO, "review: logged out", user=user)
        return self.redirect("/login")

    # -- pages

    async def snags(self, request: Request, user: str, _form: FormData | None) -> Response:
        """The snags waiting for a verdict (however old), then the decided ones, newest first."""
        from starlette.concurrency import run_in_threadpool

        from phishhook.snags import UNDECIDED, SnagState

        only = clean_name(request.query_params.get("user", "")).lower() or None
        decided = [state for state in SnagState if state not in UNDECIDED]
        store = self.detector.parts.snags
        waiting = await run_in_threadpool(store.list, UNDECIDED, only, SNAGS_SHOWN)
        rest = await run_in_threadpool(store.list, decided, only, SNAGS_SHOWN)
        return self.render(request, "snags.html.j2", user=user, waiting=waiting, rest=rest, only=only or "")

    def _snag_context(self, snag: Snag) -> dict[str, Any]:
        travels = travels_of(snag)
        rows = timeline(self.detector.history.recent(snag.user, LOGINS_SHOWN), travels)
        pairs = [(_row_of(rows, travel.get("before")), _row_of(rows, travel.get("after")), travel)
                 for travel in travels]
        return {"snag": snag, "state": str(snag.state), "rows": rows, "pairs": [p for p in pairs if p[0] and p[1]],
                "messages": messages_of(snag), "held": self._held(snag),
                "audit": self.detector.parts.snags.audit(snag.public_id)}

    def _held(self, snag: Snag) -> list[Any]:
        """The quarantine rows of the messages held for the snag, when the page has the quarantine store."""
        if self.quarantine is None or not snag.message_ids:
            return []
        found = (self.quarantine.get(public_id) for public_id in snag.message_ids[:MESSAGES_SHOWN])
        return [record for record in found if record is not None]

    async def snag(self, request: Request, user: str, _form: FormData | None) -> Response:
        from starlette.concurrency import run_in_threadpool

        public_id = request.path_params["public_id"]
        snag = await run_in_threadpool(self.detector.parts.snags.get, public_id)
        if snag is None:
            return self.error(request, 404, "No such snag", f"There is no snag {public_id}.", user)
        context = await run_in_threadpool(self._snag_context, snag)
        return self.render(request, "snag.html.j2", user=user, problem="", **context)

    def verdict_on(self, verb: str) -> Handler:
        async def handler(request: Request, user: str, form: FormData | None) -> Response:
            return await self.verdict(request, user, form, verb)

        return handler

    async def verdict(self, request: Request, user: str, form: FormData | None, verb: str) -> Response:
        """POST /snags/ID/confirm|safe|dismiss: the Resolver's verdict, then back to the snag with a flash
        message; 409 with the snag page when another reviewer was first (or the state forbids it)."""
        from starlette.concurrency import run_in_threadpool

        from phishhook.resolution import Resolver
        from phishhook.snags import SnagStateError

        assert form is not None
        public_id = request.path_params["public_id"]
        resolver = Resolver(self.detector)
        snag = await run_in_threadpool(self.detector.parts.snags.get, public_id)
        if snag is None:
            return self.error(request, 404, "No such snag", f"There is no snag {public_id}.", user)
        try:
            note = form_text(form, "note")
            learn = parse_learn(form) if verb == "safe" else None
            if verb == "confirm":
                resolved = await run_in_threadpool(resolver.confirm_compromised, public_id, actor(user), note)
                done = "Confirmed compromised: the blocks stay."
            elif verb == "safe":
                resolved = await run_in_threadpool(resolver.confirm_safe, public_id, actor(user), note, learn)
                done = "Confirmed safe: the account is unblocked everywhere."
            else:
                resolved = await run_in_threadpool(resolver.dismiss, public_id, actor(user), note)
                done = "Dismissed: the account is unblocked, nothing learnt."
        except ValueError as exc:  # FormError, SnagStateError (409), or the store refusing what was learnt
            status = 409 if isinstance(exc, SnagStateError) else 400
            log_kv(log, logging.INFO, "review: verdict refused", snag=public_id, verdict=verb, user=user,
                   error=str(exc))
            context = await run_in_threadpool(self._snag_context, snag)
            return self.render(request, "snag.html.j2", status, user=user, problem=str(exc), **context)
        undone = [f"{r.name} {'ok' if r.ok else 'FAILED'}" for r in resolved.undone]
        text = " ".join([done, *([f"Undone: {', '.join(undone)}."] if undone else []),
                         *([f"Learnt: {', '.join(resolved.learnt)}."] if resolved.learnt else [])])
        failed = any(not r.ok for r in resolved.undone)
        self.flash(request, "error" if failed else "ok", text)
        log_kv(log, logging.INFO, "review: verdict", snag=public_id, verdict=verb, user=user,
               undone=",".join(undone), learnt=",".join(resolved.learnt))
        return self.redirect(f"/snags/{_quote(public_id)}")

    async def audit(self, request: Request, user: str, _form: FormData | None) -> Response:
        from starlette.concurrency import run_in_threadpool

        entries = await run_in_threadpool(self.detector.parts.snags.audit, None, 500)
        return self.render(request, "audit.html.j2", user=user, entries=entries)

    async def logins(self, request: Request, user: str, _form: FormData | None) -> Response:
        from starlette.concurrency import run_in_threadpool

        login = clean_name(request.path_params["user"]).lower()
        recent = await run_in_threadpool(self.detector.history.recent, login, LOGINS_SHOWN) if login else []
        snags = await run_in_threadpool(self.detector.parts.snags.list, None, login, 20) if login else []
        return self.render(request, "logins.html.j2", user=user, login=login, rows=timeline(recent), snags=snags)

    async def unavailable(self, request: Request, exc: Exception) -> Response:
        """A backend that did not answer (the SQL store, Redis): 503 with what failed, logged; a verdict may
        have been half done (the state changed, an unblock not), and the snag's page then says so."""
        what = str(exc) if isinstance(exc, StoreError) else f"Redis did not answer: {exc}"
        log_kv(log, logging.ERROR, "review: backend unavailable", path=request.url.path, error=what)
        return self.error(request, 503, "A backend did not answer", f"{what}. Look at the snag again before "
                          "repeating a verdict: the state may have changed already.")

    async def stylesheet(self, _request: Request) -> Response:
        from starlette.responses import Response

        return Response((TEMPLATES / STYLESHEET).read_bytes(), media_type="text/css",
                        headers={"Cache-Control": "max-age=3600"})


def _row_of(rows: list[TimelineRow], raw: object) -> TimelineRow | None:
    if not isinstance(raw, dict) or not _finite(raw.get("at")):
        return None
    moment = (round(float(raw["at"]), 3), str(raw.get("address", "")))
    return next((row for row in rows if (round(row.at, 3), row.address) == moment), None)


def _local_path(path: object) -> bool:
    """Whether ``path`` is a path of this page (not ``//host/...``, not a URL): where a login may lead."""
    return isinstance(path, str) and path.startswith("/") and not path.startswith("//") and "\\" not in path \
        and len(path) < 1000


def _minutes(seconds: int) -> str:
    return f"{seconds} seconds" if seconds < 120 else f"{(seconds + 59) // 60} minutes"


class SecurityHeaders:
    """Adds the security headers to every response of the review page."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                from starlette.datastructures import MutableHeaders

                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)


def review_app(detector: Detector, quarantine: QuarantineStore | None = None) -> Starlette:
    """The review page's ASGI application (``[phishhook.review]`` of the detector's settings). With
    ``quarantine``, a snag's page also lists the messages held for it."""
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.middleware.sessions import SessionMiddleware
    from starlette.routing import Route

    settings = detector.settings.review
    page = ReviewPage(detector, quarantine)
    secret = settings.session_secret or secrets.token_urlsafe(48)
    routes = [
        Route("/login", page.login_page, methods=["GET"]),
        Route("/login", page.login, methods=["POST"]),
        Route("/logout", page.protected(page.logout), methods=["POST"]),
        Route("/", page.protected(page.snags), methods=["GET"]),
        Route("/snags/{public_id}", page.protected(page.snag), methods=["GET"]),
        *[Route(f"/snags/{{public_id}}/{verb}", page.protected(page.verdict_on(verb)), methods=["POST"])
          for verb in VERDICTS],
        Route("/audit", page.protected(page.audit), methods=["GET"]),
        Route("/logins/{user:path}", page.protected(page.logins), methods=["GET"]),
        Route(f"/static/{STYLESHEET}", page.stylesheet, methods=["GET"]),
    ]
    middleware = [Middleware(SecurityHeaders),
                  Middleware(SessionMiddleware, secret_key=secret, session_cookie=SESSION_COOKIE,
                             max_age=int(settings.session_lifetime), same_site="strict",
                             https_only=settings.secure_cookie, path=page.root or "/")]
    handlers = {StoreError: page.unavailable, redis.RedisError: page.unavailable}
    return Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
