"""Side-by-side benchmark: mailwarden's ClamAV milter against Debian's clamav-milter, through a real Postfix.

What runs (every process started here, on free loopback ports, and stopped on the way out):

- one private clamd (the test harness's ``ClamdInstance``: the local test signatures only), which every
  milter streams to over the same unix socket;
- one Postfix ``smtp-sink`` that every Postfix relays to;
- one private Postfix per target (the harness's ``PostfixInstance``, message_size_limit 50 MB), whose
  ``smtpd_milters`` names that target's milter (or nothing: the baseline);
- the milters: ``mailwarden milter clamav`` with ``checks = ["clamav"]`` (the same job as clamav-milter) and
  with ``checks = ["banned", "clamav"]`` (the shipped pair), and ``clamav-milter`` in the foreground with a
  config of its own (Debian's values, OnInfected Reject, no User).

Load: Postfix's ``smtp-source`` (one connection per message, ``-s`` sessions in parallel, junk-text bodies of
``-l`` bytes: clean mail). A run's wall time is from starting smtp-source to the last ``status=sent`` line in
that Postfix's maillog (every message relayed to the sink). Per run: messages/s; the client's time per
message (sessions x accept time / messages, Little's law: connect to 250 after DATA, which includes the
milter's end-of-message answer); each milter's and clamd's CPU per message from /proc/PID/stat; the whole
machine's busy CPU from /proc/stat; the milter's peak memory (VmHWM, reset before each run through
/proc/PID/clear_refs) and VmRSS after.

This VM drifts about 25% within seconds, so runs go in passes: every target once per pass, the order reversed
on every other pass (ABBA), after one discarded warm-up pass; the table shows medians. No pass/fail on
wall-clock numbers: the script fails only if mail is lost, deferred or rejected.

Run as root (Postfix and its queue need it):  .venv/bin/python bench/milter_bench.py --help
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from procstat import CLK_TCK, cpu_seconds, load_average, memory_mib

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))  # the harness: tests/harness/*

from harness.clamd import ClamdInstance  # noqa: E402
from harness.milter_proc import MilterProcess  # noqa: E402
from harness.net import free_port, wait_for, wait_port  # noqa: E402
from harness.postfix import PostfixInstance  # noqa: E402

SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
CLAMAV_MILTER = shutil.which("clamav-milter") or "/usr/sbin/clamav-milter"
MESSAGE_SIZE_LIMIT = 52428800
MAX_SCAN = "25M"
"""clamd's StreamMaxLength, clamav-milter's MaxFileSize and our stream_max_length: 20 MB messages are scanned."""

NONE = "no-milter"
OURS = "mailwarden-clamav"
OURS_BANNED = "mailwarden-banned+clamav"
THEIRS = "clamav-milter"
TARGETS = (NONE, OURS, OURS_BANNED, THEIRS)
REFERENCE = THEIRS

CLAMAV_MILTER_CONF = """\
# written by bench/milter_bench.py: Debian's /etc/clamav/clamav-milter.conf values, privately
MilterSocket {listen}
ClamdSocket unix:{clamd}
Foreground yes
PidFile {d}/clamav-milter.pid
TemporaryDirectory {d}/tmp
LogFile {d}/clamav-milter.log
LogTime yes
LogFileMaxSize 0
LogInfected Basic
LogClean Off
ReadTimeout 120
OnClean Accept
OnInfected Reject
OnFail Defer
AddHeader Replace
SupportMultipleRecipients false
MaxFileSize {max_scan}
"""


class BenchError(RuntimeError):
    pass


# -- /proc -----------------------------------------------------------------------------------------------






def reset_peak(pid: int) -> bool:
    """Set VmHWM back to the current RSS (Linux 4.0+, root): the peak of one run, not of the process's life."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def busy_seconds() -> float:
    """user + nice + system + irq + softirq + steal of the whole machine since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (fields[0] + fields[1] + fields[2] + fields[5] + fields[6] + fields[7]) / CLK_TCK




# -- processes -------------------------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    proc: subprocess.Popen[bytes]

    def stop(self, grace: float = 15.0) -> None:
        if self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def spawn(name: str, argv: list[str], log: Path, stack: contextlib.ExitStack) -> Proc:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    child = Proc(name, proc)
    stack.callback(child.stop)
    return child


@dataclass
class Target:
    name: str
    postfix: PostfixInstance
    milter_pid: int | None = None
    log_path: Path | None = None


def start_postfix(name: str, workdir: Path, sink_port: int, milters: str,
                  stack: contextlib.ExitStack) -> PostfixInstance:
    instance = PostfixInstance(workdir / f"pf-{name}", free_port(), sink_port, None, milters=milters)
    instance.write()
    # delays= in µs (a: from MAIL FROM to the queue manager, the milters' time included): latency percentiles
    subprocess.run(["postconf", "-c", str(instance.conf), "-e", f"message_size_limit={MESSAGE_SIZE_LIMIT}",
                    "delay_logging_resolution_limit=6"], check=True, capture_output=True)
    stack.callback(instance.stop)
    instance._postfix("start")
    wait_port(instance.smtp_port, 15)
    return instance


def start_milter(base: Path, settings: dict[str, Any], milter: str, transport: str,
                 stack: contextlib.ExitStack) -> tuple[int, Path, str]:
    """``mailwarden milter MILTER`` from ``settings`` in ``base`` (its quarantine migrated first); its pid, log
    and the address Postfix's smtpd_milters names."""
    milter_proc = MilterProcess(base, settings, name=milter,
                                unix_socket=base / f"{milter}.sock" if transport == "unix" else None)
    config = milter_proc.write_config()
    subprocess.run([sys.executable, "-m", "mailwarden.cli", "--config", str(config), "quarantine", "migrate"],
                   check=True, capture_output=True, timeout=60)
    stack.callback(milter_proc.stop)
    milter_proc.start()
    assert milter_proc.proc is not None
    if milter_proc.unix_socket:  # Postfix's smtpd and cleanup (user postfix) connect to it; the milter runs as root
        milter_proc.unix_socket.chmod(0o666)
    return milter_proc.proc.pid, milter_proc.log_path, milter_proc.address


def quarantine_settings(base: Path) -> dict[str, str]:
    (base / "held").mkdir(parents=True, exist_ok=True)
    return {"database_url": f"sqlite:///{base}/q.sqlite", "message_dir": str(base / "held")}


def start_ours(name: str, checks: list[str], workdir: Path, clamd: ClamdInstance, transport: str,
               stack: contextlib.ExitStack) -> tuple[int, Path, str]:
    base = workdir / name
    settings = {
        "milters": {"clamav": {"clamd": clamd.unix_address, "checks": checks, "stream_max_length": MAX_SCAN}},
        "quarantine": quarantine_settings(base),
        "logging": {"level": "info"},
    }
    return start_milter(base, settings, "clamav", transport, stack)


def start_clamav_milter(workdir: Path, clamd: ClamdInstance, transport: str,
                        stack: contextlib.ExitStack) -> tuple[int, Path, str]:
    base = workdir / THEIRS
    (base / "tmp").mkdir(parents=True)
    port = free_port()
    sock = base / "milter.sock"
    listen = f"unix:{sock}\nMilterSocketMode 666" if transport == "unix" else f"inet:{port}@127.0.0.1"
    conf = base / "clamav-milter.conf"
    conf.write_text(CLAMAV_MILTER_CONF.format(listen=listen, clamd=clamd.unix_socket, d=base, max_scan=MAX_SCAN))
    child = spawn(THEIRS, [CLAMAV_MILTER, f"--config-file={conf}"], base / "clamav-milter.out", stack)
    if transport == "unix":
        wait_for(sock.exists, 20, what="clamav-milter's socket")
        return child.proc.pid, base / "clamav-milter.log", f"unix:{sock}"
    wait_port(port, 20)
    return child.proc.pid, base / "clamav-milter.log", f"inet:127.0.0.1:{port}"


# -- one run ---------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    target: str
    size: int
    sessions: int
    messages: int
    index: int
    wall: float
    accept_wall: float
    msgs_per_s: float
    client_ms: float
    """Mean time per message as smtp-source saw it: sessions x accept time / messages (Little's law)."""
    milter_cpu_us: float
    clamd_cpu_us: float
    machine_cpu_us: float
    """All CPU of the machine per message (every process: Postfix, smtp-source, the sink, clamd, the milter)."""
    busy_pct: float
    """The machine's busy CPU during the run, in % of all its cores."""
    vm_hwm_mib: float
    vm_rss_mib: float
    eom_ms_p50: float | None = None
    """Our milter's own end-of-message time (its decision lines' ms=), median; None for others."""
    problems: dict[str, int] = field(default_factory=dict)


SENT = re.compile(rb"status=sent")
PROBLEM = re.compile(rb"status=(deferred|bounced)|milter-reject|reject:")
MS = re.compile(rb"\bms=([0-9.]+)")
DELAY_A = re.compile(rb"delays=([0-9.]+)/[^\n]*status=sent")


def read_from(path: Path, offset: int) -> bytes:
    if not path.exists():
        return b""
    with path.open("rb") as f:
        f.seek(offset)
        return f.read()


@dataclass
class Delivery:
    """One smtp-source run through a Postfix, every message relayed to the sink."""

    wall: float
    """From starting smtp-source to the last status=sent line."""
    accept_wall: float
    """From starting smtp-source to its exit (every message accepted)."""
    maillog: bytes
    """What the Postfix logged during the run."""

    def problems(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for match in PROBLEM.finditer(self.maillog):
            key = match.group(0).decode()
            found[key] = found.get(key, 0) + 1
        return found

    def queue_delays(self) -> list[float]:
        """Per message, Postfix's delay a (MAIL FROM to the queue manager: the transfer and every milter)."""
        return [float(v) for v in DELAY_A.findall(self.maillog)]


def send(name: str, pf: PostfixInstance, size: int, sessions: int, messages: int, timeout: float,
         message_file: Path | None = None) -> Delivery:
    """``messages`` messages through ``pf`` with smtp-source, ``sessions`` at a time: junk text of ``size`` bytes,
    or ``message_file`` (header and body) as it is; returns once the sink has every one."""
    log_offset = pf.maillog.stat().st_size if pf.maillog.exists() else 0
    body = ["-F", str(message_file)] if message_file else ["-l", str(size)]
    argv = [SMTP_SOURCE, "-c", *body, "-m", str(messages), "-s", str(sessions),
            "-t", "to@example.test", "-f", "from@example.org", f"127.0.0.1:{pf.smtp_port}"]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    accepted = time.perf_counter()
    if done.returncode != 0:
        raise BenchError(f"{name}: smtp-source exited {done.returncode}: {done.stderr.decode()[-2000:]}")
    deadline = started + timeout
    while True:
        text = read_from(pf.maillog, log_offset)
        sent = len(SENT.findall(text))
        if sent >= messages:
            break
        if time.perf_counter() > deadline:
            raise BenchError(f"{name}: {sent} of {messages} delivered after {timeout:g}s; see {pf.maillog}")
        time.sleep(0.01)
    return Delivery(time.perf_counter() - started, accepted - started, text)


def measure(target: Target, clamd_pid: int, size: int, sessions: int, messages: int, index: int,
            timeout: float) -> RunResult:
    milter_log_offset = target.log_path.stat().st_size if target.log_path and target.log_path.exists() else 0
    pid = target.milter_pid
    if pid:
        reset_peak(pid)
    milter_cpu0 = cpu_seconds(pid) if pid else 0.0
    clamd_cpu0 = cpu_seconds(clamd_pid)
    busy0 = busy_seconds()
    delivery = send(target.name, target.postfix, size, sessions, messages, timeout)
    busy = busy_seconds() - busy0
    clamd_cpu = cpu_seconds(clamd_pid) - clamd_cpu0
    milter_cpu = cpu_seconds(pid) - milter_cpu0 if pid else 0.0
    rss, hwm = memory_mib(pid) if pid else (0.0, 0.0)
    eom = None
    if target.log_path and target.name != THEIRS:
        values = [float(v) for v in MS.findall(read_from(target.log_path, milter_log_offset))]
        eom = statistics.median(values) if values else None
    wall, accept = delivery.wall, delivery.accept_wall
    return RunResult(target.name, size, sessions, messages, index, wall, accept, messages / wall,
                     sessions * accept / messages * 1000, milter_cpu / messages * 1e6, clamd_cpu / messages * 1e6,
                     busy / messages * 1e6, busy / wall / (os.cpu_count() or 1) * 100, hwm, rss, eom,
                     delivery.problems())


# -- summary ---------------------------------------------------------------------------------------------


@dataclass
class Row:
    target: str
    size: int
    sessions: int
    runs: int
    msgs_per_s: float
    x_ref: float | None
    client_ms: float
    added_ms: float | None
    milter_cpu_us: float
    clamd_cpu_us: float
    machine_cpu_us: float
    busy_pct: float
    vm_hwm_mib: float
    vm_rss_mib: float
    eom_ms_p50: float | None
    problems: int


def summarise(results: list[RunResult]) -> list[Row]:
    rows: list[Row] = []
    keys = sorted({(r.size, r.sessions) for r in results})
    for size, sessions in keys:
        group = {t: [r for r in results if (r.size, r.sessions, r.target) == (size, sessions, t) and r.index > 0]
                 for t in TARGETS}
        med = {t: statistics.median(r.msgs_per_s for r in rs) for t, rs in group.items() if rs}
        client = {t: statistics.median(r.client_ms for r in rs) for t, rs in group.items() if rs}
        for t, rs in group.items():
            if not rs:
                continue
            eoms = [r.eom_ms_p50 for r in rs if r.eom_ms_p50 is not None]
            rows.append(Row(
                t, size, sessions, len(rs), med[t],
                med[t] / med[REFERENCE] if REFERENCE in med and t != NONE else None,
                client[t], client[t] - client[NONE] if NONE in client and t != NONE else None,
                statistics.median(r.milter_cpu_us for r in rs), statistics.median(r.clamd_cpu_us for r in rs),
                statistics.median(r.machine_cpu_us for r in rs), statistics.median(r.busy_pct for r in rs),
                max(r.vm_hwm_mib for r in rs), statistics.median(r.vm_rss_mib for r in rs),
                statistics.median(eoms) if eoms else None, sum(sum(r.problems.values()) for r in rs)))
    return rows


def human_size(size: int) -> str:
    if size >= 1 << 20 and size % (1 << 20) == 0:
        return f"{size >> 20} MB"
    if size >= 1000 and size % 1000 == 0:
        return f"{size // 1000} KB"
    return f"{size} B"


def render_table(rows: list[Row]) -> str:
    head = (f"{'size':>6} {'sess':>4}  {'target':24} {'msg/s':>7} {'x cm':>6} {'client ms':>9} {'+ms':>7} "
            f"{'milter µs':>9} {'clamd µs':>9} {'all µs':>8} {'busy %':>6} {'HWM MB':>7} {'RSS MB':>7} "
            f"{'eom ms':>7} {'bad':>4}")
    lines = [head, "-" * len(head)]
    previous = None
    for r in rows:
        if previous is not None and previous != (r.size, r.sessions):
            lines.append("")
        previous = (r.size, r.sessions)
        lines.append(
            f"{human_size(r.size):>6} {r.sessions:>4}  {r.target:24} {r.msgs_per_s:7,.1f} "
            f"{(f'{r.x_ref:.2f}x' if r.x_ref is not None else '-'):>6} {r.client_ms:9.1f} "
            f"{(f'{r.added_ms:+.1f}' if r.added_ms is not None else '-'):>7} {r.milter_cpu_us:9,.0f} "
            f"{r.clamd_cpu_us:9,.0f} {r.machine_cpu_us:8,.0f} {r.busy_pct:6.0f} "
            f"{(f'{r.vm_hwm_mib:.1f}' if r.target != NONE else '-'):>7} "
            f"{(f'{r.vm_rss_mib:.1f}' if r.target != NONE else '-'):>7} "
            f"{(f'{r.eom_ms_p50:.1f}' if r.eom_ms_p50 is not None else '-'):>7} {r.problems:>4}")
    return "\n".join(lines)


# -- orchestration ---------------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Load:
    size: int
    sessions: int
    messages: int


def parse_load(text: str) -> Load:
    """SIZE:SESSIONS:MESSAGES, SIZE in bytes or with K/M (decimal K, binary M as smtp-source sizes go)."""
    try:
        size_text, sessions, messages = text.split(":")
        units = {"K": 1000, "M": 1 << 20}
        size = int(size_text[:-1]) * units[size_text[-1].upper()] if size_text[-1].upper() in units \
            else int(size_text)
        load = Load(size, int(sessions), int(messages))
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"{text!r}: expected SIZE:SESSIONS:MESSAGES, e.g. 10K:10:1000") from None
    if min(load.size, load.sessions, load.messages) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every part must be at least 1")
    return load


DEFAULT_LOADS = ("10K:10:600", "10K:50:1000", "1M:10:100", "20M:10:6")


def versions() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=15, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"unknown ({exc})"
        text = (done.stdout or done.stderr).strip()
        return text.splitlines()[0] if text else "unknown"

    return {
        "clamav-milter": first_line([CLAMAV_MILTER, "--version"]),
        "clamd": first_line(["clamd", "--version"]),
        "postfix": first_line(["postconf", "-c", "/etc/postfix", "-d", "mail_version"]),
        "python": first_line([sys.executable, "--version"]),
        "mailwarden": first_line(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
    }


def run_passes(names: Sequence[str], loads: Sequence[Load], runs: int,
               one: Callable[[str, Load, int, int], None]) -> None:
    """``one(target, load, index, messages)`` for every run: a warm-up pass (index 0, a fifth of the first load's
    messages, at least one per session), then ``runs`` passes per load, every target once per pass, the order
    reversed every other pass (ABBA)."""
    warm = loads[0]
    for name in names:
        one(name, warm, 0, max(warm.sessions, warm.messages // 5))
    for load in loads:
        for index in range(1, runs + 1):
            for name in (names if index % 2 else list(reversed(names))):
                one(name, load, index, load.messages)


def start_common(workdir: Path, stack: contextlib.ExitStack) -> tuple[ClamdInstance, Proc, int]:
    """What every target shares: clamd (and the PYTHONPATH our milters need) and the sink; the sink's port."""
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    clamd = ClamdInstance(workdir / "clamd", stream_max_length=MAX_SCAN)
    stack.callback(clamd.stop)
    clamd.start()
    assert clamd.proc is not None
    sink_port = free_port()
    sink = spawn("smtp-sink", [SMTP_SINK, "-u", "nobody", f"127.0.0.1:{sink_port}", "256"], workdir / "sink.log",
                 stack)
    wait_port(sink_port, 10)
    return clamd, sink, sink_port


def run_meta(args: argparse.Namespace, versions: dict[str, str]) -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "cpus": os.cpu_count(), "kernel": platform.release(),
        "loadavg_before": load_average(), "versions": versions,
        "args": {k: ([asdict(v) for v in val] if k == "loads" else val) for k, val in vars(args).items()},
    }


def run_benchmark(args: argparse.Namespace, workdir: Path, stack: contextlib.ExitStack) -> dict[str, Any]:
    progress("starting clamd, smtp-sink ...")
    clamd, sink, sink_port = start_common(workdir, stack)
    targets: dict[str, Target] = {}
    for name in args.targets:
        progress(f"starting {name} ...")
        pid, log_path, address = None, None, ""
        if name == OURS:
            pid, log_path, address = start_ours(name, ["clamav"], workdir, clamd, args.socket, stack)
        elif name == OURS_BANNED:
            pid, log_path, address = start_ours(name, ["banned", "clamav"], workdir, clamd, args.socket, stack)
        elif name == THEIRS:
            pid, log_path, address = start_clamav_milter(workdir, clamd, args.socket, stack)
        targets[name] = Target(name, start_postfix(name, workdir, sink_port, address, stack), pid, log_path)
    meta = run_meta(args, versions())
    results: list[RunResult] = []
    names = list(args.targets)

    def one(name: str, load: Load, index: int, messages: int) -> None:
        if sink.proc.poll() is not None:
            raise BenchError("smtp-sink exited")
        result = measure(targets[name], clamd.proc.pid, load.size, load.sessions, messages, index,  # type: ignore[union-attr]
                         args.timeout)
        results.append(result)
        label = "warm-up" if index == 0 else f"run {index}/{args.runs}"
        progress(f"{human_size(load.size):>6} s{load.sessions:<3} {label:9} {name:24} {result.msgs_per_s:7.1f} msg/s"
                 f"  client {result.client_ms:6.1f} ms  milter {result.milter_cpu_us:7.0f} µs  clamd "
                 f"{result.clamd_cpu_us:7.0f} µs  all {result.machine_cpu_us:7.0f} µs  busy {result.busy_pct:3.0f}%"
                 f"  HWM {result.vm_hwm_mib:6.1f} MB" + (f"  PROBLEMS {result.problems}" if result.problems else ""))
        if result.problems:
            raise BenchError(f"{name}: mail was deferred or rejected: {result.problems}; "
                             f"see {targets[name].postfix.maillog}")

    run_passes(names, args.loads, args.runs, one)
    meta["loadavg_after"] = load_average()
    rows = summarise(results)
    return {"meta": meta, "summary": [asdict(r) for r in rows], "runs": [asdict(r) for r in results],
            "table": render_table(rows)}


def bench_parser(description: str, targets: Sequence[str], loads: Sequence[str], loads_help: str, socket: str,
                 timeout: float, json_name: str) -> argparse.ArgumentParser:
    """The options both milter benchmarks take: --targets, --loads, --runs, --socket, --timeout, --json, --keep."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--targets", default=",".join(targets),
                        type=lambda s: [t for t in s.split(",") if t],
                        help=f"comma-separated subset of {','.join(targets)}")
    parser.add_argument("--loads", nargs="+", type=parse_load, default=[parse_load(x) for x in loads],
                        help=f"SIZE:SESSIONS:MESSAGES per load ({loads_help}); the first also warms up")
    parser.add_argument("--runs", type=int, default=3, help="measured runs per target and load (ABBA order)")
    parser.add_argument("--socket", choices=("inet", "unix"), default=socket,
                        help="how Postfix reaches the milters: a loopback TCP port or a unix socket")
    parser.add_argument("--timeout", type=float, default=timeout, help="seconds allowed per run")
    parser.add_argument("--json", type=Path, default=Path(tempfile.gettempdir()) / json_name,
                        help="where to write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, targets: Sequence[str]) -> None:
    bad = [t for t in args.targets if t not in targets]
    if bad or not args.targets:
        parser.error(f"--targets: expected a subset of {','.join(targets)}")
    if args.runs < 1:
        parser.error("--runs must be at least 1")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = bench_parser("Benchmark mailwarden's ClamAV milter against clamav-milter through a private Postfix.",
                          TARGETS, DEFAULT_LOADS, "smtp-source -l, -s, -m", "inet", 180.0, "milter_bench.json")
    args = parser.parse_args(argv)
    check_args(parser, args, TARGETS)
    return args


def run_in_workdir(prefix: str, args: argparse.Namespace,
                   run: Callable[[argparse.Namespace, Path, contextlib.ExitStack], dict[str, Any]],
                   missing: Sequence[str] = ()) -> dict[str, Any] | int:
    """``run(args, workdir, stack)`` in a new work directory; everything it put on the stack is stopped on the
    way out, on SIGTERM and SIGHUP too. Returns the report (also written to ``args.json`` without its
    ``table``), or the exit status: 2 when not root or a program in ``missing``, 1 after a failure (the work
    directory then kept), 130 after an interruption."""
    if os.geteuid() != 0:
        progress("run as root: the private Postfix instances need it")
        return 2
    if missing:
        progress(f"missing {', '.join(missing)}: WITH_BENCH=1 bash tools/install-system-deps.sh installs them")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix=prefix))
    workdir.chmod(0o755)  # Postfix's own users (and spamd's) must reach what is in here
    keep = args.keep
    stack = contextlib.ExitStack()

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, interrupted)
    try:
        try:
            report = run(args, workdir, stack)
        finally:
            progress("stopping ...")
            with contextlib.suppress(Exception):
                stack.close()
    except KeyboardInterrupt:
        progress("interrupted; everything stopped")
        return 130
    except (BenchError, TimeoutError, RuntimeError, subprocess.SubprocessError) as exc:
        keep = True
        progress(f"benchmark failed: {exc}")
        return 1
    finally:
        if keep:
            progress(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    args.json.write_text(json.dumps({k: v for k, v in report.items() if k != "table"}, indent=2, default=str) + "\n")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [p for p in (SMTP_SOURCE, SMTP_SINK, CLAMAV_MILTER) if not Path(p).exists()]
    if THEIRS not in args.targets and SMTP_SOURCE not in missing and SMTP_SINK not in missing:
        missing = []
    report = run_in_workdir("mailwarden-milter-bench-", args, run_benchmark, missing)
    if isinstance(report, int):
        return report
    meta = report["meta"]
    print(f"{meta['date']}  {meta['cpus']} cores  load average before {meta['loadavg_before']} after "
          f"{meta['loadavg_after']}  mailwarden {meta['versions']['mailwarden']}  {meta['versions']['clamav-milter']}")
    print(f"milters on {args.socket} sockets; median of {args.runs} runs per row (ABBA order, one warm-up pass "
          f"discarded); JSON: {args.json}\n")
    print(report["table"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
