"""``mailwarden digest send`` at scale: N mailboxes with M held messages each, on SQLite or a private MariaDB,
one run of the real CLI (a subprocess) sending every digest to a real SMTP listener that discards what it
gets (aiosmtpd's Sink, its own process: its memory is not the run's). Records the run's wall time, CPU time
and peak RSS (``wait4``), and checks that every mailbox got its digest.

    python bench/digest_bench.py --users 10000 --held 20 --db sqlite
    python bench/digest_bench.py --users 1000 --held 20 --db mariadb --json

Run it at two sizes to see that memory does not grow with the number of mailboxes (bench/README.md has
the numbers). The held rows are written directly with ``QuarantineStore.hold`` (one message held for every
mailbox, M times), a day in the past, so that every mailbox is due.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from harness.net import free_port, wait_port  # noqa: E402
from harness.policyd_proc import render_toml  # noqa: E402

from quarantine.store import HeldEnvelope, Hold, QuarantineSettings, QuarantineStore  # noqa: E402

SECRET = "bench-only-not-a-real-key-5f0c2b9e7a1d4c3b"


def populate(settings: QuarantineSettings, users: int, held: int) -> float:
    """Hold ``held`` messages for each of ``users`` mailboxes, a day ago; returns the seconds it took."""
    started = time.monotonic()
    past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    store = QuarantineStore(settings, now=lambda: past)
    try:
        store.migrate()
        mailboxes = [f"user{index:06d}@example.test" for index in range(users)]
        for number in range(held):
            raw = f"From: spam{number}@bad.example\r\nSubject: Offer number {number}\r\n\r\nbuy\r\n".encode()
            envelope = HeldEnvelope(f"Q{number}", f"spam{number}@bad.example", "192.0.2.10", "",
                                    f"spam{number}@bad.example", f"Offer number {number}", "", past)
            for start in range(0, users, 2000):
                store.hold(io.BytesIO(raw), len(raw), envelope,
                           [Hold(mailbox, mailbox, "spamassassin", "spam", "score 12.5 >= hold level 6")
                            for mailbox in mailboxes[start:start + 2000]])
    finally:
        store.close()
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--held", type=int, default=20)
    parser.add_argument("--db", choices=["sqlite", "mariadb"], default="sqlite")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="mw-digest-bench-"))
    mariadb = None
    if args.db == "mariadb":
        from harness.mariadb import MariaDbInstance

        mariadb = MariaDbInstance()
        mariadb.start()
        url = mariadb.create_database("digest_bench", drop=True)
    else:
        url = f"sqlite:///{work / 'quarantine.sqlite'}"
    port = free_port()
    listener = subprocess.Popen([sys.executable, "-m", "aiosmtpd", "-n", "-c", "aiosmtpd.handlers.Sink",
                                 "-l", f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        quarantine = {"database_url": url, "message_dir": str(work / "held"), "reinject": f"127.0.0.1:{port}",
                      "digest": {"from_address": "postmaster@example.test",
                                 "reply_mailbox": "quarantine@example.test",
                                 "send_at": "00:00", "token_keys": [{"id": "a", "secret": SECRET}]}}
        config = work / "mailwarden.toml"
        config.write_text(render_toml({"quarantine": quarantine, "logging": {"level": "warning"}}))
        populate_seconds = populate(QuarantineSettings.model_validate(quarantine), args.users, args.held)
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "digest", "send",
                                 "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"digest send exited {proc.returncode}: {err.decode()[-2000:]}")
        result = json.loads(out)
        if result["sent"] != args.users:
            raise SystemExit(f"sent {result['sent']} digests, expected {args.users}")
        report = {"db": args.db, "users": args.users, "held_each": args.held, "sent": result["sent"],
                  "populate_seconds": round(populate_seconds, 1), "send_seconds": round(seconds, 1),
                  "digests_per_second": round(args.users / seconds, 1),
                  "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
                  "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}
        if args.json:
            print(json.dumps(report))
        else:
            print(" ".join(f"{key}={value}" for key, value in report.items()))
    finally:
        listener.terminate()
        listener.wait(timeout=10)
        if mariadb is not None:
            mariadb.stop()


if __name__ == "__main__":
    main()
