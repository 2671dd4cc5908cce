"""Paired runs: policyd from two source trees, loaded at the same moment, each pinned to a core of its own.

Why: this VM drifts by ±25% within seconds, so two builds measured one after the other differ by more
than most single changes save (see ../shared/PERF-NOTES.md, "Where policyd's CPU goes"). Here both builds
run at once on the same request stream shape, so whatever slows the machine slows both alike:

- "ref" and "variant" are the same ``python -m mailwarden.cli policyd`` with ``PYTHONPATH`` pointing at
  one source tree each (e.g. ``git archive <commit> | tar -x -C /tmp/ref`` for the reference), each with
  its own redis-server, started by policyd_bench.py's helpers (same config, decisions logged to a file).
- The two policyd processes are pinned to cores 0 and 1 (swapped on every other pair, so a faster core
  favours neither); Redis and the load client are not pinned.
- Each pair sends ``--requests`` never-seen triplets to both at once (policyd_bench.py's client, one
  event loop, ``--connections`` connections each), after one discarded warm-up pair. Server CPU per
  request comes from /proc/PID/stat before and after; the figure to read is the median over pairs of
  variant/ref.

    .venv/bin/python bench/paired_policyd.py --ref /tmp/ref --variant . --checks greylist
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import policyd_bench as pb
from procstat import cpu_seconds

CHECKS = {"greylist": ["greylist"], "default": ["access", "blocklist", "ratelimit", "greylist"]}


def start(name: str, tree: Path, checks: list[str], workdir: Path, stack: contextlib.ExitStack,
          python: str) -> pb.Target:
    """policyd_bench.start_mailwarden, with the server importing mailwarden from ``tree``."""
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(tree.resolve())
    try:
        return pb.start_mailwarden(name, workdir, stack, python, checks_run=checks)
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


def run_pair(loop: asyncio.AbstractEventLoop, targets: list[pb.Target], numbers: pb.TripletNumbers,
             requests: int, connections: int, timeout: float) -> list[tuple[float, float]]:
    """Both targets loaded at once; per target (server CPU µs per request, requests/s)."""
    loads = [pb.make_workload("new", numbers, requests, 0).timed for _ in targets]
    time.sleep(0.2)  # the previous pair's last decision lines written
    before = [cpu_seconds(t.server.pid) for t in targets]

    async def both() -> list[pb.DriveResult]:
        return list(await asyncio.gather(*(pb.drive(t.port, load, connections, timeout)
                                           for t, load in zip(targets, loads, strict=True))))

    results = pb.run_bounded(loop, both())
    time.sleep(0.2)  # decision lines still buffered are written (and counted) before the second reading
    after = [cpu_seconds(t.server.pid) for t in targets]
    for target, result in zip(targets, results, strict=True):
        target.check_alive()
        bad = sum(n for answer, n in result.answers.items()
                  if not answer.removeprefix(b"action=").startswith(pb.EXPECTED_ACTION))
        if bad:
            raise pb.BenchError(f"{target.name}: {bad} answers other than {pb.EXPECTED_ACTION!r}")
    return [((a - b) / requests * 1e6, requests / r.wall) for a, b, r in zip(after, before, results, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--ref", type=Path, required=True, help="source tree of the reference build")
    parser.add_argument("--variant", type=Path, default=pb.REPO, help="source tree of the variant build")
    parser.add_argument("--checks", choices=sorted(CHECKS), default="greylist")
    parser.add_argument("--pairs", type=int, default=7, help="measured pairs (after one warm-up pair)")
    parser.add_argument("--requests", type=int, default=10000, help="requests per server per pair")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    pb.STOP.install()
    workdir = Path(tempfile.mkdtemp(prefix="mailwarden-paired-"))
    stack = contextlib.ExitStack()
    loop = pb.new_event_loop()
    rows: list[tuple[float, float, float, float]] = []
    try:
        targets = [start(name, tree, CHECKS[args.checks], workdir, stack, args.python)
                   for name, tree in (("ref", args.ref), ("variant", args.variant))]
        numbers = pb.TripletNumbers()
        for index in range(args.pairs + 1):
            for core, target in enumerate(targets if index % 2 == 0 else reversed(targets)):
                os.sched_setaffinity(target.server.pid, {core})
            (ref_us, ref_rps), (var_us, var_rps) = run_pair(loop, targets, numbers, args.requests,
                                                            args.connections, args.timeout)
            label = "warm-up" if index == 0 else f"pair {index}"
            pb.progress(f"{label}: ref {ref_us:6.1f} µs/req {ref_rps:7.0f} req/s | variant {var_us:6.1f} µs/req "
                        f"{var_rps:7.0f} req/s | variant/ref {var_us / ref_us:.3f}")
            if index:
                rows.append((ref_us, var_us, ref_rps, var_rps))
    except pb.BenchError as exc:
        pb.progress(f"failed: {exc}; work directory kept: {workdir}")
        return 1
    finally:
        pb.stop_children(stack)
        loop.close()
    shutil.rmtree(workdir, ignore_errors=True)
    ratios = [var / ref for ref, var, _, _ in rows]
    print(f"checks={args.checks} pairs={len(rows)} requests={args.requests} connections={args.connections}")
    print(f"server CPU µs/req, median: ref {statistics.median(r[0] for r in rows):.1f}, "
          f"variant {statistics.median(r[1] for r in rows):.1f}; variant/ref median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f})")
    print(f"req/s, median: ref {statistics.median(r[2] for r in rows):.0f}, "
          f"variant {statistics.median(r[3] for r in rows):.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
