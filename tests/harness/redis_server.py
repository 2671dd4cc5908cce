"""redis-server processes owned by a test: a plain instance, or master + replica + sentinel."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from harness.net import free_port, wait_for, wait_port

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


@dataclass
class RedisProcess:
    port: int
    workdir: Path
    args: list[str] = field(default_factory=list)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2)

    def start(self) -> RedisProcess:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"), *self.args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(self.port)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)

    def pause(self) -> None:
        """Freeze the server (SIGSTOP): connections stay open but nothing is answered."""
        assert self.proc
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc
        self.proc.send_signal(signal.SIGCONT)


def start_redis(workdir: Path, *args: str) -> RedisProcess:
    return RedisProcess(free_port(), workdir, list(args)).start()


@dataclass
class SentinelSetup:
    master: RedisProcess
    replica: RedisProcess
    sentinel: RedisProcess
    service: str = "mwtest"
    others: list[RedisProcess] = field(default_factory=list)
    """Further sentinels (``start_sentinel_setup(..., sentinels=3)``); ``sentinel`` is the first one."""

    @property
    def all_sentinels(self) -> list[RedisProcess]:
        return [self.sentinel, *self.others]

    @property
    def sentinels(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.all_sentinels]

    def current_master_port(self, via: RedisProcess | None = None) -> int:
        sentinel = redis.Redis(port=(via or self.sentinel).port, socket_timeout=2)
        _host, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def stop(self) -> None:
        for proc in (*self.all_sentinels, self.replica, self.master):
            if proc.proc and proc.proc.poll() is None:
                proc.resume()  # a paused process dies at SIGKILL too, but leaves no doubt
            proc.stop()


def _start_sentinel(workdir: Path, name: str, master_port: int, quorum: int) -> RedisProcess:
    port = free_port()
    conf = workdir / f"{name}.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor mwtest 127.0.0.1 {master_port} {quorum}\n"
        "sentinel down-after-milliseconds mwtest 1000\n"
        "sentinel failover-timeout mwtest 10000\n"
        "sentinel parallel-syncs mwtest 1\n"
    )
    sentinel = RedisProcess(port, workdir / name)
    sentinel.workdir.mkdir(parents=True, exist_ok=True)
    sentinel.proc = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel", "--logfile",
                                      str(workdir / f"{name}.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    return sentinel


def start_sentinel_setup(workdir: Path, sentinels: int = 1) -> SentinelSetup:
    """Master + replica + ``sentinels`` Sentinels (quorum 2 when there are several, so a failover still
    happens with one of three gone, as with one Sentinel per Redis host)."""
    master = start_redis(workdir / "master")
    replica = start_redis(workdir / "replica", "--replicaof", "127.0.0.1", str(master.port))
    wait_for(lambda: replica.client().info("replication").get("master_link_status") == "up", 15,
             what="replica in sync")
    quorum = 1 if sentinels == 1 else 2
    procs = [_start_sentinel(workdir, "sentinel" if n == 0 else f"sentinel{n + 1}", master.port, quorum)
             for n in range(sentinels)]
    setup = SentinelSetup(master, replica, procs[0], others=procs[1:])
    for proc in procs:
        wait_for(lambda p=proc: setup.current_master_port(p) == master.port, 10, what="sentinel sees the master")
    if sentinels > 1:
        def all_known(p: RedisProcess) -> bool:
            info = redis.Redis(port=p.port, socket_timeout=2).sentinel_master(setup.service)
            return int(info["num-other-sentinels"]) == sentinels - 1 and int(info["num-slaves"]) >= 1
        for proc in procs:
            wait_for(lambda p=proc: all_known(p), 20, what="sentinels know each other and the replica")
    time.sleep(0.2)
    return setup
