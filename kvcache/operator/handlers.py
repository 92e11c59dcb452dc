"""The operator's kopf handlers: `kopf run --all-namespaces -m kvcache.operator.handlers`.

Thin on purpose: each handler reads what it needs, asks the pure modules what should be (render:
the children; apply: the patch to each; observed: the status; engines: an engine's patch), and
sends that through kvcache.operator.kube.

- `reconcile` (a cluster created, changed, or found at start): apply the children (a disk size
  change replaces the nodes' StatefulSet: kvcache.operator.volumes), delete the ones no longer
  rendered, write status, and (re)join the engines that ask for the cluster.
- `nodes_changed` (the nodes' StatefulSet changed): status follows the nodes' readiness.
- `observe` (every KVCACHE_STATUS_INTERVAL seconds): apply the children again, which puts back
  any edited or deleted by hand, and read the nodes' /stats and the engines joined.
- `cleanup` (a cluster deleted; kopf's finalizer holds it until this succeeds): owner references
  let the garbage collector take the children; this removes what they cannot reach (the
  router's Roles in other namespaces) and has the joined engines leave.
- `engine_changed` (a Deployment annotated kvcache.io/cluster, or joined, changed): join or
  leave. Event handlers keep no state on the object, so a Deployment that leaves is restored
  exactly: kopf writes nothing of its own onto users' Deployments, and the operator's records
  (what joining added, why it was refused) go once they no longer hold.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Mapping
from typing import Any

import kopf

from kvcache.operator.apply import covers
from kvcache.operator.children import (
    ROLE_BINDINGS,
    ROLES,
    Applied,
    apply_children,
    prune_children,
)
from kvcache.operator.crd import GROUP, PLURAL, VERSION
from kvcache.operator.engines import engine_patch, requested_cluster
from kvcache.operator.join import JoinError
from kvcache.operator.kube import CLUSTERS, DEPLOYMENTS, STATEFULSETS, Conflict, Kube
from kvcache.operator.names import (
    CLUSTER_ANNOTATION,
    JOINED_ANNOTATION,
    MANAGED_BY,
    NODE,
    REFUSED_ANNOTATION,
    ClusterRef,
)
from kvcache.operator.observed import (
    Observation,
    cluster_status,
    invalid_status,
    standing_problem,
)
from kvcache.operator.render import (
    ClusterObjects,
    ImagePulling,
    nodes_image,
    rbac_labels,
    render_cluster,
)
from kvcache.operator.schema import SpecError, to_dict
from kvcache.operator.spec import KVCacheClusterSpec
from kvcache.operator.stats import read_usage

LOGGER = logging.getLogger("kvcache.operator")
# Read once, at import: kopf fixes a timer's interval when the handler is registered.
STATUS_INTERVAL_S = float(os.environ.get("KVCACHE_STATUS_INTERVAL", "30"))
FINALIZER = "kvcache.io/cleanup"
NODE_LABELS = {"app.kubernetes.io/managed-by": MANAGED_BY, "app.kubernetes.io/component": NODE}


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """kopf's bookkeeping under kvcache.io names, in annotations only (the CRD's status schema
    has no room for kopf's, and the API server would prune it); the API client; the image."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kvcache.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kvcache.io", key="last-handled-configuration"
    )
    image = os.environ.get("KVCACHE_IMAGE")
    if not image:
        raise kopf.PermanentError("KVCACHE_IMAGE is not set: the image of nodes and routers")
    memo.image = image
    memo.pulling = ImagePulling.from_env(os.environ)
    memo.kube = Kube(settings, LOGGER)


# ----------------------------------------------------------------------------------------------
# Clusters


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
async def reconcile(
    body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, engine_requests: kopf.Index, **_: Any
) -> None:
    kube: Kube = memo.kube
    try:
        ref, spec = _parse(body)
    except SpecError as error:
        status = invalid_status(str(error), body.meta.get("generation"), _conditions(body), _now())
        patch.status.update(to_dict(status))
        raise kopf.PermanentError(f"invalid spec: {error}") from error
    objects = _render(body, ref, spec, memo)
    patch.status["nodeImage"] = _nodes_image(body, spec, memo)
    try:
        async with _apply_lock(memo):
            applied = await apply_children(kube, objects)
            await prune_children(kube, ref, body.meta["uid"], objects)
    except Conflict as error:
        raise kopf.TemporaryError(str(error), delay=1) from error
    _announce(body, applied)
    nodes = applied.live[STATEFULSETS.plural, ref.namespace, ref.nodes]
    seen = Observation.of_statefulset(
        body.meta.get("generation"), nodes, rendered=True, problem=applied.problem,
        **await _etcd(kube, ref, spec, applied.live),
    )  # fmt: skip
    patch.status.update(to_dict(cluster_status(spec, ref, seen, _conditions(body), _now())))
    for namespace, name in engine_requests.get((ref.namespace, ref.name), ()):
        engine = await kube.read(DEPLOYMENTS, namespace, name)
        if engine is not None:
            await _sync_engine(kube, engine, body)


@kopf.on.event("apps", "v1", "statefulsets", labels=NODE_LABELS)
async def nodes_changed(
    type: str | None,
    body: kopf.Body,
    namespace: str,
    labels: kopf.Labels,
    memo: kopf.Memo,
    **_: Any,
) -> None:
    if type == "DELETED":
        return
    kube: Kube = memo.kube
    cluster = await kube.read(CLUSTERS, namespace, labels["app.kubernetes.io/instance"])
    if cluster is None or cluster["metadata"].get("deletionTimestamp"):
        return
    try:
        ref, spec = _parse(cluster)
    except SpecError:
        return  # reconcile reports it
    if body.meta["name"] != ref.nodes:
        return
    generation, conditions = cluster["metadata"].get("generation"), _conditions(cluster)
    seen = Observation.of_statefulset(
        generation, body, problem=standing_problem(conditions), **await _etcd(kube, ref, spec)
    )
    status = to_dict(cluster_status(spec, ref, seen, conditions, _now()))
    if not covers(cluster.get("status") or {}, status):
        await kube.patch(CLUSTERS, namespace, ref.name, {"status": status}, subresource="status")


@kopf.timer(GROUP, VERSION, PLURAL, interval=STATUS_INTERVAL_S)
async def observe(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    kube: Kube = memo.kube
    try:
        ref, spec = _parse(body)
    except SpecError:
        return  # reconcile reports it
    problem = standing_problem(_conditions(body))
    # Only a generation reconcile has applied: a newer one is reconcile's to apply first.
    if body.meta.get("generation") == body.status.get("observedGeneration"):
        objects = _render(body, ref, spec, memo)
        try:
            async with _apply_lock(memo):
                applied = await apply_children(kube, objects)
        except Conflict as error:
            LOGGER.info("%s: children changing meanwhile, repaired next time: %s", ref, error)
        else:
            _announce(body, applied)
            if applied.written:
                LOGGER.info("%s: put back %s", ref, ", ".join(applied.written))
            problem = applied.problem
    nodes = await kube.read(STATEFULSETS, ref.namespace, ref.nodes)
    running = Observation.of_statefulset(None, nodes).current_nodes
    seen = Observation.of_statefulset(
        body.meta.get("generation"),
        nodes,
        usage=await read_usage(ref, range(running), LOGGER),
        engines=len(await kube.list(DEPLOYMENTS, None, ref.engine_labels())),
        problem=problem,
        **await _etcd(kube, ref, spec),
    )
    patch.status.update(to_dict(cluster_status(spec, ref, seen, _conditions(body), _now())))


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def cleanup(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    kube: Kube = memo.kube
    try:
        ref = ClusterRef(body.meta["namespace"], body.meta["name"])
    except ValueError:
        return  # never rendered: nothing of it exists
    try:
        for resource in (ROLES, ROLE_BINDINGS):
            for live in await kube.list(resource, None, rbac_labels(ref)):
                if live["metadata"]["namespace"] != ref.namespace:  # the rest are owned
                    await kube.delete(
                        resource, live["metadata"]["namespace"], live["metadata"]["name"]
                    )
        for engine in await kube.list(DEPLOYMENTS, None, ref.engine_labels()):
            await _sync_engine(kube, engine, None)
    except Conflict as error:
        raise kopf.TemporaryError(str(error), delay=1) from error


def _parse(cluster: Mapping[str, Any]) -> tuple[ClusterRef, KVCacheClusterSpec]:
    metadata = cluster["metadata"]
    try:
        ref = ClusterRef(metadata["namespace"], metadata["name"])
    except ValueError as error:
        raise SpecError([f"metadata.name: {error}"]) from error
    return ref, KVCacheClusterSpec.from_dict(cluster.get("spec"))


async def _etcd(
    kube: Kube,
    ref: ClusterRef,
    spec: KVCacheClusterSpec,
    applied: Mapping[tuple[str, str, str], Any] | None = None,
) -> dict[str, Any]:
    """The managed etcd's StatefulSet, for the observation: nodes that cannot register serve
    no client, so the cluster is not Ready without it. `applied`: the children an apply just
    returned, which hold it already."""
    if not spec.etcd.managed:
        return {}
    key = (STATEFULSETS.plural, ref.namespace, ref.etcd)
    etcd = applied[key] if applied and key in applied else await kube.read(STATEFULSETS, *key[1:])
    return {"etcd": etcd, "etcd_managed": True}


def _conditions(cluster: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list((cluster.get("status") or {}).get("conditions") or [])


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _render(
    body: kopf.Body, ref: ClusterRef, spec: KVCacheClusterSpec, memo: kopf.Memo
) -> ClusterObjects:
    objects = render_cluster(spec, ref, memo.image, body.status.get("nodeImage"), memo.pulling)
    kopf.adopt(objects.owned, owner=body)
    return objects


def _nodes_image(body: kopf.Body, spec: KVCacheClusterSpec, memo: kopf.Memo) -> str:
    return nodes_image(spec, memo.image, body.status.get("nodeImage"))


def _apply_lock(memo: kopf.Memo) -> asyncio.Lock:
    """One apply at a time per cluster (kopf gives each object its own memo): the timer's
    repair must not interleave with the reconcile of a newer spec and put back the old one."""
    return memo.setdefault("apply_lock", asyncio.Lock())


def _announce(cluster: kopf.Body, applied: Applied) -> None:
    for note in applied.replaced:
        kopf.info(cluster, reason="StatefulSetReplaced", message=note)


# ----------------------------------------------------------------------------------------------
# Engines


@kopf.index("apps", "v1", "deployments", annotations={CLUSTER_ANNOTATION: kopf.PRESENT})
async def engine_requests(body: kopf.Body, **_: Any) -> dict[tuple[str, str], tuple[str, str]]:
    """Deployments by the cluster their annotation names: a cluster that changes re-joins them."""
    try:
        ref = requested_cluster(body)
    except JoinError:
        return {}
    assert ref is not None  # the annotation filter
    return {(ref.namespace, ref.name): (body.meta["namespace"], body.meta["name"])}


def _is_engine(annotations: kopf.Annotations, **_: Any) -> bool:
    return any(
        key in annotations for key in (CLUSTER_ANNOTATION, JOINED_ANNOTATION, REFUSED_ANNOTATION)
    )


@kopf.on.event("apps", "v1", "deployments", when=_is_engine)
async def engine_changed(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    if type == "DELETED":
        return
    kube: Kube = memo.kube
    try:
        ref = requested_cluster(body)
    except JoinError:
        ref = None  # engine_patch says why
    cluster = None if ref is None else await kube.read(CLUSTERS, ref.namespace, ref.name)
    await _sync_engine(kube, body, cluster)


async def _sync_engine(
    kube: Kube, engine: Mapping[str, Any], cluster: Mapping[str, Any] | None
) -> None:
    """Join `engine` to `cluster` (None: leave), as far as it is not joined so already."""
    result = engine_patch(engine, cluster)
    if not result.patch:
        return
    metadata = engine["metadata"]
    try:
        await kube.patch(DEPLOYMENTS, metadata["namespace"], metadata["name"], result.patch)
    except Conflict:
        # Changed since it was read: its own watch event brings the new version here again.
        LOGGER.info("engine %s/%s changed meanwhile", metadata["namespace"], metadata["name"])
        return
    if result.announce:  # recorded now: the next passes find it and stay quiet
        kopf.warn(engine, reason="JoinRefused", message=result.problem or "")
