"""Alternating runs of two policyd code trees, unpinned as in policyd_bench.py: CPU, system calls and context
switches per request.

paired_policyd.py loads both trees at once, each pinned to a core of its own. That cancels the VM's drift,
but a change to how the daemon is scheduled (how often it sleeps, wakes and is preempted) shows differently
pinned than it does in policyd_bench.py, where nothing is pinned and the load client, Redis and the daemon
share both cores. Here each tree runs alone in turn (reference, variant, reference...), unpinned, with the
same number of new-triplet requests over the same connections, and from /proc for the daemon's process:
user and system CPU, read and write system calls (``syscr``/``syscw`` in /proc/PID/io), and voluntary and
involuntary context switches, each per request. Many rounds, because each run still drifts ±15%.

  .venv/bin/python bench/alternating_policyd.py --reference main --variant . --checks greylist --rounds 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import policyd_bench as bench
from paired_policyd import CHECKS, export, launcher
from procstat import user_system_seconds

FIELDS = ("cpu_us", "user_us", "system_us", "reads", "writes", "voluntary_cs", "involuntary_cs")


def counters(pid: int) -> dict[str, float]:
    """The daemon's cumulative counters from /proc (CPU in µs)."""
    io = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    status = dict(line.split(":\t") for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if line.endswith(tuple("0123456789")) and "ctxt_switches" in line)
    user, system = (seconds * 1e6 for seconds in user_system_seconds(pid))
    return {"cpu_us": user + system, "user_us": user, "system_us": system, "reads": int(io["syscr"]),
            "writes": int(io["syscw"]), "voluntary_cs": int(status["voluntary_ctxt_switches"]),
            "involuntary_cs": int(status["nonvoluntary_ctxt_switches"])}


def one_run(tree: Path, name: str, work: Path, args: argparse.Namespace, numbers: bench.TripletNumbers,
            loop: asyncio.AbstractEventLoop) -> dict[str, float]:
    with contextlib.ExitStack() as stack:
        target = bench.start_mailwarden(name, work, stack, launcher(tree, args.python, work, name),
                                        checks_run=bench.MAILWARDEN_CHECKS[CHECKS[args.checks]])
        assert target.server.pid is not None
        warm = bench.make_workload("new", numbers, max(args.requests // 10, 1000), 0)
        loop.run_until_complete(bench.drive(target.port, warm.timed, args.connections, args.timeout))
        time.sleep(0.3)  # the warm-up's decision lines are written
        before = counters(target.server.pid)
        work_load = bench.make_workload("new", numbers, args.requests, 0)
        result = loop.run_until_complete(bench.drive(target.port, work_load.timed, args.connections, args.timeout))
        time.sleep(0.3)
        after = counters(target.server.pid)
    figures = {key: (after[key] - before[key]) / args.requests for key in FIELDS}
    figures["req_s"] = args.requests / result.wall
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--reference", default="main", help="git revision of the reference")
    parser.add_argument("--variant", default=".",
                        help="git revision of the variant ('.': this working tree; an absolute path: a prepared tree)")
    parser.add_argument("--checks", choices=sorted(CHECKS), default="all")
    parser.add_argument("--rounds", type=int, default=8, help="runs of each tree, alternating")
    parser.add_argument("--requests", type=int, default=30000, help="timed requests per run")
    parser.add_argument("--connections", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--python", default=str(bench.VENV_PYTHON) if bench.VENV_PYTHON.exists() else sys.executable)
    args = parser.parse_args(argv)
    loop = bench.new_event_loop()
    numbers = bench.TripletNumbers()
    results: dict[str, list[dict[str, float]]] = {"reference": [], "variant": []}
    with tempfile.TemporaryDirectory(prefix="policyd-alternating-") as tmp:
        work = Path(tmp)
        trees = {"reference": export(args.reference, work / "reference-src"),
                 "variant": export(args.variant, work / "variant-src")}
        try:
            for round_number in range(args.rounds):
                for side, tree in trees.items():
                    figures = one_run(tree, f"{side}{round_number}", work, args, numbers, loop)
                    results[side].append(figures)
                    bench.progress(f"round {round_number + 1} {side}: {figures['cpu_us']:.1f} µs/req "
                                   f"(user {figures['user_us']:.1f}, system {figures['system_us']:.1f}), "
                                   f"{figures['req_s']:,.0f} req/s")
        except bench.BenchError as exc:
            print(f"alternating_policyd: {exc}", file=sys.stderr)
            return 1
    print(f"checks={args.checks} rounds={args.rounds} requests/run={args.requests} connections={args.connections}")
    print(f"{'per request':<16}{'reference':>12}{'variant':>12}{'change':>9}   (means over the runs)")
    for key in (*FIELDS, "req_s"):
        reference = statistics.fmean(run[key] for run in results["reference"])
        variant = statistics.fmean(run[key] for run in results["variant"])
        change = (variant - reference) / reference * 100 if reference else 0.0
        print(f"{key:<16}{reference:>12.3f}{variant:>12.3f}{change:>+8.1f}%")
    wins = sum(v["cpu_us"] < r["cpu_us"] for r, v in zip(results["reference"], results["variant"], strict=True))
    print(f"rounds where the variant used less CPU: {wins} of {args.rounds}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
