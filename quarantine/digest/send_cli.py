"""``mailwarden digest send`` and ``digest status`` (send.py does the work; the ``digest`` group joins this
module's commands and the reply handler's: capability.py).

Exit codes (as every mailwarden command): 0 done (nothing due is done too); 1 some digests could not be sent
(the next run tries them again), or digests are stale (no digest for ``stale_after`` while mail waits for
one); 2 bad usage; 69 (EX_UNAVAILABLE) the database is unreachable or needs ``quarantine migrate``, or the
listener failed ``send.MAX_CONSECUTIVE_FAILURES`` sends in a row (the run stopped); 78 (EX_CONFIG) bad config, or no
``[quarantine.digest]`` section.
"""

from __future__ import annotations

import sys

import click

from mailwarden.cli import EX_CONFIG, EX_UNAVAILABLE, CliContext, emit, fail, start_logging
from quarantine.cli import open_store, when
from quarantine.digest.outbox import Outbox
from quarantine.digest.send import send_digests, status
from quarantine.digest.settings import DigestSettings
from quarantine.store import QuarantineSettings


def digest_settings(ctx: CliContext) -> tuple[QuarantineSettings, DigestSettings]:
    """The ``[quarantine]`` section and its ``[quarantine.digest]``; exits 78 when the latter is missing."""
    settings: QuarantineSettings = ctx.load().section("quarantine")
    if settings.digest is None:
        fail("no [quarantine.digest] section in the config: digests are not configured (see README, "
             "\"Digests\", and etc/mailwarden.toml)", EX_CONFIG)
    return settings, settings.digest


@click.group("digest")
def digest_group() -> None:
    """Commands of send.py."""


@digest_group.command("send")
@click.option("--owner", metavar="ADDRESS", help="This mailbox only, now, whatever its interval.")
@click.option("--dry-run", is_flag=True, help="List who would get a digest; send nothing, change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.pass_obj
def send_command(ctx: CliContext, owner: str | None, dry_run: bool, as_json: bool) -> None:
    """Send each mailbox that is due its digest of the mail held since its last one (run by
    mailwarden-digest.timer every 5 minutes; resumable, never two digests of the same mail)."""
    settings, _digest = digest_settings(ctx)
    start_logging(ctx.load())
    with open_store(ctx) as store, Outbox(settings) as outbox:
        result = send_digests(store, settings, outbox, owner=owner, dry_run=dry_run)
    data = result.as_dict() | {"ok": not (result.failed or result.stopped or result.stale), "dry_run": dry_run}
    if dry_run:
        data["would_send"] = result.would_send
        human = "\n".join([*(f"{item['owner']}: {item['held']} held ({item['interval']})"
                             for item in result.would_send),
                           f"dry run: {len(result.would_send)} digest(s) would be sent, {result.skipped} skipped "
                           f"(digests off), {result.waiting} not due yet"])
    else:
        human = (f"{result.sent} digest(s) sent, {result.failed} failed, {result.skipped} skipped (digests off), "
                 f"{result.waiting} not due yet" + (f"; {result.unknown} of a run that died counted as sent"
                                                     if result.unknown else "")
                 + (f"; admin copy {result.admin_copy}" if result.admin_copy else ""))
    emit(data, as_json, human)
    if result.stopped and not as_json:
        click.echo(f"mailwarden: stopped: {result.stopped}", err=True)
    if result.stale and not as_json:
        click.echo(f"mailwarden: warning: {result.stale.message(result.started_at)}", err=True)
    if result.stopped:
        sys.exit(EX_UNAVAILABLE)
    if result.failed or result.stale:
        sys.exit(1)


@digest_group.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.pass_obj
def status_command(ctx: CliContext, as_json: bool) -> None:
    """The last run, the last digest, mailboxes by interval, claims in progress; exits 1 when digests are
    stale (no digest for stale_after while mail waits for one)."""
    _settings, digest = digest_settings(ctx)
    with open_store(ctx) as store:
        found = status(store, digest)
        now = store.now()
    run = found.last_run
    lines = [f"last run:    {run['started_at']} on {run['host'] or '?'}: {run['sent']} sent, {run['failed']} "
             f"failed, {run['skipped']} skipped" + ("" if run["finished_at"] else " (unfinished)")
             if run else "last run:    never",
             f"last digest: {when(found.last_digest_at) if found.last_digest_at else 'never'}",
             "intervals:   " + (", ".join(f"{name} {count}" for name, count in sorted(found.intervals.items()))
                                or "no mailbox chose one (all: the site's default)"),
             f"in progress: {found.claims} claim(s)",
             f"all runs:    {found.totals['runs']} run(s), {found.totals['sent']} sent, {found.totals['failed']} "
             f"failed, {found.totals['skipped']} skipped"]
    emit(found.as_dict() | {"ok": found.stale is None}, as_json, "\n".join(lines))
    if found.stale:
        if not as_json:
            click.echo(f"mailwarden: warning: {found.stale.message(now)}", err=True)
        sys.exit(1)
