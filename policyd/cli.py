"""``mailwarden policyd`` (serve) and ``mailwarden block`` (the snagged-account list)."""

from __future__ import annotations

import getpass
import ipaddress
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import get_args

import click

from mailwarden.cli import EX_CONFIG, CliContext, backend_errors, emit, fail, serve
from mailwarden.config import ConfigError
from mailwarden.redis_sync import sync_client
from mailwarden.units import format_duration, format_time, parse_duration
from policyd.access import load_rules
from policyd.blocklist import BlockList
from policyd.greylist_admin import GreylistAdmin, Selector, TripletInfo, UnsupportedSource, update_whitelist
from policyd.postgrey_import import import_postgrey_command
from policyd.ratelimit_admin import RateLimitAdmin
from policyd.settings_types import CheckName


def _positive_duration(option: str, text: str | None, if_zero: str) -> float | None:
    """A duration flag's value in seconds (None when not given); bad or zero values exit 2 with a hint."""
    if text is None:
        return None
    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        fail(f"{option}: {exc}", 2)
    if seconds <= 0:
        fail(f"{option} {text} {if_zero}", 2)
    return seconds


@click.command("policyd")
@click.option("--listen", "-l", multiple=True, metavar="HOST:PORT|unix:PATH",
              help="Listen here instead of [policyd] listen (repeatable).")
@click.option("--redis", "redis_url", metavar="URL", help="Redis URL instead of [redis] url.")
@click.pass_obj
def policyd_command(ctx: CliContext, listen: tuple[str, ...], redis_url: str | None) -> None:
    """Serve the Postfix policy delegation protocol (check_policy_service)."""
    if listen:
        ctx.overrides["policyd.listen"] = list(listen)
    if redis_url:
        ctx.overrides["redis.url"] = redis_url
    serve(ctx.load(), ["policyd"], reread=ctx.reread)


@click.group("block")
def block_group() -> None:
    """The block list of snagged accounts and client addresses, refused by policyd with 5.7.1."""


def _blocklist(ctx: CliContext) -> BlockList:
    config = ctx.load()
    settings = config.section("redis")
    return BlockList(sync_client(settings), settings.key_prefix)


def _target(user: str | None, client: str | None) -> tuple[str, str]:
    if bool(user) == bool(client):
        fail("give exactly one of --user or --client", 2)
    return ("user", user) if user else ("client", client)  # type: ignore[return-value]


@block_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
@click.pass_obj
def block_list(ctx: CliContext, as_json: bool) -> None:
    """List blocked accounts and addresses."""
    with backend_errors():
        entries = _blocklist(ctx).entries()
    lines = [
        f"{e.kind:6} {e.value:40} since {format_time(e.at)} by {e.by or '-'}"
        f" expires {'in ' + format_duration(e.expires_in) if e.expires_in else 'never'}: {e.reason}"
        for e in entries
    ]
    emit([BlockList.as_dict(e) for e in entries], as_json, "\n".join(lines) or "block list is empty")


@block_group.command("add")
@click.option("--user", help="SASL user name to block.")
@click.option("--client", help="Client IP address or network (CIDR, e.g. 203.0.113.0/24) to block.")
@click.option("--reason", required=True, help="Why (kept with the entry and shown in logs).")
@click.option("--expires", help="Lift the block by itself after this long, e.g. 12h or 7d (not 0).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def block_add(ctx: CliContext, user: str | None, client: str | None, reason: str, expires: str | None,
              as_json: bool) -> None:
    """Block an account or a client address on every MX host at once."""
    kind, value = _target(user, client)
    seconds = _positive_duration("--expires", expires, "would lift the block at once; to lift a block, use "
                                 "'mailwarden block remove'")
    with backend_errors():
        entry = _blocklist(ctx).add(kind, value, reason, by=getpass.getuser(), expires=seconds)
    emit(BlockList.as_dict(entry), as_json, f"blocked {kind} {entry.value}")


@block_group.command("remove")
@click.option("--user")
@click.option("--client")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def block_remove(ctx: CliContext, user: str | None, client: str | None, as_json: bool) -> None:
    """Lift a block."""
    kind, value = _target(user, client)
    with backend_errors():
        removed = _blocklist(ctx).remove(kind, value)
    if not removed:
        fail(f"{kind} {value} was not blocked", 1)
    emit({"kind": kind, "value": value, "removed": removed}, as_json, f"unblocked {kind} {value}")


@click.group("access")
def access_group() -> None:
    """The access rules files."""


@access_group.command("check")
@click.argument("files", nargs=-1, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def access_check(ctx: CliContext, files: tuple[Path, ...], as_json: bool) -> None:
    """Validate access rules files (default: those of [policyd.access] files) without loading them."""
    paths = list(files) or list(ctx.load().section("policyd").access.files)
    try:
        counts = {str(path): len(load_rules(path, set(get_args(CheckName)))) for path in paths}
    except ConfigError as exc:
        fail(str(exc), EX_CONFIG)
    emit({"ok": True, "rules": counts}, as_json,
         "\n".join(f"{path}: {count} rule(s), valid" for path, count in counts.items()))


@click.group("greylist")
def greylist_group() -> None:
    """Look into the greylist and override it: show, pass, flush, expect."""


def _selector_options(func: Callable[..., None]) -> Callable[..., None]:
    for option in reversed([
        click.option("--client", metavar="IP", help="Triplets of this client's network (the configured prefix)."),
        click.option("--network", metavar="CIDR", help="Triplets of client networks inside this one."),
        click.option("--sender", metavar="ADDRESS", help="Triplets of this sender (normalised as for lookups)."),
        click.option("--sender-domain", metavar="DOMAIN", help="Triplets of senders of this domain."),
        click.option("--recipient", metavar="ADDRESS", help="Triplets of this recipient."),
        click.option("--json", "as_json", is_flag=True, help="Print the result as JSON."),
    ]):
        func = option(func)
    return func


def _admin(ctx: CliContext) -> GreylistAdmin:
    config = ctx.load()
    settings = config.section("redis")
    return GreylistAdmin(sync_client(settings), settings.key_prefix, config.section("policyd").greylist)


def _selector(**given: str | None) -> Selector:
    try:
        if client := given.get("client"):
            ipaddress.ip_address(client)
        if network := given.get("network"):
            ipaddress.ip_network(network, strict=False)
    except ValueError as exc:
        fail(str(exc), 2)
    return Selector(**given)


def _describe(info: TripletInfo) -> str:
    expires = format_duration(info.expires_in) if info.expires_in else "-"
    seen = (f"first seen {format_time(info.first_seen)}, last seen {format_time(info.last_seen)}"
            if info.first_seen is not None and info.last_seen is not None else "not seen yet")
    passed = "passed by hand" if info.passed_by_hand else "passed" if info.passed else "not passed yet"
    return (f"{info.origin} {info.sender or '<>'} -> {info.recipient}\n    {seen}, {passed}, "
            f"forgotten in {expires}: next attempt {info.verdict}")


@greylist_group.command("show")
@_selector_options
@click.pass_obj
def greylist_show(ctx: CliContext, as_json: bool, **given: str | None) -> None:
    """Show triplets (all of them without a selector) and what their next attempt would get."""
    with backend_errors():
        found = _admin(ctx).find(_selector(**given))
    if not found:
        fail("no triplet matches", 1)
    emit([asdict(info) for info in found], as_json, "\n".join(_describe(info) for info in found))


@greylist_group.command("pass")
@_selector_options
@click.pass_obj
def greylist_pass(ctx: CliContext, as_json: bool, **given: str | None) -> None:
    """Let the selected triplets through from their next attempt (a full triplet is created if unseen).

    With --client alone, the client's network (the configured prefix) also passes for one day, triplets it
    was never seen with included: a client pass, closed early by `greylist flush --client`."""
    selector = _selector(**given)
    if selector.empty():
        fail("give at least one of --client, --network, --sender, --sender-domain, --recipient", 2)
    with backend_errors():
        result = _admin(ctx).pass_(selector)
    if not result.triplets and result.client is None:
        fail("no triplet matches; give --client IP alone to let a client through, or --client, --sender and "
             "--recipient for one triplet never seen", 1)
    lines = [f"{len(result.triplets)} triplet(s) will pass"]
    if result.client is not None:
        lines.append(f"client network {result.client['network']} passes for "
                     f"{format_duration(float(result.client['expires_in']))} (new triplets too)")  # type: ignore[arg-type]
    emit({"triplets": [asdict(info) for info in result.triplets], "client": result.client}, as_json,
         "\n".join(lines))


@greylist_group.command("flush")
@_selector_options
@click.pass_obj
def greylist_flush(ctx: CliContext, as_json: bool, **given: str | None) -> None:
    """Forget the selected triplets (and a client's auto-whitelisting): their next attempt is greylisted."""
    selector = _selector(**given)
    if selector.empty():
        fail("give at least one of --client, --network, --sender, --sender-domain, --recipient", 2)
    with backend_errors():
        removed = _admin(ctx).flush(selector)
    if not removed:
        fail("nothing to flush: no triplet matches", 1)
    emit({"removed": removed}, as_json, f"{removed} key(s) removed")


@greylist_group.command("expect")
@click.option("--sender-domain", required=True, metavar="DOMAIN", help="Mail from this domain ...")
@click.option("--recipient", metavar="ADDRESS", help="... to this recipient (default: to anyone) ...")
@click.option("--for", "duration", required=True, metavar="DURATION",
              help="... is not greylisted for this long (at most policyd.greylist.expect_max, default 7d).")
@click.option("--reason", default="", help="Kept with the window, for the log and `greylist windows`.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def greylist_expect(ctx: CliContext, sender_domain: str, recipient: str | None, duration: str, reason: str,
                    as_json: bool) -> None:
    """Open a window in which mail from a domain is not greylisted (it closes by itself, or with
    `greylist unexpect`)."""
    admin = _admin(ctx)
    seconds = _positive_duration("--for", duration, "would close the window at once; to close a window, use "
                                 "'mailwarden greylist unexpect'")
    assert seconds is not None  # --for is required
    if seconds > admin.settings.expect_max:
        fail(f"--for {duration}: longer than policyd.greylist.expect_max "
             f"({format_duration(admin.settings.expect_max)}); open a shorter window, or raise expect_max", 2)
    with backend_errors():
        window = admin.expect(sender_domain, recipient, seconds, reason)
    emit(window, as_json, f"mail from {window['domain']} to {recipient or 'anyone'} is not greylisted for "
                          f"{format_duration(seconds)}")


@greylist_group.command("windows")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def greylist_windows(ctx: CliContext, as_json: bool) -> None:
    """List the open expect windows."""
    with backend_errors():
        windows = _admin(ctx).expectations()
    lines = [f"{w.get('domain')} -> {w.get('recipient') or 'anyone'}: {_left(w.get('expires_in'))}, opened "
             f"{_when(w.get('at'))} by {w.get('by') or '-'}: {w.get('reason') or '(no reason given)'}"
             for w in windows]
    emit(windows, as_json, "\n".join(lines) or "no open window")


def _left(seconds: object) -> str:
    return f"{format_duration(float(seconds))} left" if isinstance(seconds, int | float) else "no expiry"


def _when(epoch: object) -> str:
    return format_time(float(epoch)) if isinstance(epoch, int | float) else "-"


@greylist_group.command("unexpect")
@click.option("--sender-domain", required=True, metavar="DOMAIN", help="The window of this domain ...")
@click.option("--recipient", metavar="ADDRESS", help="... and this recipient (default: the one for anyone).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def greylist_unexpect(ctx: CliContext, sender_domain: str, recipient: str | None, as_json: bool) -> None:
    """Close an expect window before its time: mail from the domain is greylisted again."""
    with backend_errors():
        window = _admin(ctx).unexpect(sender_domain, recipient)
    if window is None:
        fail(f"no open window for {sender_domain} to {recipient or 'anyone'}", 1)
    emit(window, as_json, f"window for {window.get('domain')} to {recipient or 'anyone'} closed "
                          f"(was: {window.get('reason') or 'no reason given'})")


@greylist_group.command("whitelist-update")
@click.argument("source")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def greylist_whitelist_update(ctx: CliContext, source: str, as_json: bool) -> None:
    """Replace the managed client whitelist with SOURCE (a file path, file://, http:// or https:// URL),
    atomically and only if every line parses."""
    settings = ctx.load().section("policyd").greylist
    target = settings.managed_whitelist
    try:
        result = update_whitelist(source, target)
    except UnsupportedSource as exc:
        fail(str(exc), 2)
    except ConfigError as exc:
        fail(f"not a usable whitelist, nothing replaced: {exc}", 1)
    except (OSError, ValueError) as exc:
        fail(f"cannot read {source}: {exc}", 1)
    emit(result, as_json, f"{target}: {result['entries']} entries from {source}, list dated {result['dated']}")
    age = float(result["age_seconds"])  # type: ignore[arg-type]
    if age > settings.whitelist_max_age:
        click.echo(f"mailwarden: warning: this list is {format_duration(age)} old, older than "
                   f"policyd.greylist.whitelist_max_age ({format_duration(settings.whitelist_max_age)}); "
                   "policyd keeps warning that the whitelist is out of date", err=True)


@click.group("ratelimit")
def ratelimit_group() -> None:
    """See, reset and override rate-limit counters of one key (a SASL user, an address, a domain, a client)."""


def _ratelimit_admin(ctx: CliContext) -> RateLimitAdmin:
    config = ctx.load()
    settings = config.section("redis")
    return RateLimitAdmin(sync_client(settings), settings.key_prefix, config.section("policyd").ratelimit)


@ratelimit_group.command("show")
@click.argument("key")
@click.option("--limit", "name", metavar="NAME", help="Only this limit (default: every windowed limit).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ratelimit_show(ctx: CliContext, key: str, name: str | None, as_json: bool) -> None:
    """Where KEY stands against each limit now."""
    with backend_errors():
        standings = _ratelimit_admin(ctx).show(key, name)
    lines = [f"{s.limit}: {s.key} at {s.count} of {s.max if s.max is not None else 'unlimited'} per {s.window}"
             + (f" (override {s.override}"
                + (f", {format_duration(s.override_expires_in)} left)" if s.override_expires_in else ")")
                if s.override else "") for s in standings]
    emit([asdict(s) for s in standings], as_json, "\n".join(lines) or "no windowed limit")


@ratelimit_group.command("reset")
@click.argument("key")
@click.option("--limit", "name", metavar="NAME", help="Only this limit (default: every windowed limit).")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ratelimit_reset(ctx: CliContext, key: str, name: str | None, as_json: bool) -> None:
    """Forget KEY's counters: it may send again at once."""
    with backend_errors():
        removed = _ratelimit_admin(ctx).reset(key, name)
    if not removed:
        fail(f"{key} has no counter to reset", 1)
    emit({"key": key, "counters_removed": removed}, as_json, f"{removed} counter(s) of {key} reset")


@ratelimit_group.command("override")
@click.argument("key")
@click.option("--limit", "name", required=True, metavar="NAME")
@click.option("--max", "max_value", type=click.IntRange(min=1), help="A new max for this key only.")
@click.option("--exempt", is_flag=True, help="This key is not limited at all.")
@click.option("--remove", is_flag=True, help="Drop the override: the limit's own max applies again.")
@click.option("--for", "duration", metavar="DURATION", help="The override lapses by itself after this long.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def ratelimit_override(ctx: CliContext, key: str, name: str, max_value: int | None, exempt: bool, remove: bool,
                       duration: str | None, as_json: bool) -> None:
    """Raise, lift or restore one key's limit (on every MX host at once)."""
    if sum((max_value is not None, exempt, remove)) != 1:
        fail("give exactly one of --max N, --exempt, --remove", 2)
    seconds = _positive_duration("--for", duration, "would end the override at once; leave --for out for one "
                                 "without expiry, or use --remove")
    with backend_errors():
        admin = _ratelimit_admin(ctx)
        if remove:
            if not admin.remove_override(key, name):
                fail(f"{key} had no override for {name}", 1)
            emit({"key": key, "limit": name, "removed": True}, as_json, f"override of {key} for {name} removed")
            return
        value = admin.override(key, name, max_value, exempt, seconds)
    emit({"key": key, "limit": name, "override": value, "expires_in": int(seconds) if seconds else None}, as_json,
         f"{key}: {name} is now {value}" + (f" for {format_duration(seconds)}" if seconds else ""))


def register_cli(group: click.Group) -> None:
    group.add_command(policyd_command)
    group.add_command(block_group)
    group.add_command(access_group)
    greylist_group.add_command(import_postgrey_command)
    group.add_command(greylist_group)
    group.add_command(ratelimit_group)
