"""``mailwarden phish``: the service, logins from scripts, and the security team's review from a terminal
(``--json`` for scripts). Exit codes as every mailwarden command: 0 ok, 1 nothing matched or refused, 2 bad
usage, 69 Redis or the database unreachable, 78 bad config."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import redis

from mailwarden.cli import EX_CONFIG, EX_UNAVAILABLE, CliContext, emit, fail, start_logging, startup_errors
from mailwarden.config import require_startable
from phishhook.app import build_detector, log
from phishhook.detector import Detector
from phishhook.events import BadEvent
from phishhook.follow import follow_command
from phishhook.geo import GeoDatabaseError
from phishhook.intake import outcome_json, parse_event
from phishhook.ratelimit_signal import RateLimitWatcher, user_limits
from phishhook.resolution import Learn, Resolver, parse_countries
from phishhook.snags import Snag, SnagState, SnagStateError, UnknownEntry, UnknownSnag
from quarantine.cli import login_name, parse_moment, shown, when
from quarantine.store import QuarantineStore, SchemaBehind, StoreError


@contextlib.contextmanager
def detector_for(ctx: CliContext) -> Iterator[Detector]:
    """The detector of the config (actions run in line, no worker); backend failures exit 69."""
    config = ctx.load()
    detector = None
    try:
        detector = build_detector(config, None, background=False)
        yield detector
    except GeoDatabaseError as exc:
        fail(str(exc), EX_CONFIG)
    except SchemaBehind as exc:
        fail(str(exc), EX_CONFIG)
    except StoreError as exc:
        fail(str(exc), EX_UNAVAILABLE)
    except redis.RedisError as exc:
        fail(f"cannot reach Redis: {exc}", EX_UNAVAILABLE)
    except (SnagStateError, UnknownSnag, UnknownEntry) as exc:
        fail(str(exc).strip("'\""), 1)
    except BadEvent as exc:
        fail(str(exc), 2)
    except ValueError as exc:
        fail(str(exc), 2)
    finally:
        if detector is not None:
            detector.close()


@click.group("phish")
def phish() -> None:
    """Phished accounts: logins, snags, their review."""
    # a command's outcome is its output and exit code; the lines the detector logs for the services (an
    # account snagged ...) would repeat it on stderr through logging's last resort
    logging.getLogger(log.name).addHandler(logging.NullHandler())


phish.add_command(follow_command)


@phish.command("serve")
@click.pass_obj
def serve_command(ctx: CliContext) -> None:
    """Serve Dovecot's auth policy endpoint, the login intake and the review page until SIGTERM."""
    from phishhook.service import serve

    config = ctx.load()
    with startup_errors():
        decisions = start_logging(config)
        require_startable(config, ["phishhook", "quarantine"])
        try:
            detector = build_detector(config, decisions)
        except (GeoDatabaseError, SchemaBehind) as exc:
            fail(str(exc), EX_CONFIG)
        watcher = RateLimitWatcher(detector.parts.client, detector.parts.prefix, detector.settings.ratelimit,
                                   user_limits(config.section("policyd")), detector.rate_limit_hit)
        quarantine = QuarantineStore(config.section("quarantine")) if detector.settings.review.listen else None
        serve(detector, watcher, quarantine)


@phish.command("login")
@click.option("--user", required=True, help="The login name.")
@click.option("--address", required=True, help="The client's IP address.")
@click.option("--failed", is_flag=True, help="A failed login (counted for brute force, not located).")
@click.option("--service", default="webmail", show_default=True, help="The service logged in to.")
@click.option("--at", "at_text", metavar="WHEN", help="When: a duration ago ('1h') or a date/time (default now).")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
@click.pass_obj
def login_command(ctx: CliContext, user: str, address: str, failed: bool, service: str, at_text: str | None,
                  as_json: bool) -> None:
    """Judge one login, as the intake would (for services that can only run a command)."""
    with detector_for(ctx) as detector:
        now = detector.now()
        moment = parse_moment("--at", at_text, datetime.datetime.fromtimestamp(now, datetime.UTC))
        fields = {"user": user, "address": address, "success": not failed, "service": service,
                  "at": moment.timestamp() if moment else now}
        event = parse_event(fields, now, now - detector.settings.history.ttl, "cli")
        if failed:
            detector.failed_login(event)
            outcome = None
        else:
            outcome = detector.login(event)
        data = outcome_json(outcome)
        human = data.get("judged") or (f"{user} from {address} ({data['place'] or 'unknown place'}): "
                                       + (f"snagged, snag {data['snag']}" if data["snag"] else
                                          f"exempt: {data['exempt']}" if data["exempt"] else "accepted"))
        emit(data, as_json, str(human))


def _snag_line(snag: Snag) -> str:
    return (f"{snag.public_id}  {when(snag.created_at)}  {snag.state:<11} {snag.mode:<7} {shown(snag.user)}  "
            f"{snag.kind}: {shown(snag.reason)}")


@phish.command("list")
@click.option("--state", "states", multiple=True, type=click.Choice([str(s) for s in SnagState]),
              help="Only snags in this state (repeatable); default all.")
@click.option("--user", help="Only this login name's snags.")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the snags as JSON.")
@click.pass_obj
def list_command(ctx: CliContext, states: tuple[str, ...], user: str | None, limit: int, as_json: bool) -> None:
    """The snags, newest first."""
    with detector_for(ctx) as detector:
        snags = detector.parts.snags.list(states=[SnagState(s) for s in states] or None,
                                          user=user.strip().lower() if user else None, limit=limit)
        emit([snag.as_dict() for snag in snags], as_json, "\n".join(map(_snag_line, snags)) or "no snags")


@phish.command("show")
@click.argument("public_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="Print the snag, its actions, audit and logins as JSON.")
@click.pass_obj
def show_command(ctx: CliContext, public_id: str, as_json: bool) -> None:
    """One snag: its evidence, what was done, who reviewed it, and the user's recent logins."""
    with detector_for(ctx) as detector:
        snag = detector.parts.snags.get(public_id)
        if snag is None:
            fail(f"no snag {public_id!r} (mailwarden phish list shows them)", 1)
        audit = detector.parts.snags.audit(public_id)
        logins = detector.history.recent(snag.user, 20)
        data = {"snag": snag.as_dict(), "audit": [entry.as_dict() for entry in audit],
                "logins": [sighting.as_dict() for sighting in logins]}
        lines = [_snag_line(snag), "evidence: " + json.dumps(snag.evidence, indent=2, default=str)]
        lines += ["actions:"] + [f"  {a.name}: {'ok' if a.ok else 'FAILED'} {shown(a.detail)}" for a in snag.actions]
        lines += ["audit:"] + [f"  {when(e.at)} {shown(e.actor)} {e.action} {shown(e.detail)}" for e in audit]
        lines += ["recent logins:"] + [_login_line(s) for s in logins]
        emit(data, as_json, "\n".join(lines))


def _login_line(sighting: Any) -> str:
    moment = datetime.datetime.fromtimestamp(sighting.at, datetime.UTC)
    place = sighting.place.label() if sighting.place is not None else "unknown"
    group = f" ({sighting.group})" if sighting.group else ""
    return f"  {when(moment)}  {sighting.address:<39} {sighting.service:<8} {sighting.kind}{group}  {place}"


@phish.command("logins")
@click.argument("user")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(min=1))
@click.option("--json", "as_json", is_flag=True, help="Print the logins as JSON.")
@click.pass_obj
def logins_command(ctx: CliContext, user: str, limit: int, as_json: bool) -> None:
    """A user's recent logins, newest first: time, address, service, class and place."""
    with detector_for(ctx) as detector:
        sightings = detector.history.recent(user.strip().lower(), limit)
        emit([s.as_dict() for s in sightings], as_json,
             "\n".join(map(_login_line, sightings)) or f"no logins of {user} on record")


def _resolved(resolved: Any, as_json: bool, verb: str) -> None:
    snag = resolved.snag
    lines = [f"snag {snag.public_id} ({shown(snag.user)}): {verb}"]
    lines += [f"  {r.name}: {'ok' if r.ok else 'FAILED'} {shown(r.detail)}" for r in resolved.undone]
    lines += [f"  learnt: {item}" for item in resolved.learnt]
    emit(resolved.as_dict(), as_json, "\n".join(lines))


@phish.command("confirm")
@click.argument("public_id", metavar="ID")
@click.option("--note", default="", help="Why (kept in the audit log).")
@click.option("--by", metavar="NAME", help="Recorded as who decided (default: your login name).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def confirm_command(ctx: CliContext, public_id: str, note: str, by: str | None, as_json: bool) -> None:
    """Confirm the account compromised: the blocks stay."""
    with detector_for(ctx) as detector:
        _resolved(Resolver(detector).confirm_compromised(public_id, by or f"cli:{login_name()}", note), as_json,
                  "confirmed compromised, the blocks stay")


@phish.command("release")
@click.argument("public_id", metavar="ID")
@click.option("--note", default="", help="Why (kept in the audit log).")
@click.option("--travel-days", type=click.FloatRange(min=0), default=0,
              help="Also register a travel notice for the user from now, this many days.")
@click.option("--countries", default="", help="The travel notice's countries (ISO codes, comma-separated).")
@click.option("--allow-network", default="", metavar="CIDR", help="Also allow this network for the user.")
@click.option("--allow-country", default="", metavar="CC", help="Also allow this country for the user.")
@click.option("--by", metavar="NAME", help="Recorded as who decided (default: your login name).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def release_command(ctx: CliContext, public_id: str, note: str, travel_days: float, countries: str,
                    allow_network: str, allow_country: str, by: str | None, as_json: bool) -> None:
    """Confirm the account safe (a false positive): unblock it everywhere, and optionally learn."""
    learn = Learn(travel_days, parse_countries(countries), allow_network.strip(), allow_country.strip().upper())
    with detector_for(ctx) as detector:
        _resolved(Resolver(detector).confirm_safe(public_id, by or f"cli:{login_name()}", note, learn), as_json,
                  "confirmed safe, unblocked")


@phish.command("dismiss")
@click.argument("public_id", metavar="ID")
@click.option("--note", default="", help="Why (kept in the audit log).")
@click.option("--by", metavar="NAME", help="Recorded as who decided (default: your login name).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def dismiss_command(ctx: CliContext, public_id: str, note: str, by: str | None, as_json: bool) -> None:
    """Close a snag without a verdict: unblocked, nothing learnt."""
    with detector_for(ctx) as detector:
        _resolved(Resolver(detector).dismiss(public_id, by or f"cli:{login_name()}", note), as_json,
                  "dismissed, unblocked")


@phish.group("travel")
def travel_group() -> None:
    """Travel notices: logins from where a user said they would be do not snag."""


@travel_group.command("add")
@click.argument("user")
@click.option("--countries", default="", help="ISO country codes, comma-separated (none: anywhere).")
@click.option("--places", default="", help="Cities, comma-separated (optional).")
@click.option("--from", "starts", metavar="WHEN", help="Start: a date/time (default now).")
@click.option("--until", "ends", metavar="WHEN", required=True, help="End: a date/time ('2026-12-20').")
@click.option("--note", default="", help="Why (kept in the audit log).")
@click.option("--by", metavar="NAME", help="Recorded as who registered it (default: your login name).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def travel_add(ctx: CliContext, user: str, countries: str, places: str, starts: str | None, ends: str, note: str,
               by: str | None, as_json: bool) -> None:
    """Register a travel notice for USER."""
    now = datetime.datetime.now(datetime.UTC)
    start = parse_future(starts, now) or now
    end = parse_future(ends, now)
    assert end is not None
    with detector_for(ctx) as detector:
        notice = detector.parts.snags.add_travel(user.strip().lower(), list(parse_countries(countries)),
                                                 [p.strip() for p in places.split(",") if p.strip()],
                                                 starts_at=start, ends_at=end, by=by or f"cli:{login_name()}",
                                                 note=note)
        emit(notice.as_dict(), as_json, f"travel notice {notice.id} for {user}: {when(start)} .. {when(end)}")


def parse_future(text: str | None, now: datetime.datetime) -> datetime.datetime | None:
    """``2026-12-20``, ``2026-12-20T08:00`` (UTC unless it names a zone) or a duration from now (``14d``)."""
    if text is None:
        return None
    from mailwarden.units import parse_duration

    try:
        return now + datetime.timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        fail(f"{text!r}: give a date/time ('2026-12-20', '2026-12-20T08:00', UTC unless a zone is given) or a "
             "duration from now ('14d')", 2)
    return moment.replace(tzinfo=datetime.UTC) if moment.tzinfo is None else moment


@travel_group.command("list")
@click.argument("user", required=False)
@click.option("--all", "everything", is_flag=True, help="Past notices too.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def travel_list(ctx: CliContext, user: str | None, everything: bool, as_json: bool) -> None:
    """Travel notices (current ones unless --all)."""
    with detector_for(ctx) as detector:
        notices = detector.parts.snags.list_travel(user.strip().lower() if user else None,
                                                   current_only=not everything)
        emit([n.as_dict() for n in notices], as_json, "\n".join(
            f"{n.id}  {shown(n.user)}  {when(n.starts_at)} .. {when(n.ends_at)}  "
            f"{','.join(n.countries) or 'anywhere'} {','.join(n.places)}  {shown(n.note)}" for n in notices)
             or "no travel notices")


@travel_group.command("remove")
@click.argument("notice_id", type=int)
@click.option("--by", metavar="NAME")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def travel_remove(ctx: CliContext, notice_id: int, by: str | None, as_json: bool) -> None:
    """Remove a travel notice."""
    with detector_for(ctx) as detector:
        removed = detector.parts.snags.remove_travel(notice_id, by or f"cli:{login_name()}")
        emit({"ok": True, "removed": removed.as_dict()}, as_json, f"travel notice {notice_id} removed")


@phish.command("passwd")
@click.argument("name")
def passwd_command(name: str) -> None:
    """Print an argon2 hash for a review account (asks for the password), to paste into the config as
    ``[phishhook.review.accounts] NAME = "..."``."""
    from argon2 import PasswordHasher

    password = click.prompt(f"password for {name}", hide_input=True, confirmation_prompt=True)
    if len(password) < 10:
        fail("use at least 10 characters", 2)
    click.echo(f'{name} = "{PasswordHasher().hash(password)}"')


@phish.group("relays")
def relays_group() -> None:
    """The relay networks (Outlook, Google, Apple Private Relay, zero-trust egress) judged by their own rule."""


@relays_group.command("import")
@click.argument("group")
@click.argument("source", type=click.File("r"))
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def relays_import(ctx: CliContext, group: str, source: Any, as_json: bool) -> None:
    """Replace GROUP's networks in the site relay file ([phishhook.networks] relay_file) with those listed in
    SOURCE (one CIDR a line, or Apple's egress-ip-ranges.csv; '-' for standard input)."""
    from phishhook.networks import import_relay_list, read_relay_file, write_relay_file

    settings = ctx.load().section("phishhook").networks
    if settings.relay_file is None:
        fail("[phishhook.networks] relay_file is not set: name the site's relay file first", EX_CONFIG)
    try:
        networks = import_relay_list(group, source.read())
    except ValueError as exc:
        fail(str(exc), 2)
    path = Path(settings.relay_file)
    try:
        existing = read_relay_file(path) if path.exists() else {}
    except ValueError as exc:
        fail(str(exc), EX_CONFIG)
    groups: dict[str, list[str]] = {name: list(kept.networks) for name, kept in existing.items()}
    sources = {name: kept.source for name, kept in existing.items()}
    groups[group] = networks
    sources[group] = getattr(source, "name", "") or ""
    write_relay_file(path, groups, sources=sources)
    emit({"ok": True, "group": group, "networks": len(networks), "file": str(path)}, as_json,
         f"{group}: {len(networks)} networks written to {path}; `systemctl reload mailwarden-phishhook` applies them")
