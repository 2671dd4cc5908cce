"""Replies to digests per second: ``mailwarden digest reply`` as Postfix's pipe runs it (one process per
reply, ``--workers`` at once as master.cf's process limit allows), and the handler alone in one process.

Each reply is a ``RELEASE`` button of alice's digest (token in the address, command in the subject) for a
message of her own held in a SQLite catalogue: the handler checks the sender and login, verifies the
token, releases the message (re-injected over SMTP) and sends the confirmation, both to an SMTP sink
standing in for the Postfix listener. Also measured: a reply the loop guard ignores (null sender), which is
the process's start-up and config load alone.

    python bench/digest_reply_bench.py [--replies 200] [--workers 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import email.utils
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))  # the harness: tests/harness/*

from harness.policyd_proc import render_toml  # noqa: E402
from harness.sink import Sink  # noqa: E402

from mailwarden.directory import DirectorySettings  # noqa: E402
from quarantine.digest.outbox import Outbox  # noqa: E402
from quarantine.digest.reply import DirectoryOwners, Envelope, ReplyHandler  # noqa: E402
from quarantine.digest.tokens import Action, Tokens  # noqa: E402
from quarantine.store import HeldEnvelope, Hold, QuarantineSettings, QuarantineStore  # noqa: E402

OWNER = "alice@example.test"
SECRET = "bench-secret-0123456789-abcdefghijklmnopqrstuvwxyz"


def reply_for(tokens: Tokens, public_id: str) -> tuple[str, bytes]:
    token = tokens.mint(Action.RELEASE, OWNER, public_id)
    message = EmailMessage()
    message["From"], message["To"] = OWNER, "quarantine@example.test"
    message["Subject"] = f"RELEASE {public_id[:6]}"
    message["Message-ID"] = email.utils.make_msgid(domain="client.example")
    message.set_content("\n")
    return f"quarantine+{token}@example.test", message.as_bytes()


def hold(store: QuarantineStore, count: int) -> list[str]:
    raw = b"From: promo@shop.example\r\nTo: alice@example.test\r\nSubject: offer\r\n\r\nBuy now!\r\n"
    envelope = HeldEnvelope("B00", "promo@shop.example", "198.51.100.7", "", "promo@shop.example", "offer", "",
                            datetime.datetime.now(datetime.UTC))
    return [store.hold(io.BytesIO(raw), len(raw), envelope, [Hold(OWNER, OWNER, "spamassassin", "spam", "x")])[0]
            for _ in range(count)]


def run(args: argparse.Namespace) -> dict:
    sink = Sink().start()
    workdir = Path(tempfile.mkdtemp(prefix="mw-reply-bench-"))
    settings = {"quarantine": {"database_url": f"sqlite:///{workdir / 'q.sqlite'}", "message_dir": str(workdir / "m"),
                               "reinject": f"127.0.0.1:{sink.port}",
                               "digest": {"from_address": "postmaster@example.test",
                                          "reply_mailbox": "quarantine@example.test", "learn_on_release": False,
                                          "token_keys": [{"id": "b", "secret": SECRET}]}},
                "logging": {"level": "warning"}}
    config = workdir / "mailwarden.toml"
    config.write_text(render_toml(settings))
    quarantine = QuarantineSettings.model_validate(settings["quarantine"])
    store = QuarantineStore(quarantine)
    store.migrate()
    assert quarantine.digest is not None
    tokens = Tokens(quarantine.digest)
    results: dict = {"replies": args.replies, "workers": args.workers}
    if args.profile:
        public_id = hold(store, 1)[0]
        recipient, data = reply_for(tokens, public_id)
        subprocess.run([sys.executable, "-m", "cProfile", "-s", "cumtime", "-m", "mailwarden.cli", "--config",
                        str(config), "digest", "reply", f"--sender={OWNER}", f"--recipient={recipient}",
                        f"--sasl-user={OWNER}", "--client=192.0.2.10"], input=data, check=False)
        return results

    def one(recipient: str, data: bytes, sender: str = OWNER) -> float:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "digest", "reply",
                               f"--sender={sender}", f"--recipient={recipient}", f"--sasl-user={OWNER}",
                               "--client=192.0.2.10"], input=data, capture_output=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"digest reply exited {done.returncode}: {done.stderr.decode()[-500:]}")
        return time.perf_counter() - started

    ids = hold(store, args.replies)
    replies = [reply_for(tokens, public_id) for public_id in ids]
    ignored = [one(replies[0][0], replies[0][1], sender="") for _ in range(5)]
    results["startup_seconds_p50"] = round(statistics.median(ignored), 3)
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.workers) as pool:
        latencies = list(pool.map(lambda item: one(*item), replies))
    elapsed = time.perf_counter() - started
    sink.wait_for(2 * args.replies, timeout=60)
    results["pipe_replies_per_second"] = round(args.replies / elapsed, 1)
    results["pipe_latency_p50"] = round(statistics.median(latencies), 3)
    results["pipe_latency_p99"] = round(sorted(latencies)[int(0.99 * (len(latencies) - 1))], 3)

    ids = hold(store, args.replies)
    replies = [reply_for(tokens, public_id) for public_id in ids]
    owners = DirectoryOwners(DirectorySettings())  # no sources: the sender's address is the owner
    with Outbox(quarantine) as outbox:
        handler = ReplyHandler(store, quarantine.digest, tokens, owners, outbox, lambda record, kind: "")
        started = time.perf_counter()
        for recipient, data in replies:
            handler.handle(data, Envelope(OWNER, recipient, OWNER, "192.0.2.10"))
        elapsed = time.perf_counter() - started
    results["in_process_replies_per_second"] = round(args.replies / elapsed, 1)
    store.close()
    sink.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replies", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4, help="replies at once (master.cf's process limit)")
    parser.add_argument("--json", type=Path, help="write the results here too")
    parser.add_argument("--profile", action="store_true", help="profile one reply's process instead")
    args = parser.parse_args()
    results = run(args)
    results["cpus"] = os.cpu_count()
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
