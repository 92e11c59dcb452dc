"""The router finds its engines through the Kubernetes API (kmock's emulated API server): the
ready pods with the cluster's engine labels, at the ports their annotations name; pods that stop
being ready, lose the labels or go away leave; the watch follows changes without polling."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest
from kube_emulator import KubernetesEmulator

from kvcache.core import engine_labels as names
from kvcache.router.discovery import DiscoveredEngine, KubernetesAPI, PodWatcher, engines_of
from kvcache.router.policy import EngineEvents

SELECTOR = "kvcache.io/cluster=demo,kvcache.io/cluster-namespace=ml"
LABELS = {"kvcache.io/cluster": "demo", "kvcache.io/cluster-namespace": "ml"}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}


def pod(name: str, ip: str, ready: bool = True, labels: dict | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "ml",
            "labels": LABELS if labels is None else labels,
            "annotations": {
                names.ENGINE_PORT_ANNOTATION: "8000",
                names.EVENTS_PORT_ANNOTATION: "5557",
                names.REPLAY_PORT_ANNOTATION: "5558",
            },
        },
        "status": {
            "podIP": ip,
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


async def until(check, what: str) -> None:
    deadline = time.monotonic() + 10
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


async def send(api: KubernetesEmulator, method: str, path: str, body: Any = None) -> None:
    async with api.request(method, path, json=body) as response:
        assert response.status == 200, await response.text()


@pytest.mark.asyncio
@pytest.mark.kmock(cls=KubernetesEmulator)
async def test_engines_follow_the_ready_labelled_pods(kmock: KubernetesEmulator):
    for resource, kind, namespaced in [
        ("v1/namespaces", "Namespace", False),
        ("v1/pods", "Pod", True),
    ]:
        kmock.resources[resource] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, verbs=VERBS
        )
    pods = "/api/v1/namespaces/ml/pods"
    await send(kmock, "POST", pods, pod("vllm-a", "10.0.0.1"))
    await send(kmock, "POST", pods, pod("vllm-starting", "10.0.0.2", ready=False))
    await send(kmock, "POST", pods, pod("someone-else", "10.0.0.3", labels={"app": "x"}))
    seen: list[dict[str, DiscoveredEngine]] = []
    watcher = PodWatcher(KubernetesAPI(str(kmock.url)), ["ml"], SELECTOR, seen.append, 0.05)
    task = asyncio.create_task(watcher.run())
    try:
        await until(lambda: seen and list(seen[-1]) == ["ml/vllm-a"], "the first engine")
        assert seen[-1]["ml/vllm-a"] == DiscoveredEngine(
            "ml/vllm-a",
            "http://10.0.0.1:8000",
            EngineEvents("tcp://10.0.0.1:5557", "tcp://10.0.0.1:5558"),
        )
        # the starting pod becomes ready: it joins
        await send(kmock, "PATCH", f"{pods}/vllm-starting", pod("vllm-starting", "10.0.0.2"))
        await until(lambda: set(seen[-1]) == {"ml/vllm-a", "ml/vllm-starting"}, "readiness")
        # one stops being ready, the other is deleted: both leave
        await send(kmock, "PATCH", f"{pods}/vllm-a", pod("vllm-a", "10.0.0.1", ready=False))
        await until(lambda: set(seen[-1]) == {"ml/vllm-starting"}, "the unready pod to leave")
        await send(kmock, "DELETE", f"{pods}/vllm-starting")
        await until(lambda: seen[-1] == {}, "the deleted pod to leave")
        assert all("ml/someone-else" not in engines for engines in seen)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_pod_running_data_parallel_ranks_is_one_engine_per_rank():
    two = pod("vllm-dp", "10.0.0.9")
    two["metadata"]["annotations"][names.DATA_PARALLEL_ANNOTATION] = "0,1"
    assert engines_of(two) == [
        DiscoveredEngine("ml/vllm-dp/dp0", "http://10.0.0.9:8000",
                         EngineEvents("tcp://10.0.0.9:5557", "tcp://10.0.0.9:5558"), "", 0),
        DiscoveredEngine("ml/vllm-dp/dp1", "http://10.0.0.9:8000",
                         EngineEvents("tcp://10.0.0.9:5558", "tcp://10.0.0.9:5559"), "", 1),
    ]  # fmt: skip
    (single,) = engines_of(pod("vllm-a", "10.0.0.1"))
    assert (single.name, single.dp_rank) == ("ml/vllm-a", None)
