"""kvcache on a real Kubernetes cluster (kind), as a platform engineer uses it: the chart's
operator turns a KVCacheCluster into ready cache nodes, `kubectl get kvcache` reports them, a
client stores and reads chunks through their Service, an annotated Deployment joins and leaves,
and `kubectl scale` grows the cluster.

Run with `e2e/run.sh` (it creates the cluster, builds and loads the image, installs the chart).
Run directly (`pytest e2e/test_kind.py`) the tests do the same through run.sh. Without Docker
and kind they are skipped, with the reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

E2E = Path(__file__).resolve().parent
CONTEXT = "kind-" + os.environ.get("KVCACHE_E2E_CLUSTER", "kvcache-e2e")
NS = "kvcache-e2e"
NAME = "e2e"
IMAGE = "kvcache:e2e"
NODE_PORT = 7400
WAIT = "600s"  # image pulls and first starts on a laptop


def why_not() -> str | None:
    missing = [tool for tool in ("docker", "kind", "kubectl", "helm") if not shutil.which(tool)]
    if missing:
        return f"needs {', '.join(missing)} on PATH (e2e runs where Docker and kind exist)"
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        return "the Docker daemon is not reachable (`docker info` failed)"
    return None


REASON = why_not()
pytestmark = [
    pytest.mark.skipif(REASON is not None, reason=f"e2e on kind: {REASON}"),
    pytest.mark.timeout(1800),
]


def kubectl(*args: str, namespace: str = NS, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["kubectl", "--context", CONTEXT, "--namespace", namespace, *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
    return result.stdout


def apply(manifest: dict) -> None:
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump(manifest))


def get(kind: str, name: str) -> dict:
    return json.loads(kubectl("get", kind, name, "-o", "json"))


def eventually(check: Callable[[], Any], what: str, timeout_s: float = 120.0) -> Any:
    """Poll `check()` until it is truthy (for what `kubectl wait` cannot express)."""
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(2)
    return result


@pytest.fixture(scope="module", autouse=True)
def cluster() -> Iterator[None]:
    """The kind cluster with the chart installed, and a namespace for the tests. run.sh brings
    it up (KVCACHE_E2E_READY=1 says it did); otherwise these tests bring it up and down."""
    ready = os.environ.get("KVCACHE_E2E_READY") == "1"
    if not ready:
        subprocess.run([str(E2E / "run.sh"), "up"], check=True)
    apply({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    yield
    kubectl("delete", "namespace", NS, "--wait=false")
    if not ready and os.environ.get("KEEP_CLUSTER") != "1":
        subprocess.run([str(E2E / "run.sh"), "down"], check=True)


def test_the_operator_runs():
    kubectl("rollout", "status", "deployment/kvcache-operator", namespace="kvcache-system")


def test_a_cluster_becomes_ready_and_kubectl_get_shows_it():
    apply(
        {
            "apiVersion": "kvcache.io/v1alpha1",
            "kind": "KVCacheCluster",
            "metadata": {"name": NAME, "namespace": NS},
            # Small enough for a laptop, 4 nodes included; the router finds the engines itself.
            "spec": {
                "nodes": 3,
                "memory": "256Mi",
                "resources": {"requests": {"memory": "384Mi"}, "limits": {"memory": "1Gi"}},
            },
        }
    )
    kubectl("wait", f"kvcache/{NAME}", "--for=jsonpath={.status.phase}=Ready", f"--timeout={WAIT}")
    selector = f"app.kubernetes.io/instance={NAME},app.kubernetes.io/component=cache-node"
    kubectl("wait", "pod", "-l", selector, "--for=condition=Ready", f"--timeout={WAIT}")
    header, row = kubectl("get", "kvcache", NAME).splitlines()
    assert header.split()[:4] == ["NAME", "READY", "CAPACITY", "USED"]
    assert row.split()[:2] == [NAME, "3/3"] and "Ready" in row.split()


@contextlib.contextmanager
def forwarded(service: str, remote_port: int) -> Iterator[int]:
    """A local port forwarded to `service` (kubectl port-forward), for the block."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    forward = subprocess.Popen(
        ["kubectl", "--context", CONTEXT, "--namespace", NS, "port-forward",
         f"service/{service}", f"{port}:{remote_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        assert forward.stdout is not None
        assert "Forwarding from" in forward.stdout.readline()
        yield port
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def test_a_client_puts_and_gets_through_the_nodes_service():
    from kvcache.client.cluster import ClusterClient
    from kvcache.core.ring import Member

    with forwarded(f"{NAME}-node", NODE_PORT) as port:
        key, value = bytes(range(32)), os.urandom(64 << 10)
        with ClusterClient([Member("e2e", f"tcp://127.0.0.1:{port}")]) as client:
            assert client.put([key], [value]) == [True]
            (found,) = client.get([key])
        assert found is not None and bytes(found) == value


def routed_by_the_router() -> str | None:
    """The engine that answered a chat request sent through the router's Service, if any."""
    import httpx

    chat = {"model": "stand-in", "messages": [{"role": "user", "content": "hello"}]}
    with forwarded(f"{NAME}-router", 80) as port:
        try:
            answer = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=chat)
        except httpx.HTTPError:
            return None
    return answer.json().get("system_fingerprint") if answer.status_code == 200 else None


def test_an_annotated_deployment_joins_and_leaves():
    # A stand-in for vLLM that serves its OpenAI API, /health and /metrics on vLLM's port, and
    # ignores the vLLM flags the join adds to its arguments.
    container = {
        "name": "engine",
        "image": IMAGE,
        "command": ["python", "-m", "kvcache.testing.fake_engine", "--host", "0.0.0.0",
                    "--port", "8000", "--name", "stand-in"],
        "args": ["--model", "stand-in"],
    }  # fmt: skip
    labels = {"app": "engine"}
    apply(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "engine", "namespace": NS},
            "spec": {
                "selector": {"matchLabels": labels},
                "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
            },
        }
    )
    before = get("deployment", "engine")["spec"]["template"]

    kubectl("annotate", "deployment/engine", f"kvcache.io/cluster={NAME}")
    joined = "--for=jsonpath={.metadata.labels.kvcache\\.io/cluster}=" + NAME
    kubectl("wait", "deployment/engine", joined, "--timeout=120s")
    args = get("deployment", "engine")["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--kv-transfer-config" in args and "--kv-events-config" in args
    kubectl("rollout", "status", "deployment/engine", f"--timeout={WAIT}")
    engines = "{.status.engines}"
    eventually(lambda: kubectl("get", f"kvcache/{NAME}", "-o", f"jsonpath={engines}") == "1",
               "the status to count the engine")  # fmt: skip
    # the router finds the joined engine's pod (labels, port annotations) and routes to it
    kubectl("rollout", "status", f"deployment/{NAME}-router", f"--timeout={WAIT}")
    eventually(lambda: routed_by_the_router() == "stand-in", "a request routed to the engine")

    kubectl("annotate", "deployment/engine", "kvcache.io/cluster-")
    eventually(
        lambda: get("deployment", "engine")["spec"]["template"] == before, "the engine restored"
    )


def test_kubectl_scale_grows_the_cluster():
    kubectl("scale", f"kvcache/{NAME}", "--replicas", "4")
    kubectl("wait", f"statefulset/{NAME}-node", "--for=jsonpath={.spec.replicas}=4")
    kubectl("wait", f"kvcache/{NAME}", "--for=jsonpath={.status.ready}=4/4", f"--timeout={WAIT}")


def test_deleting_the_cluster_deletes_its_children():
    kubectl("delete", f"kvcache/{NAME}", f"--timeout={WAIT}")
    kubectl("wait", "--for=delete", f"statefulset/{NAME}-node", "--timeout=120s")
