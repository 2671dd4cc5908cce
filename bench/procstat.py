"""What the benchmarks read from /proc about a server process: its CPU time and its memory."""

from __future__ import annotations

import os
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[bytes]:
    """/proc/PID/stat after the command name (which may hold spaces and parentheses): index 0 is the state."""
    data = Path(f"/proc/{pid}/stat").read_bytes()
    return data[data.rfind(b")") + 2:].split()


def user_system_seconds(pid: int) -> tuple[float, float]:
    """utime and stime of a process (all its threads), apart."""
    fields = _stat_fields(pid)
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime + stime of a process (all its threads) from /proc/PID/stat; with ``children``, plus what its
    exited children it waited for used (cutime + cstime: e.g. the spamc each spamass-milter scan runs)."""
    fields = _stat_fields(pid)
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def group_cpu_seconds(pgid: int) -> float:
    """utime + stime of every live process in the process group ``pgid`` (Dovecot: the master and the
    services it forked; spamd and its children), plus the leader's cutime + cstime, where the CPU of members
    that exited and that it reaped ends up. A member that exits between two readings is counted again, whole,
    in the leader: keep them alive across a measurement."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            data = stat.read_bytes()
        except OSError:
            continue  # exited meanwhile
        fields = data[data.rfind(b")") + 2:].split()  # the command name may hold spaces and parentheses
        if int(fields[2]) != pgid:
            continue
        total += int(fields[11]) + int(fields[12])
        if int(stat.parent.name) == pgid:
            total += int(fields[13]) + int(fields[14])
    return total / CLK_TCK


def group_members(pgid: int) -> list[int]:
    """The live processes of the process group ``pgid``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = _stat_fields(int(stat.parent.name))
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MiB from /proc/PID/status."""
    values = {"VmRSS": 0.0, "VmHWM": 0.0}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in values:
            values[key] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def load_average() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
