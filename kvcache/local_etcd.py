"""A throwaway single-member etcd server on loopback, for `kvcache up --etcd`, tests and benchmarks.

It runs Debian's `etcd` binary (package `etcd-server`; `scripts/system-deps` installs it) on free
ports with its data in a temporary directory, and is gone, data and all, when stopped. Production
clusters point nodes and clients at their own etcd instead.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

from kvcache.cachenode.launcher import free_port, wait_until_ok


class LocalEtcd:
    def __init__(self) -> None:
        self.client_port = free_port()
        self.peer_port = free_port()
        self._data = Path(tempfile.mkdtemp(prefix="kvcache-etcd-"))
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """host:port, as `kvcache node --etcd` and `EtcdConfig` take it."""
        return f"127.0.0.1:{self.client_port}"

    @classmethod
    def start(cls, timeout_s: float = 30.0) -> LocalEtcd:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("etcd is not installed: run scripts/system-deps (etcd-server)")
        server = cls()
        client_url = f"http://127.0.0.1:{server.client_port}"
        peer_url = f"http://127.0.0.1:{server.peer_port}"
        command = [
            binary, "--name", "local", "--data-dir", str(server._data / "data"),
            "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"local={peer_url}", "--log-level", "error",
        ]  # fmt: skip
        log = open(server._data / "etcd.log", "wb")  # noqa: SIM115 - lives as long as etcd
        server._process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        try:
            wait_until_ok(f"{client_url}/health", server._process, "etcd", timeout_s)
        except BaseException:
            print((server._data / "etcd.log").read_text(errors="replace")[-2000:])
            server.stop()
            raise
        return server

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        shutil.rmtree(self._data, ignore_errors=True)

    def __enter__(self) -> LocalEtcd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
