"""CPU per message of the banned-attachments check (milters/banned.py) alone, no milter, no Postfix.

Three message shapes, each at 10 KB, 1 MB and 20 MB:

- ``text``: one text/plain body of 79-character lines, as ``smtp-source -l`` sends (the milter benchmark's load);
- ``attachment``: a short text part and one base64 attachment (random bytes) filling the rest;
- ``html+zip``: a text/html part filling most of it, and a small zip attachment (listed member by member).

The spool is filled as the milter fills it (RAM up to 1 MB, then a temporary file). Each message is checked
``--repeat`` times after one warm-up; the table gives the median and the minimum CPU milliseconds (user +
system of this process) per message. Run from the repository root:

    .venv/bin/python bench/banned_cpu.py [--repeat N] [--profile SHAPE:SIZE]
"""

from __future__ import annotations

import argparse
import base64
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from milters.banned import BannedCheck, BannedSettings  # noqa: E402
from milters.check import Message  # noqa: E402
from milters.spool import Spool  # noqa: E402

SIZES = {"10KB": 10_000, "1MB": 1 << 20, "20MB": 20 << 20}
OUTER = b"----=_NextPart_000_0012_01DB43A1.5C2E9F60"
INNER = b"----=_NextPart_001_0013_01DB43A1.5C2E9F60"
"""Boundaries as Outlook makes them (other clients' are as long: 28 to 70 bytes)."""
HEAD = (b"Received: from client.example.org by mx.example.net; Tue, 1 Dec 2026 10:00:00 +0000\r\n"
        b"From: a@example.org\r\nTo: b@example.net\r\nSubject: bench\r\nMessage-ID: <1@example.org>\r\n")


def _lines(total: int, line: bytes) -> bytes:
    return line * max(1, total // len(line))


def text_message(size: int) -> bytes:
    return HEAD + b"\r\n" + _lines(size, b"X" * 79 + b"\r\n")


def attachment_message(size: int) -> bytes:
    encoded = base64.encodebytes(os.urandom(size * 3 // 4 - 2000)).replace(b"\n", b"\r\n")
    return (HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"" + OUTER + b"\"\r\n\r\n"
            b"--" + OUTER + b"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHello,\r\nsee attached.\r\n"
            b"--" + OUTER + b"\r\nContent-Type: application/octet-stream; name=\"data.bin\"\r\n"
            b"Content-Disposition: attachment; filename=\"data.bin\"\r\nContent-Transfer-Encoding: base64\r\n\r\n"
            + encoded + b"--" + OUTER + b"--\r\n")


def html_zip_message(size: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(20):
            archive.writestr(f"doc{i}.pdf", b"%PDF-1.4 " * 50)
    encoded = base64.encodebytes(buffer.getvalue()).replace(b"\n", b"\r\n")
    paragraph = b"<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit</p>\r\n"
    html = _lines(max(1000, size - len(encoded) - 1000), paragraph)
    return (HEAD + b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"" + OUTER + b"\"\r\n\r\n"
            b"--" + OUTER + b"\r\nContent-Type: multipart/alternative; boundary=\"" + INNER + b"\"\r\n\r\n"
            b"--" + INNER + b"\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nsee the html\r\n"
            b"--" + INNER + b"\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            + html + b"--" + INNER + b"--\r\n"
            b"--" + OUTER + b"\r\nContent-Type: application/zip; name=\"docs.zip\"\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--" + OUTER + b"--\r\n")


SHAPES = {"text": text_message, "attachment": attachment_message, "html+zip": html_zip_message}


def message(raw: bytes) -> Message:
    spool = Spool()
    for start in range(0, len(raw), 1 << 16):
        spool.write(raw[start:start + (1 << 16)])
    return Message(queue_id="BENCH", client_address="192.0.2.7", client_name="mx.example.org", helo="mx.example.org",
                   sender="a@example.org", recipients=["b@example.net"], auth_user="", spool=spool)


def cpu_ms(check: BannedCheck, msg: Message, repeat: int) -> list[float]:
    check.check(msg)  # warm-up
    times = []
    for _ in range(repeat):
        started = time.process_time()
        verdict = check.check(msg)
        times.append((time.process_time() - started) * 1000)
    if verdict.reason != "no banned attachment":
        raise SystemExit(f"unexpected verdict: {verdict.reason}")
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=0, help="checks per message (default: 20, 20, 5 by size)")
    parser.add_argument("--profile", metavar="SHAPE:SIZE", help="cProfile one message instead (e.g. text:1MB)")
    args = parser.parse_args()
    rules = REPO / "rules" / "banned.toml"
    check = BannedCheck(BannedSettings(files=[rules]))
    if args.profile:
        shape, size = args.profile.split(":")
        msg = message(SHAPES[shape](SIZES[size]))
        profiler = cProfile.Profile()
        profiler.runcall(check.check, msg)
        pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
        return 0
    print(f"{'shape':12} {'size':>6} {'median ms':>10} {'min ms':>8} {'ms/MB':>7}")
    for shape, build in SHAPES.items():
        for label, size in SIZES.items():
            raw = build(size)
            repeat = args.repeat or (5 if size > 2 << 20 else 20)
            times = cpu_ms(check, message(raw), repeat)
            median = statistics.median(times)
            print(f"{shape:12} {label:>6} {median:10.2f} {min(times):8.2f} {median / (len(raw) / (1 << 20)):7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
