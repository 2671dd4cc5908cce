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

    @property
    def sentinels(self) -> list[str]:
        return [f"127.0.0.1:{self.sentinel.port}"]

    def current_master_port(self) -> int:
        sentinel = redis.Redis(port=self.sentinel.port, socket_timeout=2)
        _host, port = sentinel.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        return int(port)

    def stop(self) -> None:
        for proc in (self.sentinel, self.replica, self.master):
            proc.stop()


def start_sentinel_setup(workdir: Path) -> SentinelSetup:
    master = start_redis(workdir / "master")
    replica = start_redis(workdir / "replica", "--replicaof", "127.0.0.1", str(master.port))
    wait_for(lambda: replica.client().info("replication").get("master_link_status") == "up", 15,
             what="replica in sync")
    port = free_port()
    conf = workdir / "sentinel.conf"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {workdir}\n"
        f"sentinel monitor mwtest 127.0.0.1 {master.port} 1\n"
        "sentinel down-after-milliseconds mwtest 1000\n"
        "sentinel failover-timeout mwtest 10000\n"
        "sentinel parallel-syncs mwtest 1\n"
    )
    sentinel = RedisProcess(port, workdir / "sentinel")
    sentinel.workdir.mkdir(parents=True, exist_ok=True)
    sentinel.proc = subprocess.Popen([REDIS_SERVER, str(conf), "--sentinel", "--logfile",
                                      str(workdir / "sentinel.log")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port)
    setup = SentinelSetup(master, replica, sentinel)
    wait_for(lambda: setup.current_master_port() == master.port, 10, what="sentinel sees the master")
    time.sleep(0.2)
    return setup
