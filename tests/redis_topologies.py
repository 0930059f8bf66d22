"""Throwaway Redis Cluster and Sentinel sets of real redis-server processes on free loopback ports.

`LocalCluster`: 3 primaries and 3 replicas (`--cluster-enabled yes`, joined by `redis-cli --cluster create`).
`LocalSentinels`: a primary, a replica and 3 sentinels (`redis-server <file> --sentinel`) watching `mymaster`.
Both fail over fast (1 s node timeout / down-after), stop every process and delete their files on exit.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Self

from tests.redis_server import RedisServer, free_port

SERVICE = "mymaster"


def redis_cli(port: int, *args: str) -> str:
    """One redis-cli call's output."""
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, timeout=5).stdout


def _until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting until {what}")
        time.sleep(0.05)


def _cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536:
            with socket.socket() as bus:
                try:
                    bus.bind(("127.0.0.1", port + 10000))
                    return port
                except OSError:
                    continue


class _ServerSet:
    """Processes started together in one temporary directory; all stopped, and the directory removed, on exit."""

    def __init__(self, prefix: str) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix=prefix))

    def start(self) -> None:
        raise NotImplementedError

    def servers(self) -> list[RedisServer]:
        raise NotImplementedError

    def stop(self) -> None:
        for server in self.servers():
            server.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class LocalCluster(_ServerSet):
    def __init__(self) -> None:
        super().__init__("redis-cluster-")
        self.nodes: list[RedisServer] = []

    def servers(self) -> list[RedisServer]:
        return self.nodes

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        for i in range(6):
            workdir = self._dir / str(i)
            workdir.mkdir()
            node = RedisServer(_cluster_port(), workdir, args=[
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "1000"])
            self.nodes.append(node)
            node.start()
        subprocess.run(
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in self.nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, capture_output=True, timeout=30,
        )
        _until(self._settled, "the cluster is ok with every replica in sync")

    def _settled(self) -> bool:
        if any("cluster_state:ok" not in redis_cli(n.port, "CLUSTER", "INFO") for n in self.nodes):
            return False
        return all("master_link_status:up" in redis_cli(port, "INFO", "replication") for port in self.replicas())

    def _ports_by_role(self, role: str) -> list[int]:
        lines = redis_cli(self.nodes[0].port, "CLUSTER", "NODES").splitlines()
        return sorted(int(line.split()[1].split(":")[1].split("@")[0]) for line in lines
                      if role in line.split()[2] and "fail" not in line.split()[2])

    def primaries(self) -> list[int]:
        return self._ports_by_role("master")

    def replicas(self) -> list[int]:
        return self._ports_by_role("slave")

    def fail_over(self, replica_port: int) -> None:
        """A manual failover (CLUSTER FAILOVER on a replica): the primary stops taking writes until the replica
        has them all, then the replica is promoted. Returns once the promotion is done."""
        redis_cli(replica_port, "CLUSTER", "FAILOVER")
        _until(lambda: "role:master" in redis_cli(replica_port, "INFO", "replication"), "the replica is promoted")


class LocalSentinels(_ServerSet):
    def __init__(self) -> None:
        super().__init__("redis-sentinel-")
        self.primary = RedisServer(workdir=self._dir)
        self.replica = RedisServer(workdir=self._dir, args=["--replicaof", "127.0.0.1", str(self.primary.port)])
        self.sentinels: list[RedisServer] = []

    @property
    def url(self) -> str:
        return f"redis://{','.join(f'127.0.0.1:{s.port}' for s in self.sentinels)}/{SERVICE}/0"

    def start(self) -> None:
        self.primary.start()
        self.replica.start()
        for i in range(3):
            config = self._dir / f"sentinel{i}.conf"
            config.write_text(
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} 1000\n"
                f"sentinel failover-timeout {SERVICE} 5000\n"
            )
            sentinel = RedisServer(workdir=self._dir, config_file=config, args=["--sentinel"])
            self.sentinels.append(sentinel)
            sentinel.start()
        _until(self._settled, "the sentinels see the primary, its replica and each other")

    def _settled(self) -> bool:
        if "master_link_status:up" not in redis_cli(self.replica.port, "INFO", "replication"):
            return False
        return all(
            "num-slaves\n1" in (info := redis_cli(s.port, "SENTINEL", "MASTER", SERVICE))
            and "num-other-sentinels\n2" in info for s in self.sentinels
        )

    def primary_port(self) -> int:
        return int(redis_cli(self.sentinels[0].port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE).split()[1])

    def fail_over(self) -> int:
        """SENTINEL FAILOVER: the replica is promoted; returns once the sentinels name it (its port)."""
        before = self.primary_port()
        redis_cli(self.sentinels[0].port, "SENTINEL", "FAILOVER", SERVICE)
        _until(lambda: self.primary_port() != before, "the sentinels name the new primary")
        return self.primary_port()

    def servers(self) -> list[RedisServer]:
        return [*self.sentinels, self.replica, self.primary]
