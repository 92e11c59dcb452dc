"""Start and stop cache nodes as separate local processes: for `kvcache up`, tests and benchmarks.

Each node is a real `kvcache node` process on loopback with its own ports; `start` returns once
every node answers `/readyz`, and `stop` sends SIGTERM (SIGKILL after a grace period).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx

from kvcache.core.ring import Member


def wait_until_ok(
    url: str, process: subprocess.Popen[bytes], what: str, timeout_s: float = 30.0
) -> None:
    """Poll `url` until it answers 200; raise if `process` exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout_s} s")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class NodeProcess:
    node_id: str
    port: int
    admin_port: int
    memory_bytes: int
    extra_args: tuple[str, ...] = ()  # further `kvcache node` flags: --disk-dir, --etcd, ...
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    process: subprocess.Popen[bytes] | None = None

    @property
    def member(self) -> Member:
        return Member(node_id=self.node_id, address=f"tcp://127.0.0.1:{self.port}")

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> None:
        command = [
            sys.executable, "-m", "kvcache", "node",
            "--node-id", self.node_id,
            "--port", str(self.port),
            "--admin-port", str(self.admin_port),
            "--memory", str(self.memory_bytes),
            "--log-level", "WARNING",
            *self.extra_args,
        ]  # fmt: skip
        environment = {**os.environ, **self.env} if self.env else None
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, env=environment)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        assert self.process is not None, "start() the node first"
        wait_until_ok(f"{self.admin_url}/readyz", self.process, f"node {self.node_id}", timeout_s)

    def kill(self, signum: int = signal.SIGKILL) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signum)
            self.process.wait()

    def restart(self, signum: int = signal.SIGKILL) -> None:
        """Kill the process (SIGKILL: a crash, nothing flushed) and start it again on the same
        ports and flags; returns once it is ready."""
        self.kill(signum)
        self.start()
        self.wait_ready()

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace_s`; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@dataclass
class LocalCluster:
    nodes: list[NodeProcess] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        count: int,
        memory_bytes: int,
        name_prefix: str = "node",
        extra_args: Callable[[int], Sequence[str]] | Sequence[str] = (),
    ) -> LocalCluster:
        """`extra_args` are flags for every node, or a function of the node's index giving each
        node its own (a disk directory per node, say)."""
        return cls.launch(
            [
                NodeProcess(
                    f"{name_prefix}-{index}",
                    free_port(),
                    free_port(),
                    memory_bytes,
                    tuple(extra_args(index) if callable(extra_args) else extra_args),
                )
                for index in range(count)
            ]
        )

    @classmethod
    def launch(cls, nodes: Sequence[NodeProcess]) -> LocalCluster:
        """Start the given nodes together and wait until all are ready; none is left running if
        one fails to start."""
        cluster = cls(list(nodes))
        try:
            for node in cluster.nodes:
                node.start()
            for node in cluster.nodes:
                node.wait_ready()
        except BaseException:
            cluster.stop()
            raise
        return cluster

    @property
    def members(self) -> list[Member]:
        return [node.member for node in self.nodes]

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
