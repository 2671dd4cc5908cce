"""``mailwarden quarantine``: list, show, release, delete, purge, migrate.

Exit codes (as every mailwarden command): 0 done; 1 nothing matched, or the action was refused or failed
for a reason of the message (unknown id, not held any more, a virus without --admin); 2 bad usage; 69
(EX_UNAVAILABLE) the store (database, message directory) or the re-injection listener could not be
reached, or the database needs ``quarantine migrate``; 78 bad config. With several ids, each is tried and
the exit code is the highest of their failures.
"""

from __future__ import annotations

import contextlib
import datetime
import getpass
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from mailwarden.cli import EX_UNAVAILABLE, CliContext, emit, fail
from mailwarden.units import format_duration, parse_duration
from quarantine.models import State
from quarantine.release import Failure, ReleaseError, release
from quarantine.store import HeldRecord, QuarantineStore, StoreError, UnknownMessage, utcnow

EXIT_FOR = {Failure.UNKNOWN: 1, Failure.NOT_HELD: 1, Failure.ADMIN_ONLY: 1, Failure.SEND: EX_UNAVAILABLE,
            Failure.OUTCOME_UNKNOWN: EX_UNAVAILABLE,
            Failure.STORE: EX_UNAVAILABLE}


@contextlib.contextmanager
def open_store(ctx: CliContext) -> Iterator[QuarantineStore]:
    """The store of the config's ``[quarantine]`` section; a store failure exits 69 with its message."""
    settings = ctx.load().section("quarantine")
    store = None
    try:
        store = QuarantineStore(settings)
        yield store
    except StoreError as exc:
        fail(str(exc), EX_UNAVAILABLE)
    finally:
        if store is not None:
            store.close()


def login_name() -> str:
    """Who runs the command: the login name of the terminal (the admin behind sudo), else the user."""
    try:
        return os.getlogin()
    except OSError:
        return getpass.getuser()


def parse_moment(option: str, text: str | None, now: datetime.datetime) -> datetime.datetime | None:
    """``2d`` (that long ago), ``2026-12-01`` or ``2026-12-01T08:00`` (UTC unless it names a zone)."""
    if text is None:
        return None
    try:
        return now - datetime.timedelta(seconds=parse_duration(text))
    except ValueError:
        pass
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        fail(f"{option} {text!r}: give a duration ago ('2d', '12h') or a date/time ('2026-12-01', "
             "'2026-12-01T08:00', UTC unless a zone is given)", 2)
    return moment.replace(tzinfo=datetime.UTC) if moment.tzinfo is None else moment


def when(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def shown(text: str) -> str:
    """Text from a message (a subject, a sender) made safe for a terminal: control characters (an escape
    sequence in a hostile header) written as escapes."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


def _line(record: HeldRecord) -> str:
    return (f"{record.public_id}  {when(record.held_at)}  {record.state:9} {shown(record.kind):9} "
            f"{shown(record.recipient)}  <- {shown(record.sender) or '<>'}  {shown(record.subject)!r}  "
            f"({shown(record.check)}: {shown(record.reason)})")


def _details(record: HeldRecord) -> str:
    state = f"{record.state} by {record.state_by} at {when(record.state_at)}"
    if record.released_queue_id:
        state += f", re-injected as {record.released_queue_id}"
    kept = "delivered" if record.state in (State.DELIVERED, State.REPORTED) else "held"
    rows = [("id", record.public_id), ("state", state), ("recipient", record.recipient),
            ("mailbox", record.mailbox), (kept, f"{when(record.held_at)} by {record.check}: {record.kind}"),
            ("reason", record.reason), ("sender", record.sender or "<>"), ("from", record.header_from),
            ("subject", record.subject), ("date", record.date), ("received", when(record.received_at)),
            ("queue id", record.queue_id), ("client", record.client_address), ("sasl user", record.auth_user or "-"),
            ("size", f"{record.size} bytes ({record.storage})")]
    return "\n".join(f"{name:10} {shown(value)}" for name, value in rows)


def finish(results: list[dict[str, Any]], codes: list[int], as_json: bool) -> None:
    """Report per-id results; a single failed id is an ordinary error (one line, its exit code)."""
    failed = [result for result in results if not result["ok"]]
    if len(results) == 1 and failed:
        fail(failed[0]["error"], codes[0])
    if as_json:
        emit({"ok": not failed, "results": results}, True, "")
    else:
        for result in results:
            if result["ok"]:
                click.echo(result["message"])
            else:
                click.echo(f"mailwarden: {result['error']}", err=True)
    if failed:
        sys.exit(max(codes))


@click.group("quarantine")
def quarantine_group() -> None:
    """The commands; ``mailwarden quarantine`` (capability.py) loads them when one of them runs."""


@quarantine_group.command("list")
@click.option("--recipient", metavar="ADDRESS", help="Held for this recipient.")
@click.option("--mailbox", metavar="ADDRESS", help="Held for this mailbox (aliases resolved).")
@click.option("--sender", metavar="ADDRESS", help="From this envelope sender ('' for the null sender).")
@click.option("--since", metavar="WHEN", help="Held since: a duration ago ('2d') or a date/time (UTC).")
@click.option("--until", metavar="WHEN", help="Held before: a duration ago or a date/time (UTC).")
@click.option("--kind", metavar="KIND", help="virus, heuristic, banned, spam ...")
@click.option("--state", type=click.Choice([str(s) for s in State]),
              help="held, releasing, released ..., delivered (tagged spam, recorded).")
@click.option("--limit", type=click.IntRange(min=1), help="At most this many, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print the messages as JSON.")
@click.pass_obj
def list_command(ctx: CliContext, recipient: str | None, mailbox: str | None, sender: str | None,
                 since: str | None, until: str | None, kind: str | None, state: str | None, limit: int | None,
                 as_json: bool) -> None:
    """List held messages, newest first (every state unless --state is given: tagged spam that was delivered
    and recorded too, as state delivered; --state held for held mail only)."""
    now = utcnow()
    start, end = parse_moment("--since", since, now), parse_moment("--until", until, now)
    with open_store(ctx) as store:
        found = store.find(recipient=recipient, mailbox=mailbox, sender=sender, since=start, until=end, kind=kind,
                           state=state, limit=limit)
    if not found:
        fail("no quarantined message matches", 1)
    emit([record.as_dict() for record in found], as_json, "\n".join(_line(record) for record in found))


@quarantine_group.command("show")
@click.argument("public_id", metavar="ID")
@click.option("--raw", is_flag=True, help="Print the message as received (bytes, unchanged).")
@click.option("--json", "as_json", is_flag=True, help="Print the record as JSON.")
@click.pass_obj
def show_command(ctx: CliContext, public_id: str, raw: bool, as_json: bool) -> None:
    """Show what is known about one held message, or the message itself with --raw."""
    if raw and as_json:
        fail("give --raw or --json, not both", 2)
    with open_store(ctx) as store:
        record = store.get(public_id)
        if record is None:
            fail(f"no quarantined message {public_id}", 1)
        if raw:
            try:
                out = sys.stdout.buffer
                with store.open_raw(public_id) as handle:
                    while chunk := handle.read(1 << 16):
                        out.write(chunk)
                out.flush()
            except UnknownMessage as exc:
                fail(str(exc), 1)
            return
    emit(record.as_dict(), as_json, _details(record))


Teach = Callable[[QuarantineStore, str, str], str]
"""(store, public id, "spam" | "ham") -> a note for the result ("" when the row teaches nothing)."""


@contextlib.contextmanager
def bayes_teacher(ctx: CliContext, enabled: bool) -> Iterator[Teach]:
    """What a release (ham) or delete (spam) of a message the SpamAssassin milter held teaches spamd's Bayes
    (milters/spam_learning.py; spamd's client is opened at the first such message)."""
    clients: list[Any] = []

    def teach(store: QuarantineStore, public_id: str, kind: str) -> str:
        record = store.get(public_id)
        if not enabled or record is None:
            return ""
        from milters.spam_learning import LEARNED_KINDS, learn_held
        from milters.spamd_client import SpamdClient

        if record.kind not in LEARNED_KINDS:
            return ""
        settings = ctx.load().section("milters").spamassassin
        if not clients:
            clients.append(SpamdClient(settings.spamd))
        return learn_held(clients[0], settings, store, record, kind)  # type: ignore[arg-type]

    try:
        yield teach
    finally:
        for client in clients:
            client.close()


LEARN_OPTION = click.option("--learn/--no-learn", default=True, show_default=True,
                            help="Teach spamd's Bayes from this decision (messages the spam milter held).")


@quarantine_group.command("release")
@click.argument("public_ids", metavar="ID...", nargs=-1, required=True)
@click.option("--admin", is_flag=True, help="Release kinds that need an admin's decision (a virus) too.")
@click.option("--by", metavar="NAME", help="Recorded as who released it (default: your login name).")
@LEARN_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_obj
def release_command(ctx: CliContext, public_ids: tuple[str, ...], admin: bool, by: str | None, learn: bool,
                    as_json: bool) -> None:
    """Re-inject held messages, each to the one recipient it was held for, with its original sender and
    bytes, through the [quarantine] reinject listener. A released spam is learned as ham (--no-learn: not)."""
    who = by or login_name()
    results: list[dict[str, Any]] = []
    codes: list[int] = []
    with open_store(ctx) as store, bayes_teacher(ctx, learn) as teach:
        for public_id in public_ids:
            try:
                done = release(store, public_id, who, admin=admin)
            except ReleaseError as exc:
                results.append({"id": public_id, "ok": False, "error": str(exc), "failure": str(exc.failure)})
                codes.append(EXIT_FOR[exc.failure])
                continue
            note = teach(store, public_id, "ham")
            results.append({"id": public_id, "ok": True, "recipient": done.recipient, "queue_id": done.queue_id,
                            "by": who, "bayes": note, "message": f"{public_id} released to {done.recipient}"
                            + (f" (queued as {done.queue_id})" if done.queue_id else "")
                            + (f"; {note}" if note else "")})
            codes.append(0)
    finish(results, codes, as_json)


@quarantine_group.command("delete")
@click.argument("public_ids", metavar="ID...", nargs=-1, required=True)
@click.option("--by", metavar="NAME", help="Recorded as who deleted it (default: your login name).")
@LEARN_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_obj
def delete_command(ctx: CliContext, public_ids: tuple[str, ...], by: str | None, learn: bool,
                   as_json: bool) -> None:
    """Delete held messages (for their recipient only; the bytes go at the next purge once no recipient
    holds the message). A deleted spam is learned as spam (--no-learn: not)."""
    who = by or login_name()
    results: list[dict[str, Any]] = []
    codes: list[int] = []
    with open_store(ctx) as store, bayes_teacher(ctx, learn) as teach:
        for public_id in public_ids:
            if store.transition(public_id, [State.HELD], State.DELETED, who):
                note = teach(store, public_id, "spam")
                results.append({"id": public_id, "ok": True, "by": who, "bayes": note,
                                "message": f"{public_id} deleted" + (f"; {note}" if note else "")})
                codes.append(0)
                continue
            record = store.get(public_id)
            error = (f"no quarantined message {public_id}" if record is None
                     else f"{public_id} is not held (it is {record.state}): not deleted")
            if record is not None and record.state in (State.DELIVERED, State.REPORTED):
                error += " (it was delivered to its recipient: their mailbox has it)"
            results.append({"id": public_id, "ok": False, "error": error})
            codes.append(1)
    finish(results, codes, as_json)


@quarantine_group.command("purge")
@click.option("--older-than", metavar="DURATION",
              help="Expire what was held longer than this (default: [quarantine] retention).")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.pass_obj
def purge_command(ctx: CliContext, older_than: str | None, as_json: bool) -> None:
    """Expire messages held longer than the retention, forget older records, remove the bytes no recipient
    holds any more (the nightly job)."""
    with open_store(ctx) as store:
        seconds = store.settings.retention
        if older_than is not None:
            try:
                seconds = parse_duration(older_than)
            except ValueError as exc:
                fail(f"--older-than: {exc}", 2)
        purged = store.purge(store.now() - datetime.timedelta(seconds=seconds))
    emit({"older_than_seconds": seconds, **purged.__dict__}, as_json,
         f"older than {format_duration(seconds)}: {purged.expired} expired, {purged.unstuck} unfinished "
         f"release(s) held again, {purged.forgotten} record(s) "
         f"forgotten, {purged.raw_removed} message(s) and {purged.orphans_removed} orphaned file(s) removed")


@quarantine_group.command("migrate")
@click.option("--json", "as_json", is_flag=True, help="Print the revisions as JSON.")
@click.pass_obj
def migrate_command(ctx: CliContext, as_json: bool) -> None:
    """Create the catalogue, or upgrade it to the schema this version needs (run after each upgrade of
    mailwarden, before the milters start)."""
    with open_store(ctx) as store:
        before, after = store.migrate()
    human = (f"{store.where}: already at revision {after}" if before == after
             else f"{store.where}: upgraded from {before or 'empty'} to revision {after}")
    emit({"ok": True, "database": store.where, "before": before, "after": after}, as_json, human)
