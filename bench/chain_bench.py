"""Chained milters: mailwarden's ClamAV + SpamAssassin milters against clamav-milter + spamass-milter, through a
real Postfix, and spamd alone (spamc in parallel) as the ceiling.

The machinery is milter_bench.py's (the private Postfix per target, smtp-source into smtp-sink, clamd from the
test harness, clamav-milter's config, /proc readings); this script adds spamd and the two chains:

- one private spamd (the harness's ``SpamdInstance``: local tests only, no network, Bayes auto-learning off),
  with ``--max-children`` = the highest concurrency of the loads, every child started up front and kept for
  the whole benchmark (``--min-children`` = ``--max-spare`` = that number, ``--max-conn-per-child`` high), so
  no session waits for a child to fork and spamd's CPU is read exactly (live children + what the parent reaped);
- ``mailwarden-chain``: ``smtpd_milters = clamav, spamassassin``, two processes (``mailwarden milter clamav``
  with ``checks = ["clamav"]``, ``mailwarden milter spamassassin``), spamd over TCP;
- ``incumbent-chain``: ``smtpd_milters = clamav-milter, spamass-milter``; spamass-milter (Debian's 0.4.0) runs
  Debian's ``spamc`` once per message, as ``-- -d 127.0.0.1 -p PORT`` tells it to reach the same spamd over TCP;
- ``spamc``: no Postfix; ``sessions`` threads each run ``spamc -d 127.0.0.1 -p PORT -u USER -x`` on the same
  message, one after another, as spamass-milter runs it;
- ``no-milter``: the same Postfix with no milter, for the latency the milters add.

**Same spamd user.** Our milter asks spamd as the recipient's mailbox (no recipient sources here: the address
itself, ``to@example.test``). spamass-milter asks as what ``-u``/``-e`` make of the first recipient: with ``-u
mailwarden -e example.test`` it is the whole address, ``to@example.test``, too (``-u``'s user, like our
``shared_user``, would apply to mail for several recipients only; every message here has one). spamc alone asks
as ``to@example.test``. So every scan loads the same (absent) user_prefs, and nobody has a Bayes database.

**What differs in the spamd request.** Ours sends REPORT (spamd returns the score and the rule report); spamc
sends PROCESS (spamd returns the whole message with its headers added, which spamass-milter reads back).

**Load.** smtp-source, one connection per message, ``-s`` sessions in parallel, all sending the same ham-like
message (``-F``): plain English prose of about SIZE bytes, built here from a fixed list of sentences (seeded), so
spamd's body rules do real work; or ``--message FILE``. One recipient per message.

**Latency.** smtp-source reports no per-message times, so the per-message figure is Postfix's own delay ``a``
(``delays=a/b/c/d``, logged in µs here): from MAIL FROM to the queue manager, which holds the body transfer and
every milter's header, body and end-of-message work (not the milters' connect and HELO callbacks, which come
before MAIL FROM). Added latency = a percentile of a target's ``a`` minus the same percentile of ``no-milter``'s
in the same pass. ``client ms`` is smtp-source's whole time per message (Little's law, as in milter_bench.py).
For ``spamc`` the latency is the wall time of each spamc process.

Passes as in milter_bench.py: one discarded warm-up pass, then ``--runs`` passes with the order reversed every
other one (ABBA); the table shows medians. No pass/fail on time: the script fails only if mail is lost, deferred
or rejected, or a spamc fails.

Run as root:  .venv/bin/python bench/chain_bench.py --help
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))  # the harness: tests/harness/*

from harness.clamd import ClamdInstance  # noqa: E402
from harness.net import free_port, wait_for, wait_port  # noqa: E402
from harness.postfix import PostfixInstance  # noqa: E402
from harness.spamd import SpamdInstance  # noqa: E402
from milter_bench import (  # noqa: E402
    CLAMAV_MILTER,
    MAX_SCAN,
    SMTP_SINK,
    SMTP_SOURCE,
    BenchError,
    Load,
    bench_parser,
    busy_seconds,
    check_args,
    human_size,
    progress,
    quarantine_settings,
    reset_peak,
    run_in_workdir,
    run_meta,
    run_passes,
    send,
    spawn,
    start_clamav_milter,
    start_common,
    start_milter,
    start_postfix,
    versions,
)
from procstat import cpu_seconds, group_cpu_seconds, group_members, load_average, memory_mib  # noqa: E402

SPAMASS_MILTER = shutil.which("spamass-milter") or "/usr/sbin/spamass-milter"
SPAMC = shutil.which("spamc") or "/usr/bin/spamc"
SENDER = "from@example.org"
RECIPIENT = "to@example.test"
SPAMD_USER = RECIPIENT
"""Whom spamd scans as, for every target: the recipient's address (see the module's doc)."""

NONE = "no-milter"
OURS = "mailwarden-chain"
THEIRS = "incumbent-chain"
SPAMC_ALONE = "spamc"
TARGETS = (NONE, OURS, THEIRS, SPAMC_ALONE)
DEFAULT_LOADS = ("10K:10:150", "10K:50:300")


# -- the message -----------------------------------------------------------------------------------------

SENTENCES = (
    "Thanks for sending the minutes so quickly after the meeting on Tuesday.",
    "I went through the list of open items and added a few notes below.",
    "The budget for the new lab equipment was approved by the committee last week.",
    "We still need a date for the review with the people from the library.",
    "Could you check whether the room on the second floor is free on Thursday afternoon?",
    "The students asked if the deadline for the project reports can move to the end of the month.",
    "I think that is reasonable, given that the servers were down for two days.",
    "Martin will bring the printed copies of the draft, so nobody has to print their own.",
    "The backup of the old file server finished last night without errors.",
    "Please remember that the building is closed on Monday for the electrical work.",
    "If anything is missing from the notes, just reply to this message and I will update them.",
    "The new schedule for the seminar is attached to the wiki page, not to this message.",
    "Our colleague from the physics department offered to give a short talk in January.",
    "I spoke with the facilities office about the heating in the small meeting room.",
    "They promised to send someone to look at it before the end of the week.",
    "The minutes of the previous meeting were accepted without changes.",
    "We agreed to keep the weekly meeting at ten o'clock, but to end it at eleven sharp.",
    "Anna will take over the coordination of the reading group while Peter is away.",
    "The paper for the workshop is almost ready; only the figures in section four need work.",
    "Let me know if you would rather discuss this on the phone tomorrow morning.",
    "I have also asked the department secretary to book the large lecture hall for the open day.",
    "The list of participants is not final yet, since a few people have not answered.",
    "As discussed, the old mailing list will be closed at the end of the year.",
    "Everyone on it will get a note two weeks before, with the address of the new one.",
)


def ham_message(size: int, seed: int = 11) -> bytes:
    """A plain-text message between colleagues of about ``size`` bytes (header included), always the same."""
    rng = random.Random(seed)
    header = (f"From: Alice Martin <{SENDER}>\nTo: Bob Keller <{RECIPIENT}>\n"
              "Subject: Re: notes from Tuesday's planning meeting\nDate: Tue, 01 Dec 2026 09:14:03 +0000\n"
              "Message-ID: <20261201091403.4711@mail.example.org>\nMIME-Version: 1.0\n"
              "Content-Type: text/plain; charset=us-ascii\nContent-Transfer-Encoding: 7bit\n\n")
    closing = "\nBest regards,\nAlice\n"
    paragraphs = ["Hi Bob,"]
    length = len(header) + len(closing) + len(paragraphs[0])
    while length < size:
        text = " ".join(rng.choice(SENTENCES) for _ in range(rng.randint(3, 6)))
        paragraph = textwrap.fill(text, 72)
        paragraphs.append(paragraph)
        length += len(paragraph) + 2
    return (header + "\n\n".join(paragraphs) + "\n" + closing).encode()


# -- spamd and the milters -------------------------------------------------------------------------------


@dataclass
class BenchSpamd(SpamdInstance):
    """The harness's spamd with all its children forked up front and kept: none forks during a run, none exits
    (so group_cpu_seconds counts nothing twice)."""

    def command(self) -> list[str]:
        argv = [arg for arg in super().command() if not arg.startswith("--min-children=")]
        return [*argv, f"--min-children={self.max_children}", f"--max-spare={self.max_children}",
                "--max-conn-per-child=1000000"]

    def wait_children(self, timeout: float = 120.0) -> None:
        """Until every child is forked (spamd starts them one by one)."""
        assert self.proc is not None
        pgid = self.proc.pid

        wait_for(lambda: len(group_members(pgid)) >= self.max_children + 1, timeout,
                 what=f"spamd's {self.max_children} children")


def start_ours(workdir: Path, clamd: ClamdInstance, spamd: SpamdInstance, transport: str,
               stack: contextlib.ExitStack) -> tuple[list[int], list[str]]:
    """Our two milter processes; their pids and addresses, in chain order."""
    base = workdir / OURS
    settings = {
        "milters": {"clamav": {"clamd": clamd.unix_address, "checks": ["clamav"], "stream_max_length": MAX_SCAN},
                    "spamassassin": {"spamd": {"address": spamd.tcp_address, "timeout": "120s"}}},
        "quarantine": quarantine_settings(base),
        "logging": {"level": "info"},
    }
    pids, addresses = [], []
    for milter in ("clamav", "spamassassin"):
        pid, _log, address = start_milter(base, settings, milter, transport, stack)
        pids.append(pid)
        addresses.append(address)
    return pids, addresses


def start_spamass_milter(workdir: Path, spamd: SpamdInstance, transport: str,
                         stack: contextlib.ExitStack) -> tuple[int, str]:
    """spamass-milter in the foreground, as root (Debian runs it as user spamass-milter: nothing here depends on
    that), reaching our spamd through spamc's own -d/-p."""
    base = workdir / "spamass-milter"
    base.mkdir(parents=True)
    sock = base / "spamass.sock"
    port = free_port()
    listen = str(sock) if transport == "unix" else f"inet:{port}@127.0.0.1"
    # no -i: Debian's default -i 127.0.0.1 would pass every loopback message unscanned (RECIPES.md)
    argv = [SPAMASS_MILTER, "-p", listen, "-u", "mailwarden", "-e", RECIPIENT.partition("@")[2],
            "--", "-d", "127.0.0.1", "-p", str(spamd.port)]
    child = spawn("spamass-milter", argv, base / "spamass-milter.out", stack)
    if transport == "unix":
        wait_for(sock.exists, 20, what="spamass-milter's socket")
        sock.chmod(0o666)  # Postfix's smtpd and cleanup (user postfix) connect to it
        return child.proc.pid, f"unix:{sock}"
    wait_port(port, 20)
    return child.proc.pid, f"inet:127.0.0.1:{port}"


# -- one run ---------------------------------------------------------------------------------------------


@dataclass
class Setup:
    name: str
    postfix: PostfixInstance | None
    milter_pids: list[int] = field(default_factory=list)
    children_cpu: bool = False
    """Count the milters' reaped children too (spamass-milter's spamc)."""


@dataclass
class Costs:
    """CPU per message (µs) and the machine's load during a run."""

    milter_cpu_us: float
    """Both milters (for the incumbents with spamass-milter's spamc children), or the spamc processes."""
    spamd_cpu_us: float
    clamd_cpu_us: float
    machine_cpu_us: float
    """Every process of the machine: Postfix, smtp-source, the sink, the milters, clamd, spamd, other work."""
    busy_pct: float
    """The machine's busy CPU during the run, in % of all its cores."""


@dataclass
class ChainRun:
    target: str
    size: int
    sessions: int
    messages: int
    index: int
    wall: float
    msgs_per_s: float
    client_ms: float | None
    """smtp-source's time per message (sessions x accept time / messages); None for spamc."""
    latency_ms: dict[str, float]
    """p50, p95, p99 of the per-message latency: Postfix's delay a, or each spamc's wall time."""
    costs: Costs
    milter_cpu_each_us: list[float]
    vm_hwm_each_mib: list[float]
    """Each milter's peak resident memory during the run (VmHWM, reset before it)."""
    spamd_rss_mib: float
    """Sum of VmRSS over spamd's processes after the run (shared pages counted in each)."""
    problems: dict[str, int] = field(default_factory=dict)


def percentiles(values: Sequence[float]) -> dict[str, float]:
    ordered = sorted(values)
    if not ordered:
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0}

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * 1000

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99)}


def group_rss_mib(pgid: int) -> float:
    total = 0.0
    for pid in group_members(pgid):
        with contextlib.suppress(OSError):
            total += memory_mib(pid)[0]
    return total


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_spamc(spamd: SpamdInstance, message: bytes, sessions: int, messages: int,
              timeout: float) -> tuple[float, list[float], dict[str, int]]:
    """``messages`` spamc runs, ``sessions`` at a time; (wall, each one's seconds, failures)."""
    argv = [SPAMC, "-d", "127.0.0.1", "-p", str(spamd.port), "-u", SPAMD_USER, "-x"]
    lock = threading.Lock()
    left = [messages]
    latencies: list[float] = []
    problems: dict[str, int] = {}
    deadline = time.monotonic() + timeout

    def worker() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            started = time.perf_counter()
            done = subprocess.run(argv, input=message, capture_output=True, check=False,
                                  timeout=max(1.0, deadline - time.monotonic()))
            took = time.perf_counter() - started
            with lock:
                if done.returncode != 0 or b"\nX-Spam-Status: " not in done.stdout:
                    key = f"spamc exit {done.returncode}: {done.stderr.decode(errors='replace').strip()[:200]}"
                    problems[key] = problems.get(key, 0) + 1
                latencies.append(took)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(sessions) as pool:
        for future in [pool.submit(worker) for _ in range(sessions)]:
            future.result()
    return time.perf_counter() - started, latencies, problems


def measure(setup: Setup, spamd: SpamdInstance, clamd: ClamdInstance, message_file: Path, load: Load,
            messages: int, index: int, timeout: float) -> ChainRun:
    assert spamd.proc is not None and clamd.proc is not None
    for pid in setup.milter_pids:
        reset_peak(pid)
    milter0 = [cpu_seconds(pid, children=setup.children_cpu) for pid in setup.milter_pids]
    spamd0, clamd0, spamc0 = group_cpu_seconds(spamd.proc.pid), cpu_seconds(clamd.proc.pid), children_cpu_seconds()
    busy0 = busy_seconds()
    client_ms = None
    if setup.postfix is None:
        wall, latencies, problems = run_spamc(spamd, message_file.read_bytes(), load.sessions, messages, timeout)
        milter_each = [children_cpu_seconds() - spamc0]
    else:
        delivery = send(setup.name, setup.postfix, load.size, load.sessions, messages, timeout, message_file)
        wall, latencies, problems = delivery.wall, delivery.queue_delays(), delivery.problems()
        client_ms = load.sessions * delivery.accept_wall / messages * 1000
        milter_each = [cpu_seconds(pid, children=setup.children_cpu) - before
                       for pid, before in zip(setup.milter_pids, milter0, strict=True)]
    busy = busy_seconds() - busy0
    spamd_cpu = group_cpu_seconds(spamd.proc.pid) - spamd0
    clamd_cpu = cpu_seconds(clamd.proc.pid) - clamd0
    hwm = [memory_mib(pid)[1] for pid in setup.milter_pids]
    costs = Costs(sum(milter_each) / messages * 1e6, spamd_cpu / messages * 1e6, clamd_cpu / messages * 1e6,
                  busy / messages * 1e6, busy / wall / (os.cpu_count() or 1) * 100)
    return ChainRun(setup.name, load.size, load.sessions, messages, index, wall, messages / wall, client_ms,
                    percentiles(latencies), costs, [cpu / messages * 1e6 for cpu in milter_each], hwm,
                    group_rss_mib(spamd.proc.pid), problems)


# -- summary ---------------------------------------------------------------------------------------------


@dataclass
class ChainRow:
    target: str
    size: int
    sessions: int
    runs: int
    msgs_per_s: float
    x_spamd: float | None
    """msg/s against spamc's (spamd alone) at the same load."""
    client_ms: float | None
    latency_ms: dict[str, float]
    added_ms: dict[str, float] | None
    """Each latency percentile minus no-milter's (medians over the runs)."""
    costs: Costs
    """Medians over the runs."""
    vm_hwm_each_mib: list[float]
    """Each milter's highest peak over the runs."""
    problems: int


def summarise(results: list[ChainRun]) -> list[ChainRow]:
    rows: list[ChainRow] = []
    for size, sessions in sorted({(r.size, r.sessions) for r in results}):
        group = {t: [r for r in results if (r.size, r.sessions, r.target) == (size, sessions, t) and r.index > 0]
                 for t in TARGETS}
        med = {t: statistics.median(r.msgs_per_s for r in rs) for t, rs in group.items() if rs}
        lat = {t: {p: statistics.median(r.latency_ms[p] for r in rs) for p in ("p50", "p95", "p99")}
               for t, rs in group.items() if rs}
        for t, rs in group.items():
            if not rs:
                continue
            clients = [r.client_ms for r in rs if r.client_ms is not None]
            added = ({p: lat[t][p] - lat[NONE][p] for p in lat[t]}
                     if NONE in lat and t in (OURS, THEIRS) else None)
            costs = Costs(**{f.name: statistics.median(getattr(r.costs, f.name) for r in rs)
                             for f in fields(Costs)})
            rows.append(ChainRow(
                t, size, sessions, len(rs), med[t],
                med[t] / med[SPAMC_ALONE] if SPAMC_ALONE in med and t in (OURS, THEIRS) else None,
                statistics.median(clients) if clients else None, lat[t], added, costs,
                [max(each) for each in zip(*(r.vm_hwm_each_mib for r in rs), strict=True)],
                sum(sum(r.problems.values()) for r in rs)))
    return rows


def render_table(rows: list[ChainRow]) -> str:
    head = (f"{'size':>6} {'sess':>4}  {'target':17} {'msg/s':>6} {'x spamd':>7} {'client ms':>9} "
            f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'+p50':>7} {'+p95':>7} {'+p99':>7} "
            f"{'milter µs':>9} {'spamd µs':>9} {'clamd µs':>8} {'all µs':>8} {'busy %':>6} {'HWM MB':>7} {'bad':>4}")
    lines = [head, "-" * len(head)]
    previous = None

    def opt(value: float | None, spec: str, width: int) -> str:
        return f"{value:{spec}}".rjust(width) if value is not None else "-".rjust(width)

    for r in rows:
        if previous is not None and previous != (r.size, r.sessions):
            lines.append("")
        previous = (r.size, r.sessions)
        added, c = r.added_ms or {}, r.costs
        lines.append(
            f"{human_size(r.size):>6} {r.sessions:>4}  {r.target:17} {r.msgs_per_s:6.1f} "
            f"{opt(r.x_spamd, '.2f', 6)}{'x' if r.x_spamd is not None else ' '} {opt(r.client_ms, '.1f', 9)} "
            f"{r.latency_ms['p50']:7.1f} {r.latency_ms['p95']:7.1f} {r.latency_ms['p99']:7.1f} "
            f"{opt(added.get('p50'), '+.1f', 7)} {opt(added.get('p95'), '+.1f', 7)} {opt(added.get('p99'), '+.1f', 7)} "
            f"{c.milter_cpu_us:9,.0f} {c.spamd_cpu_us:9,.0f} {c.clamd_cpu_us:8,.0f} {c.machine_cpu_us:8,.0f} "
            f"{c.busy_pct:6.0f} {opt(sum(r.vm_hwm_each_mib) if r.vm_hwm_each_mib else None, '.1f', 7)} "
            f"{r.problems:>4}")
    return "\n".join(lines)


# -- orchestration ---------------------------------------------------------------------------------------


def run_benchmark(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    children = max(load.sessions for load in args.loads)
    progress(f"starting clamd, smtp-sink, spamd ({children} children) ...")
    clamd, sink, sink_port = start_common(workdir, stack)
    spamd = BenchSpamd(workdir / "spamd", max_children=children)
    stack.callback(spamd.stop)
    spamd.start()
    spamd.wait_children()
    setups: dict[str, Setup] = {}
    for name in args.targets:
        progress(f"starting {name} ...")
        if name == SPAMC_ALONE:
            setups[name] = Setup(name, None)
            continue
        pids: list[int] = []
        addresses: list[str] = []
        if name == OURS:
            pids, addresses = start_ours(workdir, clamd, spamd, args.socket, stack)
        elif name == THEIRS:
            clamav_pid, _log, clamav_address = start_clamav_milter(workdir, clamd, args.socket, stack)
            spamass_pid, spamass_address = start_spamass_milter(workdir, spamd, args.socket, stack)
            pids, addresses = [clamav_pid, spamass_pid], [clamav_address, spamass_address]
        postfix = start_postfix(name, workdir, sink_port, ", ".join(addresses), stack)
        setups[name] = Setup(name, postfix, pids, children_cpu=name == THEIRS)
    meta = run_meta(args, {**versions(), "spamd": spamd_version(),
                           "spamass-milter": package_version("spamass-milter"), "spamc": package_version("spamc")})
    results: list[ChainRun] = []
    names = list(args.targets)

    def one(name: str, load: Load, index: int, messages: int) -> None:
        if sink.proc.poll() is not None:
            raise BenchError("smtp-sink exited")
        message_file = args.message or message_for(workdir, load.size)
        result = measure(setups[name], spamd, clamd, message_file, load, messages, index, args.timeout)
        results.append(result)
        label = "warm-up" if index == 0 else f"run {index}/{args.runs}"
        lat = result.latency_ms
        c = result.costs
        progress(f"{human_size(load.size):>6} s{load.sessions:<3} {label:9} {name:17} {result.msgs_per_s:6.1f} msg/s"
                 f"  p50/p95/p99 {lat['p50']:7.1f} {lat['p95']:7.1f} {lat['p99']:7.1f} ms  milter "
                 f"{c.milter_cpu_us:7.0f} µs  spamd {c.spamd_cpu_us:7.0f} µs  clamd {c.clamd_cpu_us:5.0f} µs  all "
                 f"{c.machine_cpu_us:7.0f} µs  busy {c.busy_pct:3.0f}%  HWM {sum(result.vm_hwm_each_mib):6.1f} MB"
                 + (f"  PROBLEMS {result.problems}" if result.problems else ""))
        if result.problems:
            postfix = setups[name].postfix
            where = postfix.maillog if postfix is not None else "spamc's answers"
            raise BenchError(f"{name}: mail was deferred or rejected, or spamc failed: {result.problems}; see {where}")

    run_passes(names, args.loads, args.runs, one)
    meta["loadavg_after"] = load_average()
    rows = summarise(results)
    return {"meta": meta, "summary": [asdict(r) for r in rows], "runs": [asdict(r) for r in results],
            "table": render_table(rows)}


def message_for(workdir: Path, size: int) -> Path:
    path = workdir / f"ham-{size}.eml"
    if not path.exists():
        path.write_bytes(ham_message(size))
        path.chmod(0o644)
    return path


def package_version(package: str) -> str:
    done = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True,
                          check=False)
    return f"{package} {done.stdout.strip() or 'unknown'}"


def spamd_version() -> str:
    done = subprocess.run(["spamd", "--version"], capture_output=True, text=True, check=False, timeout=60)
    return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else "unknown"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = bench_parser("Benchmark mailwarden's ClamAV + SpamAssassin milters chained against clamav-milter + "
                          "spamass-milter through a private Postfix, and spamd alone with spamc.", TARGETS,
                          DEFAULT_LOADS, "SIZE: of the generated message; SESSIONS: smtp-source -s, and spamc "
                          "processes at once", "unix", 300.0, "chain_bench.json")
    parser.add_argument("--message", type=Path, default=None,
                        help="send this message file (header and body) instead of the generated ham")
    args = parser.parse_args(argv)
    check_args(parser, args, TARGETS)
    if args.message is not None:
        args.message = args.message.resolve()
        if not args.message.is_file():
            parser.error(f"--message: {args.message} is not a file")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [p for p in (SMTP_SOURCE, SMTP_SINK, CLAMAV_MILTER, SPAMASS_MILTER, SPAMC) if not Path(p).exists()]
    report = run_in_workdir("mailwarden-chain-bench-", args, run_benchmark, missing)
    if isinstance(report, int):
        return report
    meta = report["meta"]
    v = meta["versions"]
    print(f"{meta['date']}  {meta['cpus']} cores  load average before {meta['loadavg_before']} after "
          f"{meta['loadavg_after']}  mailwarden {v['mailwarden']}")
    print(f"{v['spamd']}; {v['spamass-milter']}; {v['clamav-milter']}; {v['spamc']}")
    print(f"milters on {args.socket} sockets, spamd over TCP; median of {args.runs} runs per row (ABBA order, one "
          f"warm-up pass discarded); latency: Postfix's delay a per message (spamc: each spamc's wall time); "
          f"JSON: {args.json}\n")
    print(report["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
