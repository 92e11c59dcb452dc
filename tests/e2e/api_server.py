"""The Kubernetes API the rendered router talks to: kmock's emulator (no API server runs here)
behind HTTPS, as a pod's service account reaches the real one, in a thread of its own.

The router finds its engines with `KubernetesAPI.in_cluster()`: `KUBERNETES_SERVICE_HOST/PORT`,
the service-account token and the API server's CA. This serves a self-signed certificate for the
addresses the pods reach it at, and hands out the files the kubelet would mount.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import threading
from pathlib import Path
from typing import Any

import httpx
from aiohttp.test_utils import RawTestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kmock import KubernetesEmulator

TOKEN = "e2e-service-account-token"
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


def self_signed(addresses: list[str], folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address(address)) for address in addresses]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "api.crt", folder / "api.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


class ApiServer:
    """`with ApiServer(addresses, folder) as api:` serves until the block ends."""

    def __init__(self, addresses: list[str], folder: Path) -> None:
        self.cert_file, self._key_file = self_signed(addresses, folder)
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="kube-api", daemon=True)
        self.port = 0

    def __enter__(self) -> ApiServer:
        self._thread.start()
        if not self._started.wait(30):
            raise RuntimeError("the emulated API server did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(self.cert_file, self._key_file)
        async with KubernetesEmulator() as emulator:
            for resource, kind, namespaced in [
                ("v1/namespaces", "Namespace", False),
                ("v1/pods", "Pod", True),
            ]:
                emulator.resources[resource] = emulator.ResourceInfo(
                    kind=kind, namespaced=namespaced, verbs=VERBS
                )
            server = RawTestServer(emulator, host="0.0.0.0", port=0)
            await server.start_server(ssl=tls)
            self.port = server.port
            self._started.set()
            try:
                await self._stop.wait()
            finally:
                await server.close()

    def service_account(self, namespace: str) -> dict[str, str]:
        """The files the kubelet mounts at the service account's path."""
        return {"token": TOKEN, "ca.crt": self.cert_file.read_text(), "namespace": namespace}

    def kubelet_env(self, gateway: str) -> dict[str, str]:
        """The API server's address as every pod's env has it (the `kubernetes` Service)."""
        return {"KUBERNETES_SERVICE_HOST": gateway, "KUBERNETES_SERVICE_PORT": str(self.port)}

    def put_pod(self, pod: dict[str, Any]) -> None:
        """Create or replace a pod, as the kubelet reports it."""
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        base = f"https://127.0.0.1:{self.port}/api/v1/namespaces/{namespace}/pods"
        with httpx.Client(verify=False) as client:  # noqa: S501 - the test's own server
            if client.get(f"{base}/{name}").status_code == 200:
                answer = client.patch(
                    f"{base}/{name}", json=pod,
                    headers={"Content-Type": "application/merge-patch+json"},
                )  # fmt: skip
            else:
                answer = client.post(base, json=pod)
        answer.raise_for_status()
