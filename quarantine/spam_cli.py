"""``mailwarden spam levels`` and ``mailwarden spam senders``: the per-recipient spam preferences
(``preferences.py``) from the command line.

``spam_group`` is the whole ``mailwarden spam`` group; ``quarantine/capability.py`` loads it lazily, from
every module named in its ``SPAM_COMMANDS``. Later commands of the group (``spam learn``, ``spam check``)
go in a module of their own with a click group of their own, named there too: their imports (spamd's
client) then cost nothing to the commands here, and the other way round.

Exit codes (as every mailwarden command): 0 done; 1 nothing done or nothing found (an entry already there,
or not there to remove; no levels; no entry matches the senders tested); 2 bad usage (a bad owner, pattern
or level, levels out of order); 69 (EX_UNAVAILABLE) the database unreachable, or it needs ``mailwarden
quarantine migrate``; 78 bad config. With several patterns, each is tried and the exit code is the highest
of their failures.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import click

from mailwarden.cli import CliContext, emit, fail
from quarantine.cli import finish, login_name, open_store, shown, when
from quarantine.preferences import (
    Decision,
    LevelsEntry,
    Pattern,
    SenderEntry,
    SpamPreferences,
    Specificity,
    owners_of,
    parse_owner,
)

Row = TypeVar("Row", LevelsEntry, SenderEntry)

KIND_WORDS = {Specificity.ADDRESS: "address", Specificity.ADDRESS_WILDCARD: "address with wildcards",
              Specificity.DOMAIN: "domain", Specificity.DOMAIN_WILDCARD: "domain wildcard"}


@contextlib.contextmanager
def open_preferences(ctx: CliContext) -> Iterator[SpamPreferences]:
    """The preferences in the store of ``[quarantine]`` (uncached: each command reads once); a bad owner,
    pattern or level exits 2, a store failure 69."""
    with open_store(ctx) as store:
        try:
            yield SpamPreferences(store, cache_ttl=0)
        except ValueError as exc:
            fail(str(exc), 2)


def _owner(text: str) -> str:
    try:
        return parse_owner(text)
    except ValueError as exc:
        fail(str(exc), 2)


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _levels_line(row: LevelsEntry) -> str:
    return (f"{row.owner:32} tag {_number(row.tag):6} hold {_number(row.hold):6} reject {_number(row.reject):6} "
            f"(by {shown(row.changed_by)}, {when(row.changed_at)})")


def _effective(owner: str, rows: list[LevelsEntry]) -> str:
    """What applies to ``owner``, level by level, and where each comes from."""
    parts = []
    for name in ("tag", "hold", "reject"):
        source = next((row for row in rows if getattr(row, name) is not None), None)
        parts.append(f"{name} {_number(getattr(source, name))} ({source.owner})" if source is not None
                     else f"{name} - (the milter's default)")
    return f"applies to {owner}: " + ", ".join(parts)


def _sender_line(row: SenderEntry) -> str:
    return (f"{row.owner:32} {row.kind:5}  {row.pattern:32} ({KIND_WORDS[row.specificity]}; "
            f"by {shown(row.created_by)}, {when(row.created_at)})")


def _decision_line(decision: Decision) -> str:
    return (f"{decision.kind}: {decision.sender} matches {decision.pattern} ({KIND_WORDS[decision.specificity]}), "
            f"an entry of {decision.owner}")


@click.group("spam")
def spam_group() -> None:
    """The commands; ``mailwarden spam`` (capability.py) loads them when one of them runs."""


@spam_group.group("levels")
def levels_group() -> None:
    """Score levels per mailbox or domain: tag, hold (quarantine) and reject."""


@levels_group.command("set")
@click.option("--for", "owner", required=True, metavar="OWNER", help="A mailbox (alice@example.org) or a "
              "domain (@example.org).")
@click.option("--tag", type=float, metavar="SCORE", help="Tag (X-Spam headers) from this score.")
@click.option("--hold", type=float, metavar="SCORE", help="Quarantine from this score.")
@click.option("--reject", type=float, metavar="SCORE", help="Reject from this score.")
@click.option("--by", metavar="NAME", help="Recorded as who set them (default: your login name).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def levels_set(ctx: CliContext, owner: str, tag: float | None, hold: float | None, reject: float | None,
               by: str | None, as_json: bool) -> None:
    """Set the owner's levels, replacing those set before: a level not given is not set (it comes from the
    domain, else the milter's default). They must be in order: tag <= hold <= reject."""
    who = by or login_name()
    owner = _owner(owner)
    with open_preferences(ctx) as preferences:
        preferences.set_levels(owner, tag=tag, hold=hold, reject=reject, by=who)
    emit({"ok": True, "owner": owner, "tag": tag, "hold": hold, "reject": reject, "by": who}, as_json,
         f"{owner}: tag {_number(tag)}, hold {_number(hold)}, reject {_number(reject)}")


@levels_group.command("clear")
@click.option("--for", "owner", required=True, metavar="OWNER", help="A mailbox or a domain (@example.org).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_obj
def levels_clear(ctx: CliContext, owner: str, as_json: bool) -> None:
    """Remove the owner's levels (its domain's, else the milter's defaults apply)."""
    owner = _owner(owner)
    with open_preferences(ctx) as preferences:
        cleared = preferences.clear_levels(owner)
    if not cleared:
        fail(f"{owner} has no spam levels", 1)
    emit({"ok": True, "owner": owner}, as_json, f"{owner}: levels cleared")


@levels_group.command("show")
@click.option("--for", "owner", metavar="OWNER", help="Only what applies to this mailbox (its own levels, "
              "then its domain's) or domain.")
@click.option("--json", "as_json", is_flag=True, help="Print the levels as JSON.")
@click.pass_obj
def levels_show(ctx: CliContext, owner: str | None, as_json: bool) -> None:
    """List the levels set, by owner."""
    owner, rows = _listed(ctx, owner, SpamPreferences.levels, "no spam levels are set")
    human = "\n".join(_levels_line(row) for row in rows)
    if owner is not None:
        human += "\n" + _effective(owner, rows)
    emit([row.as_dict() for row in rows], as_json, human)


def _listed(ctx: CliContext, owner: str | None, listing: Callable[[SpamPreferences, str | None], list[Row]],
            none: str) -> tuple[str | None, list[Row]]:
    """The owner parsed, and the rows of ``listing`` (for it); none at all exits 1 with ``none``."""
    owner = None if owner is None else _owner(owner)
    with open_preferences(ctx) as preferences:
        rows = listing(preferences, owner)
    if not rows:
        fail(none + (f" for {' or '.join(owners_of(owner))}" if owner else ""), 1)
    return owner, rows


@spam_group.group("senders")
def senders_group() -> None:
    """Sender white and black lists per mailbox or domain."""


@senders_group.command("add")
@click.option("--for", "owner", required=True, metavar="OWNER", help="A mailbox (alice@example.org) or a "
              "domain (@example.org).")
@click.option("--white", "kind", flag_value="white", help="Deliver mail from these senders whatever its score.")
@click.option("--black", "kind", flag_value="black", help="Quarantine mail from these senders whatever its score.")
@click.argument("patterns", metavar="PATTERN...", nargs=-1, required=True)
@click.option("--by", metavar="NAME", help="Recorded as who added them (default: your login name).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_obj
def senders_add(ctx: CliContext, owner: str, kind: str | None, patterns: tuple[str, ...], by: str | None,
                as_json: bool) -> None:
    """Add sender patterns to the owner's white or black list (an entry of the other list moves). A pattern
    with @ matches the address (bob@example.com, *@example.com, *@*.example.com), one without the domain
    (example.com, *.example.com)."""
    if kind is None:
        fail("give --white or --black", 2)
    who = by or login_name()

    def add(preferences: SpamPreferences, owner: str, text: str) -> tuple[bool, str]:
        try:
            added = preferences.add_sender(owner, text, kind, who)
        except ValueError as exc:  # the owner has MAX_SENDERS entries: the patterns before it stay added
            return False, str(exc)
        if added:
            return True, f"{owner}: {text} is {kind}listed"
        return False, f"{owner}: {text} is {kind}listed already"

    _each_pattern(ctx, owner, patterns, as_json, add)


@senders_group.command("remove")
@click.option("--for", "owner", required=True, metavar="OWNER", help="A mailbox or a domain (@example.org).")
@click.argument("patterns", metavar="PATTERN...", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.pass_obj
def senders_remove(ctx: CliContext, owner: str, patterns: tuple[str, ...], as_json: bool) -> None:
    """Remove sender patterns from the owner's lists (white or black)."""

    def remove(preferences: SpamPreferences, owner: str, text: str) -> tuple[bool, str]:
        if preferences.remove_sender(owner, text):
            return True, f"{owner}: {text} removed"
        return False, f"{owner} has no entry {text}"

    _each_pattern(ctx, owner, patterns, as_json, remove)


def _each_pattern(ctx: CliContext, owner: str, patterns: tuple[str, ...], as_json: bool,
                  change: Callable[[SpamPreferences, str, str], tuple[bool, str]]) -> None:
    """``change`` for each pattern, every one checked before any is changed (a typo in the third changes
    nothing: exit 2); the results reported as ``quarantine release`` reports its ids."""
    owner = _owner(owner)
    try:
        texts = [Pattern.parse(text).text for text in patterns]
    except ValueError as exc:
        fail(str(exc), 2)
    results: list[dict[str, Any]] = []
    with open_preferences(ctx) as preferences:
        for text in texts:
            ok, message = change(preferences, owner, text)
            results.append({"pattern": text, "ok": True, "message": message} if ok
                           else {"pattern": text, "ok": False, "error": message})
    finish(results, [0 if result["ok"] else 1 for result in results], as_json)


@senders_group.command("show")
@click.option("--for", "owner", metavar="OWNER", help="Only what applies to this mailbox (its own entries, "
              "then its domain's) or domain.")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
@click.pass_obj
def senders_show(ctx: CliContext, owner: str | None, as_json: bool) -> None:
    """List the white and black list entries, by owner."""
    _owner_given, rows = _listed(ctx, owner, SpamPreferences.senders, "no sender entries")
    emit([row.as_dict() for row in rows], as_json, "\n".join(_sender_line(row) for row in rows))


@senders_group.command("test")
@click.option("--for", "mailbox", required=True, metavar="MAILBOX", help="The recipient's mailbox.")
@click.argument("senders", metavar="SENDER...", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
@click.pass_obj
def senders_test(ctx: CliContext, mailbox: str, senders: tuple[str, ...], as_json: bool) -> None:
    """Which list applies to mail for MAILBOX from these senders (the envelope sender and the From address,
    as the milter passes them), and which entry decides; exit 1 when no entry matches (the score decides)."""
    mailbox = _owner(mailbox)
    with open_preferences(ctx) as preferences:
        decision = preferences.explain(mailbox, senders)
    data = {"mailbox": mailbox, "senders": list(senders), "verdict": None if decision is None else str(decision.kind),
            "decided_by": None if decision is None else decision.as_dict()}
    emit(data, as_json, f"no entry of {' or '.join(owners_of(mailbox))} matches: the score decides"
         if decision is None else _decision_line(decision))
    if decision is None:
        sys.exit(1)
