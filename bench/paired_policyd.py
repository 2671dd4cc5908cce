"""Paired runs of two policyd code trees: which one costs less server CPU per request?

This VM drifts ±25% within seconds, so two versions measured one after the other differ by more than most
changes save. Here the reference and the variant run at the same time, each pinned to a core of its own
(swapped every other pass), loaded by one client with the same number of new-triplet requests over the
same number of connections; each pass gives both figures under the same conditions, and the report is
the median over pairs of passes (one on each core
assignment) of the variant's change. Server CPU per request is read from /proc/PID/stat around each
pass, as in policyd_bench.py, whose load client, request streams and process handling this reuses.

  .venv/bin/python bench/paired_policyd.py --reference main --checks all
  (--reference: a git revision, exported with git archive; --variant: a revision, default this tree)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from policyd_bench import (
    EXPECTED_ACTION,
    MAILWARDEN_CHECKS,
    REPO,
    STOP,
    VENV_PYTHON,
    BenchError,
    Target,
    TripletNumbers,
    drive,
    make_workload,
    new_event_loop,
    progress,
    start_mailwarden,
    stop_children,
)
from procstat import cpu_seconds

CHECKS = {"greylist": "mailwarden-greylist", "all": "mailwarden-all"}


def export(revision: str, into: Path) -> Path:
    """``revision`` of this repository as a plain tree (``.``: the working tree as it is; an absolute path: a
    tree prepared elsewhere, such as a copy with compiled modules beside its sources, used as it is)."""
    if revision == ".":
        return REPO
    if revision.startswith("/") and Path(revision).is_dir():
        return Path(revision)
    into.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", revision], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def launcher(tree: Path, python: str, workdir: Path, name: str) -> str:
    """A script that runs ``python`` on ``tree``'s code: cwd and PYTHONPATH first, ahead of any installed
    mailwarden. It execs, so the pid read for CPU is the daemon's own."""
    path = workdir / f"{name}-python"
    path.write_text(f'#!/bin/sh\ncd "{tree}" && PYTHONPATH="{tree}" exec "{python}" "$@"\n')
    path.chmod(0o755)
    return str(path)


def pin(target: Target, core: int) -> None:
    os.sched_setaffinity(target.server.pid, {core})


def paired_pass(loop: asyncio.AbstractEventLoop, targets: list[Target], numbers: TripletNumbers, requests: int,
                connections: int, timeout: float) -> list[float]:
    """Both servers loaded at once; their server CPU µs per request, in ``targets`` order."""
    workloads = [make_workload("new", numbers, requests, 0) for _ in targets]
    time.sleep(0.2)
    gc.collect()
    gc.disable()
    try:
        before = [cpu_seconds(t.server.pid) for t in targets]

        async def both() -> list:
            return await asyncio.gather(*(drive(t.port, w.timed, connections, timeout)
                                          for t, w in zip(targets, workloads, strict=True)))

        results = loop.run_until_complete(both())
        time.sleep(0.1)  # the last decision lines are written up to [logging] decision_batch (50 ms) after the answers
        after = [cpu_seconds(t.server.pid) for t in targets]
    finally:
        gc.enable()
    for target, result in zip(targets, results, strict=True):
        target.check_alive()
        wrong = sum(n for answer, n in result.answers.items() if not answer.startswith(b"action=" + EXPECTED_ACTION))
        if wrong:
            raise BenchError(f"{target.name}: {wrong} answers other than {EXPECTED_ACTION.decode()}")
    return [(a - b) / requests * 1e6 for a, b in zip(after, before, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--reference", default="main", help="git revision of the reference")
    parser.add_argument("--variant", default=".",
                        help="git revision of the variant ('.': this working tree; an absolute path: a prepared tree)")
    parser.add_argument("--checks", choices=sorted(CHECKS), default="all",
                        help="greylist: greylisting only; all: the default pipeline")
    parser.add_argument("--requests", type=int, default=10000, help="requests per server per pass")
    parser.add_argument("--passes", type=int, default=6,
                        help="measured passes after one discarded (even: pairs swap cores)")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--python", default=str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable)
    args = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) < 2:
        progress("needs two cores to pin the servers to")
        return 2
    core_a, core_b = sorted(os.sched_getaffinity(0))[:2]
    STOP.install()
    workdir = Path(tempfile.mkdtemp(prefix="mailwarden-paired-"))
    stack = contextlib.ExitStack()
    try:
        names = ("reference", "variant")
        trees = [export(args.reference, workdir / "reference-tree"), export(args.variant, workdir / "variant-tree")]
        checks = MAILWARDEN_CHECKS[CHECKS[args.checks]]
        targets = [start_mailwarden(name, workdir, stack, launcher(tree, args.python, workdir, name), checks_run=checks)
                   for name, tree in zip(names, trees, strict=True)]
        loop = new_event_loop()
        stack.callback(loop.close)
        numbers = TripletNumbers()
        figures: list[list[float]] = []
        for index in range(args.passes + 1):
            STOP.check()
            cores = (core_a, core_b) if index % 2 else (core_b, core_a)
            for target, core in zip(targets, cores, strict=True):
                pin(target, core)
            cpu = paired_pass(loop, targets, numbers, args.requests, args.connections, args.timeout)
            label = "warm-up" if index == 0 else f"pass {index}"
            progress(f"{label}: reference {cpu[0]:.1f} µs, variant {cpu[1]:.1f} µs per request "
                     f"({(cpu[1] - cpu[0]) / cpu[0] * 100:+.1f}%)")
            if index:
                figures.append(cpu)
    except BenchError as exc:
        progress(f"failed: {exc}; logs in {workdir}")
        return 1
    finally:
        stop_children(stack)
    reference = statistics.median(f[0] for f in figures)
    variant = statistics.median(f[1] for f in figures)
    # two consecutive passes put each server once on each core: their sums cancel a core that is busier
    balanced = [(a[1] + b[1] - a[0] - b[0]) / (a[0] + b[0]) * 100 for a, b in
                zip(figures[::2], figures[1::2], strict=False)]
    print(f"checks={args.checks} connections={args.connections} requests/pass={args.requests} passes={args.passes}")
    print(f"server CPU per request, medians: reference ({args.reference}) {reference:.1f} µs, variant "
          f"({args.variant}) {variant:.1f} µs")
    print(f"change per core-balanced pair of passes: median {statistics.median(balanced):+.1f}%, "
          f"mean {statistics.mean(balanced):+.1f}% (pairs: {', '.join(f'{d:+.1f}' for d in balanced)})")
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
