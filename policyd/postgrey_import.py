"""Carry Postgrey's memory over to mailwarden (``mailwarden greylist import-postgrey [DBDIR]``), so that the
switch does not greylist every correspondent again.

Postgrey keeps two Berkeley DB files in its ``--dbdir`` (Debian: /var/lib/postgrey):

- ``postgrey.db``: ``client_net/sender/recipient`` -> ``first_seen,last_seen`` (epoch seconds). client_net is
  the client's network address without its length (``192.0.2.0``; ``2001:DB8:0:0:0:0:0:0``; the whole
  address with --lookup-by-host), the sender as normalised by Postgrey (BATV and +extension stripped, numbers
  -> ``#``, as policyd/greylist.py's normalise_sender), and the key lower-cased.
- ``postgrey_clients.db``: client address -> ``count,last_seen`` (the client auto-whitelist).

They are read with ``db_dump -p`` from Debian's db-util (the same Berkeley DB 5.3 that Postgrey's
BerkeleyDB module uses), joining Postgrey's environment (``-h DBDIR``) so that a running Postgrey's
unflushed pages are seen too. A triplet becomes a ``gl:t:`` hash keyed exactly as policyd keys the same
message (the client part masked with mailwarden's ipv4_prefix / ipv6_prefix), an auto-whitelisted client a
``gl:c:`` hash (policyd/keys.py). Lifetimes follow mailwarden's settings from the entry's last sighting: a
passed triplet and a client live max_age after it, a triplet still being greylisted retry_window. Entries
already dead under those lifetimes are skipped, and so is every key mailwarden already has (an import
never undoes what policyd has learnt; running it twice changes nothing).

With Postgrey's ``--privacy`` the keys are SHA-1 hashes of the triplet and of the client address: they
cannot be turned back into addresses, nor into mailwarden's keys, and are skipped (the command says so).
"""

from __future__ import annotations

import ipaddress
import math
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import click
import redis

from mailwarden.cli import CliContext, backend_errors, emit, fail
from mailwarden.redis_sync import sync_client
from mailwarden.units import format_duration
from policyd import keys
from policyd.greylist import GreylistSettings, client_network

DEFAULT_DBDIR = Path("/var/lib/postgrey")
TRIPLETS_DB = "postgrey.db"
CLIENTS_DB = "postgrey_clients.db"
DB_DUMP_NAMES = ("db5.3_dump", "db_dump")
"""Berkeley DB 5.3's dump tool (Debian's Postgrey links BerkeleyDB 5.3); db_dump is the alternatives link."""
POSTGREY_DEFAULT_DELAY = 300
BATCH = 500

# why an entry was not imported (the keys of the "skipped" counts)
OLDER_THAN_MAX_AGE = "older than max_age"
RETRY_WINDOW_OVER = "not retried within retry_window"
HASHED = "hashed by Postgrey's --privacy"
UNREADABLE = "unreadable entry"
AMBIGUOUS = "ambiguous ('/' inside an address)"
ALREADY_THERE = "already in mailwarden"
AWL_OFF = "auto_whitelist_clients is 0 in mailwarden"

SCRIPT = "greylist_import.lua"


class PostgreyError(Exception):
    """The databases could not be read; the message says why and what to do."""


def find_db_dump() -> str | None:
    return next((path for name in DB_DUMP_NAMES if (path := shutil.which(name))), None)


def _unescape(line: bytes) -> bytes:
    """One data line of ``db_dump -p``: printable bytes as they are, ``\\\\`` a backslash, ``\\xx`` a byte in hex."""
    out = bytearray()
    i = 0
    while i < len(line):
        byte = line[i]
        if byte != 0x5C:  # backslash
            out.append(byte)
            i += 1
        elif line[i + 1:i + 2] == b"\\":
            out.append(0x5C)
            i += 2
        else:
            out.append(int(line[i + 1:i + 3], 16))
            i += 3
    return bytes(out)


def parse_dump(output: bytes) -> list[tuple[bytes, bytes]]:
    """The key/value pairs of ``db_dump -p`` output (after each HEADER=END, data lines start with a space)."""
    values: list[bytes] = []
    in_data = False
    for line in output.split(b"\n"):
        if line == b"HEADER=END":
            in_data = True
        elif line == b"DATA=END":
            in_data = False
        elif in_data and line.startswith(b" "):
            values.append(_unescape(line[1:]))
    if len(values) % 2:
        raise PostgreyError("db_dump printed a key without a value")
    return list(zip(values[::2], values[1::2], strict=True))


def read_database(dbdir: Path, name: str, db_dump: str) -> list[tuple[bytes, bytes]] | None:
    """The pairs of one Postgrey database, or None when the file does not exist."""
    if not (dbdir / name).exists():
        return None
    attempts = ([db_dump, "-p", "-h", str(dbdir), name],  # in Postgrey's environment: sees unflushed pages
                [db_dump, "-p", str(dbdir / name)])  # the file alone (an environment of another version...)
    error = ""
    for command in attempts:
        try:
            done = subprocess.run(command, capture_output=True, timeout=600, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PostgreyError(f"{' '.join(command)}: {exc}") from None
        if done.returncode == 0:
            return parse_dump(done.stdout)
        lines = done.stderr.decode(errors="replace").strip().splitlines()
        error = lines[-1] if lines else f"exit {done.returncode}"
    raise PostgreyError(f"cannot read {dbdir / name}: {error}")


@dataclass
class ImportReport:
    dbdir: str
    dry_run: bool
    triplets_imported: int = 0
    triplets_passed: int = 0
    """Of the imported triplets, those Postgrey had let through (the others were still being greylisted)."""
    spf_triplets: int = 0
    """Extra ``spf:<sender domain>`` triplets, for mail whose SPF passes (greylist.spf_domain_triplets)."""
    triplets_skipped: Counter[str] = field(default_factory=Counter)
    clients_imported: int = 0
    clients_skipped: Counter[str] = field(default_factory=Counter)
    clients_database: bool = True

    @property
    def imported(self) -> int:
        return self.triplets_imported + self.clients_imported

    def as_dict(self) -> dict[str, object]:
        return {
            "dbdir": self.dbdir, "dry_run": self.dry_run,
            "triplets": {"imported": self.triplets_imported, "passed": self.triplets_passed,
                         "spf_triplets": self.spf_triplets, "skipped": dict(self.triplets_skipped)},
            "clients": {"imported": self.clients_imported, "skipped": dict(self.clients_skipped),
                        "database": self.clients_database},
        }

    def human(self) -> str:
        verb = "would import" if self.dry_run else "imported"
        lines = [f"{self.dbdir}: {verb} {self.triplets_imported} triplet(s) ({self.triplets_passed} passed, "
                 f"{self.triplets_imported - self.triplets_passed} still greylisted)"
                 + (f" and {self.spf_triplets} spf: triplet(s)" if self.spf_triplets else "")
                 + _skipped(self.triplets_skipped)]
        if self.clients_database:
            lines.append(f"{self.dbdir}: {verb} {self.clients_imported} auto-whitelisted client(s)"
                         + _skipped(self.clients_skipped))
        else:
            lines.append(f"{self.dbdir}: no {CLIENTS_DB} (Postgrey ran with --auto-whitelist-clients=0)")
        if HASHED in self.triplets_skipped or HASHED in self.clients_skipped:
            lines.append("Postgrey ran with --privacy: its keys are one-way hashes and cannot be imported")
        return "\n".join(lines)


def _skipped(skipped: Counter[str]) -> str:
    if not skipped:
        return ""
    return f"; skipped {sum(skipped.values())}: " + ", ".join(f"{n} {why}" for why, n in skipped.most_common())


@dataclass(frozen=True)
class Write:
    key: str
    ttl: int
    fields: dict[str, str]
    kind: str
    """"triplet", "passed" (a triplet Postgrey let through), "spf" or "client"."""


class PostgreyImport:
    """Turns Postgrey's entries into mailwarden's greylist keys and writes the ones Redis does not have."""

    def __init__(self, settings: GreylistSettings, prefix: str, *, spf_triplets: bool = False,
                 postgrey_delay: float = POSTGREY_DEFAULT_DELAY, now: float | None = None) -> None:
        self.settings = settings
        self.prefix = prefix
        self.spf_triplets = spf_triplets
        self.postgrey_delay = postgrey_delay
        self.now = now if now is not None else time.time()

    # -- mapping ------------------------------------------------------------------------------------

    def triplet_writes(self, pairs: Sequence[tuple[bytes, bytes]], report: ImportReport) -> Iterator[Write]:
        for raw_key, raw_value in pairs:
            key, value = raw_key.decode("utf-8", "replace"), raw_value.decode("ascii", "replace")
            if "/" not in key:
                report.triplets_skipped[HASHED if _is_sha1(key) else UNREADABLE] += 1
                continue
            net, rest = key.split("/", 1)
            if rest.count("/") != 1:
                report.triplets_skipped[AMBIGUOUS] += 1
                continue
            sender, recipient = rest.lower().split("/")
            try:
                ip = ipaddress.ip_address(net)
                first, last = (int(part) for part in value.split(",")[:2])
            except ValueError:
                report.triplets_skipped[UNREADABLE] += 1
                continue
            first = min(first, int(self.now))  # first seen in the future: a clock went backwards (as postgrey)
            passed = last - first >= self.postgrey_delay
            if passed:
                ttl = last + self.settings.max_age - self.now
                if ttl <= 0:
                    report.triplets_skipped[OLDER_THAN_MAX_AGE] += 1
                    continue
                # passed under Postgrey's delay: passed under mailwarden's too (greylist.lua: last - first >= delay)
                first = min(first, math.floor(last - self.settings.delay))
            else:
                if self.now - first > self.settings.retry_window:
                    report.triplets_skipped[RETRY_WINDOW_OVER] += 1
                    continue
                ttl = last + self.settings.retry_window - self.now
            origin = client_network(ip, self.settings.ipv4_prefix, self.settings.ipv6_prefix)
            fields = {"f": str(first), "l": str(last), "s": sender, "r": recipient}
            lifetime = max(1, math.ceil(ttl))
            yield Write(keys.greylist_triplet(self.prefix, origin, sender, recipient), lifetime,
                        {**fields, "o": origin}, "passed" if passed else "triplet")
            if passed and self.spf_triplets and "@" in sender:
                spf_origin = f"spf:{sender.rpartition('@')[2]}"
                yield Write(keys.greylist_triplet(self.prefix, spf_origin, sender, recipient), lifetime,
                            {**fields, "o": spf_origin}, "spf")

    def client_writes(self, pairs: Sequence[tuple[bytes, bytes]], report: ImportReport) -> Iterator[Write]:
        for raw_key, raw_value in pairs:
            key, value = raw_key.decode("utf-8", "replace"), raw_value.decode("ascii", "replace")
            if self.settings.auto_whitelist_clients == 0:
                report.clients_skipped[AWL_OFF] += 1
                continue
            try:
                ip = ipaddress.ip_address(key)
                count, last = (int(part) for part in value.split(",")[:2])
            except ValueError:
                report.clients_skipped[HASHED if _is_sha1(key) else UNREADABLE] += 1
                continue
            ttl = last + self.settings.max_age - self.now
            if ttl <= 0:
                report.clients_skipped[OLDER_THAN_MAX_AGE] += 1
                continue
            yield Write(f"{self.prefix}{keys.GREYLIST_CLIENT}{ip}", max(1, math.ceil(ttl)),
                        {"n": str(count), "l": str(last)}, "client")

    # -- writing ------------------------------------------------------------------------------------

    def apply(self, client: redis.Redis, writes: Sequence[Write], report: ImportReport) -> None:
        """Write (or with dry_run only look up) each key; a key that exists is left as it is."""
        script = client.register_script((resources.files("policyd") / "scripts" / SCRIPT).read_text())
        for start in range(0, len(writes), BATCH):
            batch = writes[start:start + BATCH]
            pipe = client.pipeline(transaction=False)
            for write in batch:
                if report.dry_run:
                    pipe.exists(write.key)
                else:
                    flat = [item for pair in write.fields.items() for item in pair]
                    script(keys=[write.key], args=[write.ttl, *flat], client=pipe)
            replies = pipe.execute()
            for write, reply in zip(batch, replies, strict=True):
                written = not reply if report.dry_run else bool(reply)
                self._count(write, written, report)

    @staticmethod
    def _count(write: Write, written: bool, report: ImportReport) -> None:
        if write.kind == "client":
            if written:
                report.clients_imported += 1
            else:
                report.clients_skipped[ALREADY_THERE] += 1
        elif write.kind == "spf":
            report.spf_triplets += written
        elif written:
            report.triplets_imported += 1
            report.triplets_passed += write.kind == "passed"
        else:
            report.triplets_skipped[ALREADY_THERE] += 1


def _is_sha1(text: str) -> bool:
    return len(text) == 40 and all(c in "0123456789abcdef" for c in text.lower())


@click.command("import-postgrey")
@click.argument("dbdir", type=click.Path(path_type=Path), default=DEFAULT_DBDIR, required=False)
@click.option("--postgrey-delay", type=click.IntRange(min=1), default=POSTGREY_DEFAULT_DELAY, show_default=True,
              metavar="SECONDS", help="Postgrey's --delay: tells which triplets Postgrey had let through.")
@click.option("--dry-run", is_flag=True, help="Read and count, write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
@click.pass_obj
def import_postgrey_command(ctx: CliContext, dbdir: Path, postgrey_delay: int, dry_run: bool,
                            as_json: bool) -> None:
    """Carry Postgrey's triplets and auto-whitelisted clients over from DBDIR (default /var/lib/postgrey).

    Keys mailwarden already has are left alone, so it is safe to run twice. Exit 1 when nothing was
    imported, 69 when Redis cannot be reached."""
    config = ctx.load()
    policyd = config.section("policyd")
    greylist: GreylistSettings = policyd.greylist
    db_dump = find_db_dump()
    if db_dump is None:
        fail("db_dump (Berkeley DB utilities) not found: apt-get install db-util", 1)
    if not dbdir.is_dir():
        fail(f"{dbdir}: no such directory (Postgrey's --dbdir)", 1)
    try:
        triplets = read_database(dbdir, TRIPLETS_DB, db_dump)
        clients = read_database(dbdir, CLIENTS_DB, db_dump)
    except PostgreyError as exc:
        fail(str(exc), 1)
    if triplets is None:
        fail(f"{dbdir}: no {TRIPLETS_DB} here (Postgrey's --dbdir?)", 1)
    checks = list(policyd.checks)
    spf_triplets = (greylist.spf_domain_triplets and "spf" in checks and "greylist" in checks
                    and checks.index("spf") < checks.index("greylist"))
    redis_settings = config.section("redis")
    importer = PostgreyImport(greylist, redis_settings.key_prefix, spf_triplets=spf_triplets,
                              postgrey_delay=postgrey_delay)
    report = ImportReport(str(dbdir), dry_run, clients_database=clients is not None)
    writes = [*importer.triplet_writes(triplets, report), *importer.client_writes(clients or [], report)]
    with backend_errors():
        importer.apply(sync_client(redis_settings), writes, report)
    emit(report.as_dict(), as_json, report.human()
         + f"\n(lifetimes from mailwarden's settings: max_age {format_duration(greylist.max_age)}, "
           f"retry_window {format_duration(greylist.retry_window)})")
    if report.imported == 0:
        raise SystemExit(1)
