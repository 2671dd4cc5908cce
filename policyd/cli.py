"""``mailwarden policyd`` (serve) and ``mailwarden block`` (the snagged-account list)."""

from __future__ import annotations

import getpass
import json
import time
from pathlib import Path
from typing import get_args

import click
import redis

from mailwarden.cli import EX_CONFIG, EX_UNAVAILABLE, CliContext, emit, fail, serve
from mailwarden.config import ConfigError
from mailwarden.redis_sync import sync_client
from mailwarden.units import format_duration, parse_duration
from policyd.access import load_rules
from policyd.blocklist import BlockList
from policyd.settings import CheckName


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
    serve(ctx.load(), ["policyd"])


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
    try:
        entries = _blocklist(ctx).entries()
    except redis.RedisError as exc:
        fail(f"cannot reach Redis: {exc}", EX_UNAVAILABLE)
    lines = [
        f"{e.kind:6} {e.value:40} since {time.strftime('%Y-%m-%d %H:%M', time.localtime(e.at))} by {e.by or '-'}"
        f" expires {format_duration(e.expires_in) if e.expires_in else 'never'}: {e.reason}"
        for e in entries
    ]
    emit([BlockList.as_dict(e) for e in entries], as_json, "\n".join(lines) or "block list is empty")


@block_group.command("add")
@click.option("--user", help="SASL user name to block.")
@click.option("--client", help="Client IP address to block.")
@click.option("--reason", required=True, help="Why (kept with the entry and shown in logs).")
@click.option("--expires", help="Lift the block by itself after this long, e.g. 12h or 7d.")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def block_add(ctx: CliContext, user: str | None, client: str | None, reason: str, expires: str | None,
              as_json: bool) -> None:
    """Block an account or a client address on every MX host at once."""
    kind, value = _target(user, client)
    try:
        seconds = parse_duration(expires) if expires else None
    except ValueError as exc:
        fail(f"--expires: {exc}", 2)
    try:
        entry = _blocklist(ctx).add(kind, value, reason, by=getpass.getuser(), expires=seconds)
    except ValueError as exc:
        fail(str(exc), 2)
    except redis.RedisError as exc:
        fail(f"cannot reach Redis: {exc}", EX_UNAVAILABLE)
    emit(BlockList.as_dict(entry), as_json, f"blocked {kind} {entry.value}")


@block_group.command("remove")
@click.option("--user")
@click.option("--client")
@click.option("--json", "as_json", is_flag=True)
@click.pass_obj
def block_remove(ctx: CliContext, user: str | None, client: str | None, as_json: bool) -> None:
    """Lift a block."""
    kind, value = _target(user, client)
    try:
        removed = _blocklist(ctx).remove(kind, value)
    except ValueError as exc:
        fail(str(exc), 2)
    except redis.RedisError as exc:
        fail(f"cannot reach Redis: {exc}", EX_UNAVAILABLE)
    emit({"kind": kind, "value": value, "removed": removed}, as_json,
         f"unblocked {kind} {value}" if removed else f"{kind} {value} was not blocked")
    if not removed:
        raise SystemExit(1)


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
        if as_json:
            click.echo(json.dumps({"ok": False, "error": str(exc)}, indent=2))
            raise SystemExit(EX_CONFIG) from None
        fail(str(exc), EX_CONFIG)
    emit({"ok": True, "rules": counts}, as_json,
         "\n".join(f"{path}: {count} rule(s), valid" for path, count in counts.items()))


def register_cli(group: click.Group) -> None:
    group.add_command(policyd_command)
    group.add_command(block_group)
    group.add_command(access_group)
