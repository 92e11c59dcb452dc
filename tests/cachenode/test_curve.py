"""CurveZMQ between clients and real node processes: who gets in, what the wire shows, and how a
node refuses bad key material. Every key is a real certificate made by `zmq.auth`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import zmq.auth
from sample_keys import make_keys

from kvcache.cachenode.launcher import NodeProcess, free_port
from kvcache.client.cluster import ClusterClient
from kvcache.core.config import ClientConfig, CurveClientKeys
from kvcache.core.ring import Member
from kvcache.core.secrets import curve_client_keys

MiB = 1 << 20
TIMEOUT_S = 0.5  # the client's per-request timeout: how long a refused call may take


@dataclass(frozen=True)
class Certificates:
    """Certificate files in a tmp directory: the node's pair, an allowed client's pair (its
    public half also in `allowed/`), and a stranger's pair, valid but not on the list."""

    root: Path

    def secret(self, name: str) -> str:
        return str(self.root / "keys" / f"{name}.key_secret")

    def public(self, name: str) -> str:
        return str(self.root / "keys" / f"{name}.key")

    @property
    def allowed_dir(self) -> str:
        return str(self.root / "allowed")

    def pair(self, name: str) -> tuple[bytes, bytes]:
        public, secret = zmq.auth.load_certificate(self.secret(name))
        assert secret is not None
        return public, secret

    def client_keys(self, name: str, server: str = "server") -> CurveClientKeys:
        keys = curve_client_keys(self.public(server), self.secret(name), env={})
        assert keys is not None
        return keys


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("server", "other-server", "allowed", "stranger"):
        zmq.auth.create_certificates(keys, name)
    (tmp_path / "allowed").mkdir()
    shutil.copy(keys / "allowed.key", tmp_path / "allowed" / "allowed.key")
    return Certificates(tmp_path)


def curve_node(start_node: Callable[..., NodeProcess], certs: Certificates) -> NodeProcess:
    return start_node(
        "--curve-key-file", certs.secret("server"), "--curve-allowed-clients", certs.allowed_dir
    )


def client(address: str, curve: CurveClientKeys | None) -> ClusterClient:
    # no back-off: every call asks the node again instead of skipping it as down
    config = ClientConfig(timeout_s=TIMEOUT_S, down_backoff_s=0.0, curve=curve)
    return ClusterClient([Member("node", address)], config)


def node_stats(node: NodeProcess) -> dict:
    return httpx.get(f"{node.admin_url}/stats", timeout=5.0).json()


def assert_gets_nothing(refused: ClusterClient, keys: list[bytes]) -> None:
    """Every op ends in misses within about one timeout, without an exception."""
    count = len(keys)
    calls: list[tuple[Callable[[], object], object]] = [
        (lambda: refused.get(keys), [None] * count),
        (lambda: refused.contains(keys), [False] * count),
        (lambda: refused.lookup_prefix(keys), 0),
        (lambda: refused.ping(), {"node": False}),
        (lambda: refused.put(keys, [b"overwritten"] * count), [False] * count),
    ]
    for call, misses in calls:
        started = time.monotonic()
        assert call() == misses
        assert time.monotonic() - started < TIMEOUT_S + 1.0
    assert refused.stats.timeouts == len(calls)


# ---- who gets in ---------------------------------------------------------------------------


def test_an_allowed_client_round_trips_values(start_node, certs):
    node = curve_node(start_node, certs)
    keys = make_keys(3, "allowed")
    values = [os.urandom(size) for size in (0, 1000, 3 * MiB)]
    with client(node.member.address, certs.client_keys("allowed")) as allowed:
        assert allowed.ping() == {"node": True}
        assert allowed.put(keys, values) == [True] * 3
        assert [bytes(v) for v in allowed.get(keys)] == values
        assert allowed.contains(keys) == [True] * 3
    assert node_stats(node)["curve_denied"] == 0
    assert node.stop() == 0  # the ZAP thread stops with the front: SIGTERM still exits cleanly


def test_a_client_off_the_allow_list_gets_no_data_and_the_node_keeps_serving(start_node, certs):
    node = curve_node(start_node, certs)
    keys = make_keys(2, "stranger")
    values = [os.urandom(1000), os.urandom(1000)]
    with client(node.member.address, certs.client_keys("allowed")) as allowed:
        assert allowed.put(keys, values) == [True, True]
        with client(node.member.address, certs.client_keys("stranger")) as stranger:
            assert_gets_nothing(stranger, keys)
        # the node still serves the allowed client, and the stranger's PUT changed nothing
        assert [bytes(v) for v in allowed.get(keys)] == values
    stats = node_stats(node)
    assert stats["curve_denied"] >= 1
    metrics = httpx.get(f"{node.admin_url}/metrics", timeout=5).text
    (line,) = [x for x in metrics.splitlines() if x.startswith("kvcache_node_curve_denied_total")]
    assert float(line.split()[-1]) >= stats["curve_denied"]
    assert stats["requests"] == {"PUT": 1, "GET": 1}  # none of the stranger's reached the node
    assert node.stop() == 0


@pytest.mark.parametrize("who", ["plain", "wrong_server_key"])
def test_a_client_without_curve_or_with_the_wrong_server_key_gets_nothing(start_node, certs, who):
    node = curve_node(start_node, certs)
    keys = make_keys(1, who)
    with client(node.member.address, certs.client_keys("allowed")) as allowed:
        assert allowed.put(keys, [b"secret"]) == [True]
    curve = None if who == "plain" else certs.client_keys("allowed", server="other-server")
    with client(node.member.address, curve) as refused:
        assert_gets_nothing(refused, keys)
    assert node_stats(node)["requests"] == {"PUT": 1}


def test_without_an_allow_list_any_client_that_knows_the_server_key_gets_in(start_node, certs):
    node = start_node("--curve-key-file", certs.secret("server"))
    keys = make_keys(1, "open")
    with client(node.member.address, certs.client_keys("stranger")) as anyone:
        assert anyone.put(keys, [b"value"]) == [True]
        assert bytes(anyone.get(keys)[0]) == b"value"
    with client(node.member.address, None) as plain:
        assert_gets_nothing(plain, keys)
    assert "curve_denied" not in node_stats(node)


def test_keys_and_allow_list_from_environment_variables(start_node, certs):
    server_public, server_secret = certs.pair("server")
    allowed_public, _ = certs.pair("allowed")
    extra_public, _ = zmq.curve_keypair()
    node = start_node(
        env={
            "KVCACHE_CURVE_PUBLIC_KEY": server_public.decode(),
            "KVCACHE_CURVE_SECRET_KEY": server_secret.decode(),
            "KVCACHE_CURVE_ALLOWED_CLIENTS": f"{extra_public.decode()},{allowed_public.decode()}",
        }
    )
    keys = make_keys(1, "env")
    with client(node.member.address, certs.client_keys("allowed")) as allowed:
        assert allowed.put(keys, [b"from env"]) == [True]
        assert bytes(allowed.get(keys)[0]) == b"from env"
    with client(node.member.address, certs.client_keys("stranger")) as stranger:
        assert_gets_nothing(stranger, keys)


def test_certificates_made_by_kvcache_keys_work_and_are_never_overwritten(start_node, tmp_path):
    def make(name: str, directory: Path) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "kvcache", "keys", name, "--dir", str(directory)]
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    assert make("node", tmp_path / "node").returncode == 0
    made = make("client", tmp_path / "clients")
    assert made.returncode == 0, made.stderr
    client_public, _ = zmq.auth.load_certificate(tmp_path / "clients" / "client.key")
    assert f"public key: {client_public.decode()}" in made.stdout
    assert (tmp_path / "clients" / "client.key_secret").stat().st_mode & 0o777 == 0o600
    again = make("client", tmp_path / "clients")
    assert again.returncode != 0 and "not overwriting" in again.stderr
    node = start_node(
        "--curve-key-file", str(tmp_path / "node" / "node.key_secret"),
        "--curve-allowed-clients", str(tmp_path / "clients"),
    )  # fmt: skip
    curve = curve_client_keys(
        str(tmp_path / "node" / "node.key"), str(tmp_path / "clients" / "client.key_secret"), {}
    )
    keys = make_keys(1, "made")
    with client(node.member.address, curve) as allowed:
        assert allowed.put(keys, [b"value"]) == [True]
        assert bytes(allowed.get(keys)[0]) == b"value"


# ---- bad key material ----------------------------------------------------------------------


def run_node_cli(*flags: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("KVCACHE_")}
    command = [sys.executable, "-m", "kvcache", "node", "--node-id", "bad", "--port",
               str(free_port()), "--admin-port", str(free_port()), *flags]  # fmt: skip
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
        env={**clean, **(env or {})},
    )


def bad_key_material(case: str, certs: Certificates, tmp: Path) -> tuple[list[str], dict]:
    """The flags and environment of one broken configuration."""
    server_public, _ = certs.pair("server")
    stranger_public, _ = certs.pair("stranger")
    flags = ["--curve-key-file", certs.secret("server")]
    match case:
        case "missing_file":
            return ["--curve-key-file", str(tmp / "nope")], {}
        case "public_certificate":
            return ["--curve-key-file", certs.public("server")], {}
        case "garbage_file":
            (tmp / "garbage.key_secret").write_text("not a certificate\n")
            return ["--curve-key-file", str(tmp / "garbage.key_secret")], {}
        case "mismatched_pair":  # the server's secret key under the stranger's public key
            text = Path(certs.secret("server")).read_text()
            mismatched = text.replace(server_public.decode(), stranger_public.decode())
            (tmp / "mismatched.key_secret").write_text(mismatched)
            return ["--curve-key-file", str(tmp / "mismatched.key_secret")], {}
        case "missing_allowed_dir":
            return [*flags, "--curve-allowed-clients", str(tmp / "nope")], {}
        case "empty_allowed_dir":
            (tmp / "empty").mkdir()
            return [*flags, "--curve-allowed-clients", str(tmp / "empty")], {}
        case "bad_env_key":  # 40 Z85 characters whose groups overflow 32 bits
            secret = "#" * 40
            return [], {"KVCACHE_CURVE_PUBLIC_KEY": server_public.decode(),
                        "KVCACHE_CURVE_SECRET_KEY": secret}  # fmt: skip
        case "half_env_pair":
            return [], {"KVCACHE_CURVE_PUBLIC_KEY": server_public.decode()}
        case "allow_list_without_pair":
            return [], {"KVCACHE_CURVE_ALLOWED_CLIENTS": stranger_public.decode()}
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing_file", "Invalid certificate file"),
        ("public_certificate", "holds no secret key"),
        ("garbage_file", "No public key found"),
        ("mismatched_pair", "does not belong to the secret key"),
        ("missing_allowed_dir", "does not exist"),
        ("empty_allowed_dir", "holds no *.key certificate"),
        ("bad_env_key", "KVCACHE_CURVE_SECRET_KEY is not valid Z85"),
        ("half_env_pair", "set both KVCACHE_CURVE_PUBLIC_KEY and KVCACHE_CURVE_SECRET_KEY"),
        ("allow_list_without_pair", "needs the node's own CurveZMQ key pair"),
    ],
)
def test_bad_key_material_stops_the_node_with_a_message(certs, tmp_path, case, expected):
    flags, env = bad_key_material(case, certs, tmp_path)
    result = run_node_cli(*flags, env=env)
    assert result.returncode != 0
    assert "kvcache node:" in result.stderr and expected in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


# ---- what the wire shows -------------------------------------------------------------------


class RecordingProxy:
    """A TCP relay between one client and one node that keeps every byte it forwards, so a test
    can look at the wire."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.to_node = bytearray()
        self.to_client = bytearray()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self._listener.getsockname()[1]}"
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            self._sockets += [downstream, upstream]
            for source, sink, record in (
                (downstream, upstream, self.to_node),
                (upstream, downstream, self.to_client),
            ):
                threading.Thread(
                    target=self._pump, args=(source, sink, record), daemon=True
                ).start()

    def _pump(self, source: socket.socket, sink: socket.socket, record: bytearray) -> None:
        try:
            while data := source.recv(1 << 16):
                record += data  # one pump per direction: no other writer
                sink.sendall(data)
        except OSError:
            pass  # either side closed: the relay ends with it
        finally:
            sink.close()

    def close(self) -> None:
        for open_socket in self._sockets:
            open_socket.close()


@pytest.mark.parametrize("secure", [True, False], ids=["curve", "plain"])
def test_payload_bytes_are_not_plaintext_on_the_wire_with_curve(start_node, certs, secure):
    if secure:
        node, curve = curve_node(start_node, certs), certs.client_keys("allowed")
    else:
        node, curve = start_node(), None
    proxy = RecordingProxy(node.port)
    payload = os.urandom(1024)
    keys = make_keys(1, "wire")
    try:
        with client(proxy.address, curve) as through_proxy:
            assert through_proxy.put(keys, [payload]) == [True]
            assert bytes(through_proxy.get(keys)[0]) == payload
    finally:
        proxy.close()
    # the PUT carried the payload to the node and the GET's reply carried it back
    assert len(proxy.to_node) > len(payload) and len(proxy.to_client) > len(payload)
    for wire in (proxy.to_node, proxy.to_client):
        pieces_seen = [payload[i : i + 32] in wire for i in range(0, len(payload), 32)]
        if secure:
            assert not any(pieces_seen) and keys[0] not in proxy.to_node
        else:
            assert payload in wire
    assert (keys[0] in proxy.to_node) is not secure
