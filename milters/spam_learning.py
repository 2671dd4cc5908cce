"""Teaching spamd's Bayes: ``mailwarden spam learn``, and the quarantine's release and delete.

One function trains, ``learn``: through spamd itself (TELL, ``Set: local``), as a user, so the database
trained is the one spamd reads when it scores that user's mail (its ``--virtual-config-dir`` or home), and
no ``sa-learn`` has to run as spamd's user on spamd's host. A rescued false positive (a release) is learned
as ham for its mailbox, a confirmed spam (a delete) as spam: only for rows the SpamAssassin milter held
(kind ``spam`` or ``blacklisted``); a virus or a banned attachment teaches Bayes nothing.

Messages are read from files, maildirs (``cur`` and ``new``), directories of files and mbox files (a file
that starts with ``From ``), one at a time.
"""

from __future__ import annotations

import mailbox
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from milters.spamassassin import SpamAssassinSettings
from milters.spamd_client import Kind, SpamdClient, SpamdError
from quarantine.store import HeldRecord, QuarantineStore

LEARNED_KINDS = frozenset({"spam", "blacklisted"})
"""Held rows whose release or delete teaches Bayes (the SpamAssassin milter's)."""


def learn(client: SpamdClient, message: bytes, user: str, kind: Kind) -> bool:
    """Train ``user``'s Bayes with ``message`` as ``kind``; False when it had learned it so already. Raises
    SpamdError."""
    return client.tell(message, user, kind)


def bayes_user(settings: SpamAssassinSettings, mailbox_address: str) -> str:
    """Whose Bayes a mailbox's verdict trains: the mailbox's own (per_user), else the shared one."""
    return mailbox_address if settings.per_user and mailbox_address else settings.shared_user


@dataclass(frozen=True)
class Source:
    """One message found under a path given to ``spam learn``."""

    name: str
    data: bytes


def messages_in(paths: list[Path]) -> Iterator[Source]:
    """Every message in ``paths``: a file (one message, or an mbox), a maildir, a directory of files
    (recursively, in name order). OSError for a path that cannot be read."""
    for path in paths:
        if path.is_dir():
            if (path / "cur").is_dir() or (path / "new").is_dir():
                for folder in ("new", "cur"):
                    yield from _files(path / folder)
            else:
                yield from _files(path)
        else:
            yield from _file(path)


def _files(directory: Path) -> Iterator[Source]:
    if not directory.is_dir():
        return
    for root, dirs, files in os.walk(directory):
        dirs.sort()
        for name in sorted(files):
            yield from _file(Path(root) / name)


def _file(path: Path) -> Iterator[Source]:
    with path.open("rb") as handle:
        head = handle.read(5)
    if head == b"From ":
        box = mailbox.mbox(path, create=False)
        try:
            for number, key in enumerate(box.iterkeys(), start=1):
                yield Source(f"{path}#{number}", box.get_bytes(key, from_=False))
        finally:
            box.close()
        return
    yield Source(str(path), path.read_bytes())


def learn_held(client: SpamdClient, settings: SpamAssassinSettings, store: QuarantineStore, record: HeldRecord,
               kind: Kind) -> str:
    """Teach Bayes what a person decided about a held message (release: ham, delete: spam); the note to
    show beside the result. Never raises: the release or delete stands whatever spamd says."""
    if record.kind not in LEARNED_KINDS:
        return ""
    user = bayes_user(settings, record.mailbox)
    try:
        learned = learn(client, store.raw(record.public_id), user, kind)
    except SpamdError as exc:
        return f"Bayes not taught ({exc})"
    except Exception as exc:  # the bytes may be gone (purged) or unreadable: the action itself stands
        return f"Bayes not taught ({type(exc).__name__}: {exc})"
    return f"learned as {kind} for {user}" if learned else f"already learned as {kind} for {user}"
