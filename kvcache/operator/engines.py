"""Which merge patch an engine Deployment needs, given its annotation and its cluster: pure.

A Deployment annotated `kvcache.io/cluster` joins the cluster it names while that cluster exists
and lets it join; without the annotation, or once the cluster is gone or being deleted, it
leaves (kvcache.operator.join does the patching itself). The handlers call `engine_patch` on
every change of an engine and of its cluster, so it must be idempotent: a Deployment that is as
it should be gets an empty patch.

Why an engine cannot join is recorded on it, in the `kvcache.io/join-refused` annotation, and
removed once that no longer holds: the handlers post a JoinRefused event only for a refusal the
Deployment does not record yet, not on every pass (a cluster's change re-checks all its engines).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kvcache.operator import merge_patch
from kvcache.operator.join import JoinError, engine_settings, join_engine, unjoin_engine
from kvcache.operator.names import CLUSTER_ANNOTATION, REFUSED_ANNOTATION, ClusterRef
from kvcache.operator.schema import SpecError
from kvcache.operator.spec import KVCacheClusterSpec


@dataclass(frozen=True)
class EnginePatch:
    """The merge patch to send (empty: none), and why the engine could not join, if it could
    not. `announce`: that refusal is new to the Deployment (for a Warning event on it, once the
    patch recording it went through)."""

    patch: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    announce: bool = False


def requested_cluster(deployment: Mapping[str, Any]) -> ClusterRef | None:
    """The cluster the annotation names, or None without one; JoinError when it names none."""
    metadata = deployment["metadata"]
    value = metadata.get("annotations", {}).get(CLUSTER_ANNOTATION)
    if value is None:
        return None
    try:
        return ClusterRef.from_annotation(value, metadata["namespace"])
    except ValueError as error:
        raise JoinError(f"{CLUSTER_ANNOTATION}: {error}") from error


def engine_patch(deployment: Mapping[str, Any], cluster: Mapping[str, Any] | None) -> EnginePatch:
    """`cluster` is the resource the annotation names (None: no annotation, or no such
    cluster); a cluster the annotation no longer names changes nothing. A cluster whose spec is
    invalid leaves its engines as they are: a typo in the spec must not restart every engine
    twice."""
    try:
        ref = requested_cluster(deployment)
    except JoinError as error:
        return _recorded(deployment, unjoin_engine(deployment), str(error))
    if cluster is not None and ref != ClusterRef(
        cluster["metadata"]["namespace"], cluster["metadata"]["name"]
    ):
        return EnginePatch()  # the annotation changed since: the engine's own event decides
    if ref is None or cluster is None or cluster["metadata"].get("deletionTimestamp"):
        return _recorded(deployment, unjoin_engine(deployment), None)
    try:
        spec = KVCacheClusterSpec.from_dict(cluster.get("spec"))
    except SpecError as error:
        return _recorded(deployment, {}, f"cluster {ref} has an invalid spec: {error}")
    try:
        settings = engine_settings(
            spec, ref, cluster["metadata"]["uid"], deployment["metadata"]["namespace"]
        )
        return _recorded(deployment, join_engine(deployment, settings), None)
    except JoinError as error:
        return _recorded(deployment, unjoin_engine(deployment), str(error))


def _recorded(
    deployment: Mapping[str, Any], patch: dict[str, Any], problem: str | None
) -> EnginePatch:
    """`patch`, also recording `problem` on the Deployment (None: removing the record of a
    refusal that no longer holds), made valid only against the version it was computed from."""
    recorded = deployment["metadata"].get("annotations", {}).get(REFUSED_ANNOTATION)
    if problem != recorded:
        desired = merge_patch.apply(deployment, patch)
        annotations = desired["metadata"].setdefault("annotations", {})
        if problem is None:
            annotations.pop(REFUSED_ANNOTATION, None)
        else:
            annotations[REFUSED_ANNOTATION] = problem
        if not annotations:  # Kubernetes drops empty maps; so does this, for equal objects
            del desired["metadata"]["annotations"]
        patch = merge_patch.diff(deployment, desired)
    announce = problem is not None and problem != recorded
    return EnginePatch(_guarded(deployment, patch), problem, announce)


def _guarded(deployment: Mapping[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """The patch, valid only against the version it was computed from: it replaces the
    containers list whole, so a concurrent edit must fail it (409) rather than be lost; the
    next watch event computes it again."""
    version = deployment["metadata"].get("resourceVersion")
    if patch and version:
        patch.setdefault("metadata", {})["resourceVersion"] = version
    return patch
