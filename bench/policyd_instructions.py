"""Instructions per request in policyd's own process, counted by callgrind: a figure that does not drift.

CPU time per request on this shared VM moves by ±25% within seconds, and more when anything else runs;
the paired runs (paired_policyd.py) cancel most of that but still need several passes to see a 3% change.
An instruction count does not depend on the load at all, so it attributes each change exactly. It leaves
out what happens in the kernel (the socket calls) and in Redis, and an instruction is not a fixed time,
so it complements the CPU figures and never replaces them (bench/README.md gives both).

For each tree: its own redis-server, policyd under ``valgrind --tool=callgrind`` with the benchmark's
config, a warm-up of new-triplet requests, the counters zeroed (callgrind_control -z), the timed requests
over 10 connections, a dump (callgrind_control -d); the dump's total over the requests is the figure.

  .venv/bin/python bench/policyd_instructions.py --checks all main HEAD .
  (trees: git revisions, exported with git archive; "." is this working tree)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import policyd_bench as bench
from paired_policyd import CHECKS, export

TOTALS = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def valgrind_launcher(tree: Path, python: str, workdir: Path, name: str) -> tuple[str, Path]:
    """A script that runs ``python`` on ``tree``'s code under callgrind (as paired_policyd.launcher, with
    valgrind in the exec: it does not follow a further exec); returns it and the dump file's prefix."""
    out = workdir / f"{name}.callgrind"
    path = workdir / f"{name}-valgrind"
    path.write_text(f'#!/bin/sh\ncd "{tree}" && PYTHONPATH="{tree}" exec valgrind --tool=callgrind '
                    f'--callgrind-out-file="{out}" -q "{python}" "$@"\n')
    path.chmod(0o755)
    return str(path), out


def dumped_instructions(out: Path, pid: int, timeout: float = 60.0) -> int:
    """Ask callgrind for a dump and read its total instruction count."""
    before = set(out.parent.glob(f"{out.name}*"))
    subprocess.run(["callgrind_control", "--dump", str(pid)], check=True, capture_output=True, timeout=timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in set(out.parent.glob(f"{out.name}*")) - before:
            if match := TOTALS.search(path.read_bytes()):
                return int(match.group(1))
        time.sleep(0.1)
    raise bench.BenchError(f"no callgrind dump for pid {pid} in {out.parent}")


def measure(loop: asyncio.AbstractEventLoop, target: bench.Target, out: Path, numbers: bench.TripletNumbers,
            requests: int, connections: int, timeout: float) -> float:
    """Instructions per request over ``requests`` new triplets (after a warm-up of a quarter as many)."""
    warm = bench.make_workload("new", numbers, max(requests // 4, connections * 10), 0)
    loop.run_until_complete(bench.drive(target.port, warm.timed, connections, timeout))
    time.sleep(0.3)  # the warm-up's decision lines are out; the counters then start from here
    subprocess.run(["callgrind_control", "--zero", str(target.server.pid)], check=True, capture_output=True,
                   timeout=60)
    work = bench.make_workload("new", numbers, requests, 0)
    result = loop.run_until_complete(bench.drive(target.port, work.timed, connections, timeout))
    time.sleep(0.3)  # the last decision batch is written
    expected = b"action=" + bench.EXPECTED_ACTION
    wrong = sum(n for answer, n in result.answers.items() if not answer.startswith(expected))
    if wrong:
        raise bench.BenchError(f"{target.name}: {wrong} answers other than {bench.EXPECTED_ACTION.decode()}")
    return dumped_instructions(out, target.server.pid) / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("trees", nargs="+",
                        help="git revisions ('.': this working tree; an absolute path: a prepared tree)")
    parser.add_argument("--checks", choices=sorted(CHECKS), default="all")
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per tree")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds allowed per run (valgrind is slow)")
    parser.add_argument("--python", default=str(bench.VENV_PYTHON) if bench.VENV_PYTHON.exists() else sys.executable)
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="copy the callgrind dumps here (for callgrind_annotate --inclusive=yes)")
    args = parser.parse_args(argv)
    loop = bench.new_event_loop()
    numbers = bench.TripletNumbers()
    figures: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="policyd-instructions-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        try:
            for index, revision in enumerate(args.trees):
                name = f"tree{index}"
                tree = export(revision, work / f"{name}-src")
                python, out = valgrind_launcher(tree, args.python, work, name)
                bench.progress(f"{revision}: policyd under callgrind, checks {args.checks} ...")
                with contextlib.ExitStack() as own:
                    checks = bench.MAILWARDEN_CHECKS[CHECKS[args.checks]]
                    target = bench.start_mailwarden(name, work, own, python, checks_run=checks, start_within=300)
                    figures.append((revision, measure(loop, target, out, numbers, args.requests,
                                                      args.connections, args.timeout)))
                bench.progress(f"{revision}: {figures[-1][1]:,.0f} instructions per request")
        except bench.BenchError as exc:
            print(f"policyd_instructions: {exc}", file=sys.stderr)
            return 1
        finally:
            bench.stop_children(stack)
            if args.keep:
                args.keep.mkdir(parents=True, exist_ok=True)
                for dump in work.glob("*.callgrind*"):
                    shutil.copy(dump, args.keep / dump.name)
    reference = figures[0][1]
    print(f"checks={args.checks} requests={args.requests} connections={args.connections}")
    for revision, per_request in figures:
        change = (per_request - reference) / reference * 100
        print(f"{revision:>12}  {per_request:>10,.0f} instructions per request  {change:+6.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
