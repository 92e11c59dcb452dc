"""Bringing a cluster's children to their rendering through the API: the reconcile's apply and
the timer's drift repair are this one module.

`apply_children` creates each child that is missing and patches what differs from its rendering
(kvcache.operator.apply says what differs), so applying a rendering twice writes nothing the
second time, and a child edited or deleted by hand is put back. A StatefulSet whose change an
update cannot make (a new disk size) is replaced as kvcache.operator.volumes decides.
`prune_children` deletes the children the spec no longer renders.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from kvcache.operator.apply import apply_patch, stamped
from kvcache.operator.kube import (
    CHILD_KINDS,
    CLAIMS,
    STATEFULSETS,
    Conflict,
    Kube,
    Manifest,
    Refused,
    resource_of,
)
from kvcache.operator.names import ClusterRef
from kvcache.operator.observed import Problem
from kvcache.operator.render import ClusterObjects, rbac_labels
from kvcache.operator.volumes import needs_replacing, refused_problem, resize_plan

ROLES = CHILD_KINDS["rbac.authorization.k8s.io/v1", "Role"]
ROLE_BINDINGS = CHILD_KINDS["rbac.authorization.k8s.io/v1", "RoleBinding"]

# How long a replaced StatefulSet may take to go before its successor is created (the garbage
# collector's work, usually well under a second); past that, the next pass creates it.
ORPHANING_S = 10.0
POLL_S = 0.2

ChildKey = tuple[str, str, str]


def child_key(manifest: Mapping[str, Any]) -> ChildKey:
    """What identifies a child, on rendered objects and on listed ones (list items carry no
    kind): its resource, namespace and name."""
    metadata = manifest["metadata"]
    return resource_of(manifest).plural, metadata["namespace"], metadata["name"]


@dataclass(frozen=True)
class Applied:
    """The children after an apply, by `child_key`. `written`: the children created or changed
    (on a repair: what had drifted). `replaced`: what was done beyond patches, for the cluster's
    events. `problem`: why a child was left as it was, for its Degraded condition."""

    live: dict[ChildKey, Manifest | None] = field(default_factory=dict)
    written: tuple[str, ...] = ()
    replaced: tuple[str, ...] = ()
    problem: Problem | None = None


@dataclass(frozen=True)
class _Outcome:
    live: Manifest | None  # None: a child that could not be created
    written: bool = False
    replaced: str | None = None
    problem: Problem | None = None


async def apply_children(kube: Kube, objects: ClusterObjects) -> Applied:
    """Apply every child; Conflict when one changed or is still going meanwhile (apply again)."""
    live: dict[ChildKey, Manifest | None] = {}
    written: list[str] = []
    replaced: list[str] = []
    problems: list[Problem] = []
    for manifest in (*objects.owned, *objects.elsewhere):
        key = child_key(manifest)
        outcome = await _apply(kube, stamped(manifest))
        live[key] = outcome.live
        if outcome.written:
            written.append(f"{key[0]} {key[1]}/{key[2]}")
        if outcome.replaced:
            replaced.append(outcome.replaced)
        if outcome.problem:
            problems.append(outcome.problem)
    return Applied(live, tuple(written), tuple(replaced), problems[0] if problems else None)


async def _apply(kube: Kube, desired: Manifest) -> _Outcome:
    resource = resource_of(desired)
    namespace, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
    live = await kube.read(resource, namespace, name)
    try:
        return await _bring(kube, resource, desired, live)
    except Refused as error:
        # a pass-through field the API server finds invalid, a namespace that is gone: the
        # child stays as it was and the cluster says why, rather than retrying for ever
        problem = Problem(
            "ChildRefused", f"the API server refused {desired['kind']} {namespace}/{name}: {error}"
        )
        return _Outcome(live, problem=problem)


async def _bring(
    kube: Kube, resource: kopf.Resource, desired: Manifest, live: Manifest | None
) -> _Outcome:
    namespace, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
    if live is None:
        return _Outcome(await kube.create(desired), written=True)
    if live["metadata"].get("deletionTimestamp"):
        # A StatefulSet just replaced, which the garbage collector still holds.
        raise Conflict(f"{resource.plural} {namespace}/{name} is still being deleted")
    change = apply_patch(live, desired)
    if not change:
        return _Outcome(live)
    if resource is STATEFULSETS and needs_replacing(change):
        return await _replace(kube, live, desired)
    patched = await kube.patch(resource, namespace, name, change)
    if patched is None:
        raise Conflict(f"{resource.plural} {namespace}/{name} was deleted meanwhile")
    # The API server skips a write that changes nothing (a quantity it spells otherwise).
    version = live["metadata"].get("resourceVersion")
    return _Outcome(patched, written=patched["metadata"].get("resourceVersion") != version)


async def _replace(kube: Kube, live: Manifest, desired: Manifest) -> _Outcome:
    """Grow the StatefulSet's claims to its new templates, then delete it leaving its pods and
    claims and create it anew; or, where a claim cannot take the new size, leave it as it is."""
    namespace, name = desired["metadata"]["namespace"], desired["metadata"]["name"]
    claims = await kube.list(CLAIMS, namespace, desired["spec"]["selector"]["matchLabels"])
    plan = resize_plan(desired, claims)
    if plan.shrink:
        return _Outcome(live, problem=plan.shrink_problem(name))
    for resize in plan.grow:
        try:
            await kube.patch(CLAIMS, namespace, resize.name, resize.patch(), once=True)
        except Refused as error:
            return _Outcome(live, problem=refused_problem(resize, name, str(error)))
    await kube.delete(STATEFULSETS, namespace, name, orphan=True)
    await _gone(kube, STATEFULSETS, namespace, name)
    created = await kube.create(desired)
    grown = ", ".join(resize.name for resize in plan.grow)
    note = (
        f"StatefulSet {name} created again with its new volumeClaimTemplates (pods and claims "
        "kept)" + (f"; claims grown: {grown}" if grown else "")
    )
    # The new StatefulSet adopts the old one's pods: their status until its controller writes.
    status = live.get("status") or {}
    return _Outcome({**created, "status": status}, written=True, replaced=note)


async def _gone(kube: Kube, resource: kopf.Resource, namespace: str, name: str) -> None:
    """Wait while the object is held (the garbage collector first releases its pods and claims
    from it, under the `orphan` finalizer); Conflict if that takes longer than ORPHANING_S."""
    deadline = time.monotonic() + ORPHANING_S
    while await kube.read(resource, namespace, name) is not None:
        if time.monotonic() > deadline:
            raise Conflict(f"{resource.plural} {namespace}/{name} is still being deleted")
        await asyncio.sleep(POLL_S)


async def prune_children(kube: Kube, ref: ClusterRef, uid: str, objects: ClusterObjects) -> None:
    """Delete the children this spec no longer renders: in the cluster's namespace those it
    owns, elsewhere the router's Roles for namespaces no longer allowed to join."""
    keep = {child_key(manifest) for manifest in (*objects.owned, *objects.elsewhere)}
    for resource in dict.fromkeys(CHILD_KINDS.values()):
        for live in await kube.list(resource, ref.namespace, ref.children_selector()):
            metadata = live["metadata"]
            owners = {owner.get("uid") for owner in metadata.get("ownerReferences", [])}
            if (resource.plural, ref.namespace, metadata["name"]) not in keep and uid in owners:
                await kube.delete(resource, ref.namespace, metadata["name"])
    for resource in (ROLES, ROLE_BINDINGS):
        for live in await kube.list(resource, None, rbac_labels(ref)):
            namespace, name = live["metadata"]["namespace"], live["metadata"]["name"]
            if namespace != ref.namespace and (resource.plural, namespace, name) not in keep:
                await kube.delete(resource, namespace, name)
