"""The operator end to end: kopf runs kvcache.operator.handlers (`kopf run -A --standalone`, as
the chart does) against kmock's emulated API server, while each test acts as a user and as
Kubernetes' own controllers would (applies a cluster, marks node pods ready, annotates an engine)
and checks what the operator wrote back.

The emulator has no garbage collector: children the cluster owns stay after it is deleted, so
the tests check the owner references the real collector follows, and that the operator removes
itself what no owner reference reaches. Nor does it run the StatefulSet controller: the tests
make the disk tier's claims as it would.

Every request the operator makes in a test must be one the chart's RBAC grants (tests/chart_rbac).
"""

from __future__ import annotations

import asyncio
import copy
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import kopf
import pytest
import pytest_asyncio
from chart_rbac import granted, verb_of
from json_merge_patch import apply_merge_patch
from kopf.testing import KopfRunner
from kube_emulator import STORAGE_CLASSES, KubernetesEmulator

from kvcache.operator.apply import covers
from kvcache.operator.crd import API_VERSION, KIND, PLURAL, custom_resource_definition
from kvcache.operator.join import engine_settings, join_engine
from kvcache.operator.kube import CHILD_KINDS, resource_of
from kvcache.operator.names import (
    CLUSTER_ANNOTATION,
    JOINED_ANNOTATION,
    REFUSED_ANNOTATION,
    ClusterRef,
)
from kvcache.operator.render import DISK_FILL, render_cluster
from kvcache.operator.spec import KVCacheClusterSpec

NS, NAME = "ml", "demo"
REF = ClusterRef(NS, NAME)
IMAGE = "kvcache:test"
CLUSTERS = f"{API_VERSION}/{PLURAL}"
DEPLOYMENTS = "apps/v1/deployments"
STATEFULSETS = "apps/v1/statefulsets"
CLAIMS = "v1/persistentvolumeclaims"
EVENTS = "v1/events"
# What the operator and kopf use: its children's kinds, the engines, kopf's Events, the disk
# tier's claims (and their StorageClasses, which the emulator consults); kopf (run with -A) also
# watches namespaces and CRDs.
BUILTIN_KINDS = [
    ("v1/namespaces", "Namespace", False),
    ("v1/events", "Event", True),
    (CLAIMS, "PersistentVolumeClaim", True),
    (STORAGE_CLASSES, "StorageClass", False),
    ("apiextensions.k8s.io/v1/customresourcedefinitions", "CustomResourceDefinition", False),
    *(
        (f"{version}/{resource.plural}", kind, True)
        for (version, kind), resource in CHILD_KINDS.items()
    ),
]
SUBRESOURCES = {"StatefulSet": {"status", "scale"}, "Deployment": {"status", "scale"}}
VERBS = {"get", "list", "watch", "create", "patch", "update", "delete"}
TIMEOUT_S = 15.0
GiB = 1 << 30

pytestmark = [
    pytest.mark.asyncio,
    # Names ending in .svc (the nodes' /stats) resolve to the emulator, which serves them too.
    pytest.mark.kmock(cls=KubernetesEmulator, hostnames=re.compile(r".*\.svc")),
]

API_SERVER: dict[str, str] = {}


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf, and the operator's calls through kopf's client, talk to this test's emulator."""
    return kopf.ConnectionInfo(server=API_SERVER["url"], insecure=True)


@pytest_asyncio.fixture
async def api(kmock: KubernetesEmulator, monkeypatch) -> AsyncIterator[KubernetesEmulator]:
    """The emulated API server, with the operator running against it for this test."""
    for resource, kind, namespaced in BUILTIN_KINDS:
        kmock.resources[resource] = kmock.ResourceInfo(
            kind=kind, namespaced=namespaced, verbs=VERBS, subresources=SUBRESOURCES.get(kind, ())
        )
    crd = custom_resource_definition()["spec"]
    kmock.resources[CLUSTERS] = kmock.ResourceInfo(
        kind=KIND,
        singular=crd["names"]["singular"],
        shortnames=set(crd["names"]["shortNames"]),
        namespaced=True,
        verbs=VERBS,
        subresources=set(crd["versions"][0]["subresources"]),
    )
    monkeypatch.setenv("KVCACHE_IMAGE", IMAGE)
    # Read when kopf first imports the handlers (this module's first test): the timer's interval.
    monkeypatch.setenv("KVCACHE_STATUS_INTERVAL", "0.5")
    API_SERVER["url"] = str(kmock.url)
    runner = KopfRunner(
        ["run", "-A", "--standalone", "-m", "kvcache.operator.handlers"], timeout=30
    )
    runner.__enter__()
    try:
        yield kmock
    finally:
        # In a thread: the operator's last requests need this loop, which serves the emulator.
        await asyncio.to_thread(runner.__exit__, None, None, None)
    assert not ungranted(kmock), "the chart's RBAC must grant every request of the operator"


def operator_requests(api: KubernetesEmulator) -> list[Any]:
    """The requests to the API that the operator made (kopf's client names itself)."""
    return [
        request
        for request in api
        if request.resource is not None
        and request.resource.plural  # not discovery
        and request.headers.get("User-Agent", "").startswith("kopf/")
    ]


def ungranted(api: KubernetesEmulator) -> set[tuple[str, str, str]]:
    calls = {
        (
            request.resource.group or "",
            request.resource.plural + (f"/{request.subresource}" if request.subresource else ""),
            verb_of(request.action.value, request.method.value),
        )
        for request in operator_requests(api)
    }
    return {call for call in calls if not granted(*call)}


# ----------------------------------------------------------------------------------------------
# Acting and looking


def stored(api: KubernetesEmulator, resource: str, name: str, namespace: str = NS) -> Any:
    """The object as the API server holds it now (a copy), or None."""
    try:
        obj = api.objects[resource, namespace, name]
    except KeyError:
        return None
    return None if obj.deleted else copy.deepcopy(obj.raw)


async def until(check: Callable[[], Any], what: str) -> Any:
    """Wait for `check()` to be truthy and return it; fail naming `what` after TIMEOUT_S."""
    deadline = time.monotonic() + TIMEOUT_S
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)
    return result


async def send(api: KubernetesEmulator, method: str, path: str, body: Any = None) -> None:
    async with api.request(method, path, json=body) as response:
        assert response.status == 200, await response.text()


def url(resource: str, namespace: str | None, name: str | None = None) -> str:
    """The path of a resource, namespaced or (namespace None) cluster-wide."""
    group_version, plural = resource.rsplit("/", 1)
    root = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{root}{scope}/{plural}" + (f"/{name}" if name else "")


async def apply_cluster(api: KubernetesEmulator, **spec: Any) -> None:
    manifest = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {"name": NAME, "namespace": NS},
        "spec": spec,
    }
    await send(api, "POST", url(CLUSTERS, NS), manifest)


async def patch_cluster(api: KubernetesEmulator, **spec: Any) -> None:
    await send(api, "PATCH", url(CLUSTERS, NS, NAME), {"spec": spec})


async def controller_status(api: KubernetesEmulator, name: str, **status: Any) -> None:
    """What the StatefulSet controller reports of `name`, having seen its newest spec."""
    generation = stored(api, STATEFULSETS, name)["metadata"].get("generation")
    body = {"status": {**status, "observedGeneration": generation}}
    await send(api, "PATCH", url(STATEFULSETS, NS, name) + "/status", body)


def status(api: KubernetesEmulator) -> dict[str, Any]:
    return (stored(api, CLUSTERS, NAME) or {}).get("status") or {}


def condition(api: KubernetesEmulator, kind: str) -> dict[str, Any]:
    return next((c for c in status(api).get("conditions", []) if c["type"] == kind), {})


def events(api: KubernetesEmulator, reason: str) -> list[dict[str, Any]]:
    return [
        copy.deepcopy(obj.raw)
        for (resource, _, _), obj in api.objects.items()
        if resource == EVENTS and not obj.deleted and obj.raw.get("reason") == reason
    ]


def engine(namespace: str, annotation: str | None = None) -> dict[str, Any]:
    """A vLLM Deployment as a user writes it."""
    metadata: dict[str, Any] = {"name": "vllm", "namespace": namespace, "labels": {"app": "vllm"}}
    if annotation is not None:
        metadata["annotations"] = {CLUSTER_ANNOTATION: annotation}
    container = {
        "name": "vllm",
        "image": "vllm/vllm-openai:v0.11.0",
        "args": ["--model", "Qwen/Qwen3-8B", "--port", "8000"],
        "env": [{"name": "HF_HOME", "value": "/models"}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "vllm"}},
            "template": {
                "metadata": {"labels": {"app": "vllm"}},
                "spec": {"containers": [container]},
            },
        },
    }


async def create_engine(api: KubernetesEmulator, namespace: str, annotation: str | None = None):
    """The engine as stored at creation (before the operator changes anything)."""
    await send(api, "POST", url(DEPLOYMENTS, namespace), engine(namespace, annotation))
    return stored(api, DEPLOYMENTS, "vllm", namespace)


def joined(api: KubernetesEmulator, namespace: str) -> dict[str, Any] | None:
    deployment = stored(api, DEPLOYMENTS, "vllm", namespace)
    annotations = (deployment or {}).get("metadata", {}).get("annotations", {})
    return deployment if JOINED_ANNOTATION in annotations else None


def without_versions(obj: dict[str, Any]) -> dict[str, Any]:
    """An object less what the API server changes on every write."""
    obj = copy.deepcopy(obj)
    for key in ("resourceVersion", "generation"):
        obj["metadata"].pop(key, None)
    return obj


def env(deployment: dict[str, Any]) -> dict[str, str]:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    return {entry["name"]: entry.get("value") for entry in container.get("env", [])}


def children(api: KubernetesEmulator, spec: dict[str, Any]):
    """Every rendered child with its stored version (None while it does not exist)."""
    objects = render_cluster(KVCacheClusterSpec.from_dict(spec), REF, IMAGE)
    for manifest in (*objects.owned, *objects.elsewhere):
        resource = f"{manifest['apiVersion']}/{resource_of(manifest).plural}"
        metadata = manifest["metadata"]
        live = stored(api, resource, metadata["name"], metadata["namespace"])
        yield manifest, live, (resource, metadata["namespace"], metadata["name"])


# ----------------------------------------------------------------------------------------------
# Clusters


async def test_a_cluster_gets_its_children_owned_by_it(api):
    spec = {"nodes": 3, "allowedNamespaces": ["team-b"]}
    await apply_cluster(api, **spec)
    await until(lambda: all(live for _, live, _ in children(api, spec)), "every child")
    await until(lambda: status(api).get("phase") == "Pending", "status")

    cluster = stored(api, CLUSTERS, NAME)
    owner = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": NAME,
        "uid": cluster["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    for manifest, live, _ in children(api, spec):
        assert covers(live, manifest), manifest["metadata"]
        if manifest["metadata"]["namespace"] == NS:
            assert live["metadata"]["ownerReferences"] == [owner]
        else:  # the router's Role in a namespace allowed to join: no owner across namespaces
            assert "ownerReferences" not in live["metadata"]
    assert cluster["metadata"]["finalizers"] == ["kvcache.io/cleanup"]
    assert cluster["status"]["ready"] == "0/3"
    assert cluster["status"]["selector"] == REF.node_selector_text()
    assert condition(api, "Progressing")["status"] == "True"
    assert condition(api, "Ready")["status"] == "False"

    # A change that renders the same children writes none of them: apply is idempotent.
    writes = {key: len(api.objects[key].history) for _, _, key in children(api, spec)}
    note = {"metadata": {"annotations": {"note": "same spec"}}}
    await send(api, "PATCH", url(CLUSTERS, NS, NAME), note)
    await until(
        lambda: (
            "same spec"
            in stored(api, CLUSTERS, NAME)["metadata"]["annotations"].get(
                "kvcache.io/last-handled-configuration", ""
            )
        ),
        "the change handled",
    )
    assert {key: len(api.objects[key].history) for key in writes} == writes


async def test_children_no_longer_rendered_are_deleted_and_only_those(api):
    spec = {"nodes": 3, "allowedNamespaces": ["team-b"], "router": {"enabled": True}}
    await apply_cluster(api, **spec)
    await until(lambda: all(live for _, live, _ in children(api, spec)), "every child")
    # Someone else's object carrying the cluster's labels, but not owned by it.
    lookalike = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "notes", "namespace": NS, "labels": REF.children_selector()},
    }
    await send(api, "POST", url("v1/configmaps", NS), lookalike)

    smaller = {"nodes": 3, "router": {"enabled": False}, "etcd": {"managed": False,
               "endpoint": "etcd.infra.svc:2379"}}  # fmt: skip
    await patch_cluster(api, **smaller | {"allowedNamespaces": None})
    await until(lambda: status(api).get("observedGeneration") == 2, "the change applied")
    kept = {key for _, _, key in children(api, smaller)}
    for _, live, key in children(api, spec):
        assert (live is not None) == (key in kept), key
    assert stored(api, "v1/configmaps", "notes") is not None


async def test_changing_nodes_scales_the_statefulset(api):
    await apply_cluster(api, nodes=3)
    await until(lambda: stored(api, STATEFULSETS, REF.nodes), "the nodes' StatefulSet")

    await patch_cluster(api, nodes=4)  # what `kubectl scale kvcache/demo --replicas 4` does
    nodes = await until(
        lambda: (sts := stored(api, STATEFULSETS, REF.nodes))["spec"]["replicas"] == 4 and sts,
        "4 replicas",
    )
    assert nodes["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    await until(lambda: status(api).get("observedGeneration") == 2, "the change observed")
    assert status(api)["ready"] == "0/4"


async def test_status_follows_the_nodes_readiness(api):
    await apply_cluster(api, nodes=3)
    await until(lambda: stored(api, STATEFULSETS, REF.nodes), "the nodes' StatefulSet")
    # What the StatefulSet controller reports as pods start.
    await controller_status(api, REF.nodes, replicas=3, readyReplicas=1)
    await until(lambda: status(api).get("ready") == "1/3", "1 of 3 ready")
    assert status(api)["phase"] == "Progressing"
    assert condition(api, "Progressing") | {"lastTransitionTime": None} == {
        "type": "Progressing",
        "status": "True",
        "reason": "NodesStarting",
        "message": "1 of 3 cache nodes ready",
        "observedGeneration": 1,
        "lastTransitionTime": None,
    }

    await controller_status(api, REF.nodes, replicas=3, readyReplicas=3)
    # every node serves, but they cannot register before their etcd does
    await until(lambda: condition(api, "Ready").get("reason") == "EtcdStarting", "etcd awaited")
    assert status(api)["phase"] == "Progressing"
    await controller_status(api, REF.etcd, replicas=1, readyReplicas=1)
    await until(lambda: status(api).get("phase") == "Ready", "Ready")
    assert status(api)["readyNodes"] == 3
    assert [(c["type"], c["status"]) for c in status(api)["conditions"]] == [
        ("Ready", "True"),
        ("Progressing", "False"),
        ("Degraded", "False"),
    ]


async def test_the_timer_reports_usage_hit_rate_and_engines(api):
    usage = {  # the /stats of two nodes; the third does not answer (the emulator fails it)
        f"{REF.nodes}-0": {
            "memory_budget_bytes": 4 * GiB,
            "memory_used_bytes": GiB,
            "hits": 30,
            "misses": 10,
        },
        f"{REF.nodes}-1": {
            "memory_budget_bytes": 4 * GiB,
            "memory_used_bytes": GiB // 2,
            "disk_budget_bytes": 10 * GiB,
            "disk_used_bytes": 2 * GiB,
            "hits": 5,
            "misses": 5,
        },
    }
    api["get /stats"] << (lambda request: usage[request.url.host.split(".")[0]])
    await apply_cluster(api, nodes=3)
    await until(lambda: stored(api, STATEFULSETS, REF.nodes), "the nodes' StatefulSet")
    nodes_status = url(STATEFULSETS, NS, REF.nodes) + "/status"
    await send(api, "PATCH", nodes_status, {"status": {"replicas": 3, "readyReplicas": 3}})
    await create_engine(api, NS, NAME)

    await until(lambda: status(api).get("engines") == 1, "one engine joined")
    await until(lambda: status(api).get("capacity") == "18Gi", "capacity")
    assert (status(api)["used"], status(api)["hitRate"]) == ("3.5Gi", "70.0%")


async def test_the_nodes_keep_their_image_until_the_spec_names_another(api):
    """An operator upgrade changes the operator's image, not the nodes': restarting every node
    would lose every memory tier. The nodes run status.nodeImage until spec.image moves them."""

    def image(resource: str, name: str) -> str | None:
        obj = stored(api, resource, name)
        return obj and obj["spec"]["template"]["spec"]["containers"][0]["image"]

    await apply_cluster(api)
    await until(lambda: image(STATEFULSETS, REF.nodes) == IMAGE, "the nodes on the operator's")
    await until(lambda: status(api).get("nodeImage") == IMAGE, "the nodes' image recorded")
    # as an older operator recorded it: this one (IMAGE) keeps the nodes there, routers move
    cluster_status = url(CLUSTERS, NS, NAME) + "/status"
    await send(api, "PATCH", cluster_status, {"status": {"nodeImage": "kvcache:old"}})
    await until(lambda: image(STATEFULSETS, REF.nodes) == "kvcache:old", "the recorded image")
    assert image(DEPLOYMENTS, REF.router) == IMAGE
    await patch_cluster(api, image="kvcache:new")
    await until(lambda: image(STATEFULSETS, REF.nodes) == "kvcache:new", "the spec's image")
    await until(lambda: status(api).get("nodeImage") == "kvcache:new", "the new image recorded")
    assert image(DEPLOYMENTS, REF.router) == "kvcache:new"
    await patch_cluster(api, image=None)  # the spec names none again: the nodes stay
    await until(lambda: image(DEPLOYMENTS, REF.router) == IMAGE, "the router on the operator's")
    assert image(STATEFULSETS, REF.nodes) == "kvcache:new"
    assert status(api)["nodeImage"] == "kvcache:new"


async def test_a_child_the_api_server_refuses_is_degraded_with_its_reason(api):
    """A pass-through field the API server finds invalid (here the router's resources) or a
    namespace that is gone: the cluster says so in Degraded instead of retrying in silence, and
    the other children are applied."""
    refusal = {
        "kind": "Status",
        "apiVersion": "v1",
        "status": "Failure",
        "reason": "Invalid",
        "code": 422,
        "message": 'Deployment.apps "demo-router" is invalid: '
        'spec.template.spec.containers[0].resources.requests: Invalid value: "-1"',
    }
    api["post /apis/apps/v1/namespaces/ml/deployments"] << 422 << refusal  # fmt: skip
    await apply_cluster(api, router={"resources": {"requests": {"cpu": "-1"}}})
    await until(lambda: condition(api, "Degraded").get("reason") == "ChildRefused", "refused")
    degraded = condition(api, "Degraded")
    assert "Deployment ml/demo-router" in degraded["message"]
    assert "resources.requests" in degraded["message"]
    assert status(api)["phase"] == "Degraded"
    assert stored(api, STATEFULSETS, REF.nodes)  # the rest was applied


async def test_an_invalid_spec_is_degraded_until_fixed(api):
    await apply_cluster(api, nodes=2, replication=3)  # the CRD's CEL rule would refuse it
    await until(lambda: status(api).get("phase") == "Degraded", "Degraded")
    degraded = condition(api, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "InvalidSpec")
    assert "replication must not exceed nodes" in degraded["message"]
    assert stored(api, STATEFULSETS, REF.nodes) is None

    await patch_cluster(api, replication=2)
    await until(lambda: stored(api, STATEFULSETS, REF.nodes), "the nodes' StatefulSet")
    await until(lambda: condition(api, "Degraded").get("status") == "False", "not Degraded")
    assert status(api)["phase"] == "Pending"


async def test_children_edited_or_deleted_by_hand_are_put_back(api):
    spec = {"nodes": 3}
    await apply_cluster(api, **spec)
    await until(lambda: status(api).get("observedGeneration") == 1, "the cluster applied")
    owners = stored(api, DEPLOYMENTS, REF.router)["metadata"]["ownerReferences"]

    await send(api, "DELETE", url(DEPLOYMENTS, NS, REF.router))
    await send(api, "DELETE", url("v1/configmaps", NS, REF.client_config))
    await send(api, "PATCH", url(STATEFULSETS, NS, REF.nodes), {"spec": {"replicas": 7}})
    budget = {"spec": {"maxUnavailable": 3}, "metadata": {"labels": {"edited": "by-hand"}}}
    await send(api, "PATCH", url("policy/v1/poddisruptionbudgets", NS, REF.nodes), budget)

    await until(
        lambda: all(live and covers(live, manifest) for manifest, live, _ in children(api, spec)),
        "every child as rendered again",
    )
    assert stored(api, STATEFULSETS, REF.nodes)["spec"]["replicas"] == 3
    assert stored(api, DEPLOYMENTS, REF.router)["metadata"]["ownerReferences"] == owners
    # A label it does not render is someone else's, and stays.
    labels = stored(api, "policy/v1/poddisruptionbudgets", REF.nodes)["metadata"]["labels"]
    assert labels["edited"] == "by-hand"


# ----------------------------------------------------------------------------------------------
# Disk size


async def storage_class(api: KubernetesEmulator, name: str, expandable: bool) -> None:
    manifest: dict[str, Any] = {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": "csi.example.com",
    }
    if expandable:
        manifest["allowVolumeExpansion"] = True
    await send(api, "POST", url(STORAGE_CLASSES, None), manifest)


async def make_claims(api: KubernetesEmulator, count: int) -> None:
    """What the StatefulSet controller does for each node: a claim from the template, named
    <template>-<statefulset>-<ordinal>, with the template's labels and the selector's."""
    nodes = stored(api, STATEFULSETS, REF.nodes)
    (template,) = nodes["spec"]["volumeClaimTemplates"]
    labels = template["metadata"]["labels"] | nodes["spec"]["selector"]["matchLabels"]
    for ordinal in range(count):
        name = f"{template['metadata']['name']}-{REF.nodes}-{ordinal}"
        claim = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": name, "namespace": NS, "labels": labels},
            "spec": template["spec"],
        }
        await send(api, "POST", url(CLAIMS, NS), claim)


def claim_sizes(api: KubernetesEmulator) -> list[str]:
    return sorted(
        obj.raw["spec"]["resources"]["requests"]["storage"]
        for (resource, _, _), obj in api.objects.items()
        if resource == CLAIMS and not obj.deleted
    )


def template_size(statefulset: dict[str, Any]) -> str:
    (template,) = statefulset["spec"]["volumeClaimTemplates"]
    return template["spec"]["resources"]["requests"]["storage"]


def statefulset_writes(api: KubernetesEmulator, method: str) -> list[Any]:
    """The operator's PATCH or DELETE requests on the nodes' StatefulSet (not its status)."""
    return [
        request
        for request in operator_requests(api)
        if request.method.value == method
        and request.resource.plural == "statefulsets"
        and request.name == REF.nodes
        and request.subresource is None
    ]


async def test_a_new_disk_size_grows_the_claims_and_replaces_the_statefulset(api):
    await storage_class(api, "expandable", expandable=True)
    await apply_cluster(api, nodes=2, disk="10Gi", storageClassName="expandable")
    before = await until(lambda: stored(api, STATEFULSETS, REF.nodes), "the nodes' StatefulSet")
    await make_claims(api, 2)

    await patch_cluster(api, disk="20480Mi")  # rendered as the API server spells it: 20Gi
    after = await until(
        lambda: (
            (nodes := stored(api, STATEFULSETS, REF.nodes))
            and (template_size(nodes) == "20Gi" and nodes)
        ),
        "the new claim template",
    )
    assert claim_sizes(api) == ["20Gi", "20Gi"]
    assert after["metadata"]["uid"] != before["metadata"]["uid"]
    assert after["metadata"]["ownerReferences"] == before["metadata"]["ownerReferences"]
    (deletion,) = statefulset_writes(api, "DELETE")
    assert deletion.data["propagationPolicy"] == "Orphan"  # the pods and claims keep running
    assert not statefulset_writes(api, "PATCH")  # never the update the API server refuses
    command = after["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command[command.index("--disk") + 1] == str(int(20 * GiB * DISK_FILL))
    await until(lambda: status(api).get("observedGeneration") == 2, "the change applied")
    assert condition(api, "Degraded")["status"] == "False"
    (note,) = await until(lambda: events(api, "StatefulSetReplaced"), "an event saying so")
    assert f"disk-{REF.nodes}-0, disk-{REF.nodes}-1" in note["message"]

    await asyncio.sleep(4 * 0.5)  # timer passes: nothing more to do
    assert stored(api, STATEFULSETS, REF.nodes)["metadata"]["uid"] == after["metadata"]["uid"]
    assert len(statefulset_writes(api, "DELETE")) == 1


@pytest.mark.parametrize(
    ("expandable", "disk", "reason", "says"),
    [
        (False, "20Gi", "DiskResizeRefused", "must support resize"),
        (True, "5Gi", "DiskCannotShrink", "volumes cannot shrink"),
    ],
    ids=["class-cannot-expand", "shrink"],
)
async def test_a_disk_its_claims_cannot_take_is_degraded_and_keeps_the_statefulset(
    api, expandable, disk, reason, says
):
    await storage_class(api, "standard", expandable)
    await apply_cluster(api, nodes=2, disk="10Gi", storageClassName="standard")
    before = await until(lambda: stored(api, STATEFULSETS, REF.nodes), "the nodes' StatefulSet")
    await make_claims(api, 2)

    await patch_cluster(api, disk=disk)
    await until(lambda: condition(api, "Degraded").get("reason") == reason, reason)
    degraded = condition(api, "Degraded")
    assert degraded["status"] == "True" and says in degraded["message"]
    assert f"disk-{REF.nodes}-0" in degraded["message"] and "spec.disk" in degraded["message"]
    assert (status(api)["phase"], status(api)["observedGeneration"]) == ("Degraded", 2)
    kept = stored(api, STATEFULSETS, REF.nodes)
    assert without_versions(kept) == without_versions(before)  # template and budget included
    assert claim_sizes(api) == ["10Gi", "10Gi"]
    assert not statefulset_writes(api, "DELETE") and not statefulset_writes(api, "PATCH")

    # The nodes' readiness changes status, not the problem.
    nodes_status = url(STATEFULSETS, NS, REF.nodes) + "/status"
    await send(api, "PATCH", nodes_status, {"status": {"replicas": 2, "readyReplicas": 1}})
    await until(lambda: status(api).get("ready") == "1/2", "1 of 2 ready")
    assert condition(api, "Degraded")["reason"] == reason

    await patch_cluster(api, disk="10Gi")  # set back
    await until(lambda: condition(api, "Degraded").get("status") == "False", "not Degraded")
    assert stored(api, STATEFULSETS, REF.nodes)["metadata"]["uid"] == before["metadata"]["uid"]


# ----------------------------------------------------------------------------------------------
# Engines


@pytest.mark.parametrize(
    "spec",
    [{"nodes": 3}, {"nodes": 3, "security": {"curveSecret": "demo-curve"}}],
    ids=["plain", "curve"],
)
async def test_annotating_an_engine_joins_it_and_removing_the_annotation_restores_it(api, spec):
    await apply_cluster(api, **spec)
    original = await create_engine(api, NS)
    annotate = {"metadata": {"annotations": {CLUSTER_ANNOTATION: NAME}}}

    await send(api, "PATCH", url(DEPLOYMENTS, NS, "vllm"), annotate)  # kubectl annotate
    patched = await until(lambda: joined(api, NS), "the engine joined")
    cluster = stored(api, CLUSTERS, NAME)
    settings = engine_settings(
        KVCacheClusterSpec.from_dict(cluster["spec"]), REF, cluster["metadata"]["uid"], NS
    )
    annotated = apply_merge_patch(original, annotate)
    expected = apply_merge_patch(annotated, join_engine(annotated, settings))
    assert without_versions(patched) == without_versions(expected)
    assert ("KVCACHE_CURVE_SERVER_KEY" in env(patched)) == ("security" in spec)

    remove = {"metadata": {"annotations": {CLUSTER_ANNOTATION: None}}}
    await send(api, "PATCH", url(DEPLOYMENTS, NS, "vllm"), remove)  # kubectl annotate ...-
    await until(lambda: not joined(api, NS), "the engine left")
    assert without_versions(stored(api, DEPLOYMENTS, "vllm", NS)) == without_versions(original)


async def test_a_changed_cluster_rejoins_its_engines_and_namespaces_must_be_allowed(api):
    await apply_cluster(api, nodes=3, codec="int8")
    await create_engine(api, NS, NAME)
    await until(lambda: joined(api, NS), "the engine joined")
    assert env(joined(api, NS))["KVCACHE_CODEC"] == "int8"

    await patch_cluster(api, codec="none")
    await until(lambda: env(joined(api, NS))["KVCACHE_CODEC"] == "none", "the engine re-joined")

    # Another namespace may join only once the cluster lists it.
    await create_engine(api, "team-c", f"{NS}/{NAME}")
    await until(
        lambda: any(
            event["involvedObject"]["namespace"] == "team-c" for event in events(api, "JoinRefused")
        ),
        "a JoinRefused event",
    )
    assert not joined(api, "team-c")
    await patch_cluster(api, allowedNamespaces=["team-c"])
    other = await until(lambda: joined(api, "team-c"), "the other namespace's engine joined")
    # Namespace isolation: the two namespaces key their chunks with different salts.
    assert env(other)["KVCACHE_TENANT_SALT"] != env(joined(api, NS))["KVCACHE_TENANT_SALT"]


async def test_deleting_the_cluster_removes_what_owner_references_cannot(api):
    spec = {"nodes": 3, "allowedNamespaces": ["team-b"]}
    await apply_cluster(api, **spec)
    original = await create_engine(api, "team-b", f"{NS}/{NAME}")
    await until(lambda: joined(api, "team-b"), "the engine joined")
    await until(lambda: all(live for _, live, _ in children(api, spec)), "every child")
    uid = stored(api, CLUSTERS, NAME)["metadata"]["uid"]

    await send(api, "DELETE", url(CLUSTERS, NS, NAME))
    await until(lambda: stored(api, CLUSTERS, NAME) is None, "the cluster gone")

    # The engine left, restored exactly as its owner wrote it.
    engine_now = stored(api, DEPLOYMENTS, "vllm", "team-b")
    assert without_versions(engine_now) == without_versions(original)
    for manifest, live, _ in children(api, spec):
        if manifest["metadata"]["namespace"] == "team-b":
            assert live is None, manifest["metadata"]  # removed by the operator
        else:  # left to the garbage collector, which this emulator does not run
            assert [owner["uid"] for owner in live["metadata"]["ownerReferences"]] == [uid]


async def test_a_refusal_is_announced_once_until_its_reason_changes(api):
    await apply_cluster(api, nodes=3)
    original = await create_engine(api, "team-c", f"{NS}/{NAME}")

    def refusals() -> list[str]:
        return [
            event["message"]
            for event in events(api, "JoinRefused")
            if event["involvedObject"]["namespace"] == "team-c"
        ]

    def record() -> str | None:
        deployment = stored(api, DEPLOYMENTS, "vllm", "team-c")
        return deployment["metadata"].get("annotations", {}).get(REFUSED_ANNOTATION)

    (first,) = await until(refusals, "a JoinRefused event")
    assert "may not join" in first and await until(record, "the refusal recorded") == first

    # Passes that find the same refusal: the cluster changed (it re-checks its engines), and
    # the engine changed.
    await patch_cluster(api, codec="none")
    await until(lambda: status(api).get("observedGeneration") == 2, "the change applied")
    touch = {"metadata": {"labels": {"touched": "yes"}}}
    await send(api, "PATCH", url(DEPLOYMENTS, "team-c", "vllm"), touch)
    await asyncio.sleep(1.0)
    assert refusals() == [first]

    renamed = {"metadata": {"annotations": {CLUSTER_ANNOTATION: "Not A Name"}}}
    await send(api, "PATCH", url(DEPLOYMENTS, "team-c", "vllm"), renamed)
    await until(lambda: len(refusals()) == 2, "the new refusal announced")
    assert CLUSTER_ANNOTATION in refusals()[1] and record() == refusals()[1]

    remove = {"metadata": {"annotations": {CLUSTER_ANNOTATION: None}}}
    await send(api, "PATCH", url(DEPLOYMENTS, "team-c", "vllm"), remove)
    await until(lambda: record() is None, "the record removed")
    expected = apply_merge_patch(original, touch)
    del expected["metadata"]["annotations"]  # it held only the one removed
    assert without_versions(stored(api, DEPLOYMENTS, "vllm", "team-c")) == without_versions(
        expected
    )
