"""A KVCacheCluster's status from what the operator observed: pure functions, no API calls.

The handlers observe (the cache nodes' StatefulSet, the nodes' `/stats`, the joined engines, what
an apply could not do) and this module decides what status says: phase, the Ready / Progressing /
Degraded conditions with their observedGeneration, and the figures `kubectl get kvcache` shows.
A condition keeps its `lastTransitionTime` while its status stays the same, so writing the same
observation twice writes the same status.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvcache.operator.names import ClusterRef
from kvcache.operator.spec import KVCacheClusterSpec
from kvcache.operator.status import Condition, KVCacheClusterStatus

_UNITS = ("Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
INVALID_SPEC = "InvalidSpec"


@dataclass(frozen=True)
class Problem:
    """Why the children are not as a valid spec asks (a claim that cannot grow, ...): the
    Degraded condition's reason and message."""

    reason: str
    message: str


@dataclass(frozen=True)
class NodeUsage:
    """One cache node's figures, from its `/stats` (kvcache.cachenode.stats.NodeStats)."""

    budget_bytes: int
    used_bytes: int
    hits: int
    misses: int

    @classmethod
    def from_stats(cls, stats: Mapping[str, Any]) -> NodeUsage:
        """Memory and disk tiers together; a node without a disk tier reports zeros for it."""
        if not isinstance(stats, Mapping):
            raise ValueError(f"/stats is not an object: {stats!r}")

        def figure(name: str) -> int:
            value = stats.get(name, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"/stats field {name!r} is not a count: {value!r}")
            return value

        return cls(
            budget_bytes=figure("memory_budget_bytes") + figure("disk_budget_bytes"),
            used_bytes=figure("memory_used_bytes") + figure("disk_used_bytes"),
            hits=figure("hits"),
            misses=figure("misses"),
        )


@dataclass(frozen=True)
class Observation:
    """One look at a cluster, made at the resource's `generation`. `rendered`: the children
    were just applied from that generation (status.observedGeneration says so; other looks
    leave it). `usage` and `engines` are None when not read this time (only the timer reads
    them): status then keeps the figures it had. `problem`: what the apply could not do."""

    generation: int | None
    ready_nodes: int
    current_nodes: int  # node pods the StatefulSet runs, ready or not
    updated_nodes: int | None = None  # on the newest template while a rollout runs, else None
    rendered: bool = False
    usage: tuple[NodeUsage, ...] | None = None
    engines: int | None = None
    problem: Problem | None = None
    template_pending: bool = False  # the StatefulSet controller has not seen its newest spec
    etcd_ready: bool | None = None  # the managed etcd serves (None: not managed, or not read)

    @classmethod
    def of_statefulset(
        cls,
        generation: int | None,
        statefulset: Mapping[str, Any] | None,
        *,
        rendered: bool = False,
        usage: tuple[NodeUsage, ...] | None = None,
        engines: int | None = None,
        problem: Problem | None = None,
        etcd: Mapping[str, Any] | None = None,
        etcd_managed: bool = False,
    ) -> Observation:
        """From the nodes' StatefulSet as the API server reports it (None: not there yet), and
        the managed etcd's. A rollout runs while the controller's current revision is not yet
        its update revision, and before that, while it has not observed the newest generation
        (its revisions and counts still describe the template before)."""
        status = (statefulset or {}).get("status") or {}
        revisions = status.get("currentRevision"), status.get("updateRevision")
        rolling = all(revisions) and revisions[0] != revisions[1]
        wanted = ((statefulset or {}).get("metadata") or {}).get("generation")
        pending = wanted is not None and int(status.get("observedGeneration") or 0) < wanted
        etcd_status = (etcd or {}).get("status") or {}
        return cls(
            generation=generation,
            ready_nodes=int(status.get("readyReplicas") or 0),
            current_nodes=int(status.get("replicas") or 0),
            updated_nodes=int(status.get("updatedReplicas") or 0) if rolling else None,
            rendered=rendered,
            usage=usage,
            engines=engines,
            problem=problem,
            template_pending=pending,
            etcd_ready=int(etcd_status.get("readyReplicas") or 0) >= 1 if etcd_managed else None,
        )


def cluster_status(
    spec: KVCacheClusterSpec,
    ref: ClusterRef,
    seen: Observation,
    previous: Sequence[Mapping[str, Any]],
    now: str,
) -> KVCacheClusterStatus:
    """Progressing while nodes start, stop or roll to a new template, Ready once every
    asked-for node is ready, Degraded while the apply reports a problem."""
    desired, ready = spec.nodes, seen.ready_nodes
    if ready < desired:
        unready = ("NodesStarting", f"{ready} of {desired} cache nodes ready")
    elif seen.current_nodes > desired:
        unready = ("NodesStopping", f"{seen.current_nodes - desired} cache nodes to stop")
    elif seen.etcd_ready is False:
        unready = ("EtcdStarting", "the cluster's etcd is not ready: nodes cannot register")
    else:
        unready = None
    moving = unready
    if moving is None and seen.template_pending:
        # the nodes serve on; the new spec is not theirs yet (its counts describe the old one)
        moving = ("NodesUpdating", "the StatefulSet controller has not yet taken the new spec")
    elif moving is None and seen.updated_nodes is not None:
        moving = ("NodesUpdating", f"{seen.updated_nodes} of {desired} cache nodes updated")
    settled = ("AllNodesReady", f"{desired} cache nodes ready")
    problem = seen.problem
    conditions = (
        _condition(
            "Ready",
            ("True", *settled) if unready is None else ("False", *unready),
            seen.generation,
            previous,
            now,
        ),
        _condition(
            "Progressing",
            ("False", *settled) if moving is None else ("True", *moving),
            seen.generation,
            previous,
            now,
        ),
        _condition(
            "Degraded",
            ("False", "SpecValid", "")
            if problem is None
            else ("True", problem.reason, problem.message),
            seen.generation,
            previous,
            now,
        ),
    )
    if problem is not None:
        phase = "Degraded"
    else:
        phase = "Ready" if moving is None else ("Pending" if ready == 0 else "Progressing")
    usage = seen.usage
    return KVCacheClusterStatus(
        phase=phase,
        conditions=conditions,
        observed_generation=seen.generation if seen.rendered else None,
        ready_nodes=ready,
        ready=f"{ready}/{desired}",
        capacity=None if usage is None else byte_text(sum(n.budget_bytes for n in usage)),
        used=None if usage is None else byte_text(sum(n.used_bytes for n in usage)),
        hit_rate=None if usage is None else hit_rate_text(usage),
        engines=seen.engines,
        selector=ref.node_selector_text(),
    )


def invalid_status(
    error: str, generation: int | None, previous: Sequence[Mapping[str, Any]], now: str
) -> KVCacheClusterStatus:
    """A spec the operator cannot render: Degraded, and the children left as they were."""
    reason = ("False", INVALID_SPEC, error)
    return KVCacheClusterStatus(
        phase="Degraded",
        conditions=(
            _condition("Ready", reason, generation, previous, now),
            _condition("Progressing", reason, generation, previous, now),
            _condition("Degraded", ("True", INVALID_SPEC, error), generation, previous, now),
        ),
        observed_generation=generation,
    )


def standing_problem(previous: Sequence[Mapping[str, Any]]) -> Problem | None:
    """The problem the last apply reported, from the status it wrote: a look that applies
    nothing (the nodes' readiness changed) keeps it until the next apply says otherwise."""
    degraded = next((c for c in previous if c.get("type") == "Degraded"), {})
    if degraded.get("status") != "True" or degraded.get("reason") in (None, INVALID_SPEC):
        return None
    return Problem(degraded["reason"], degraded.get("message", ""))


def byte_text(count: int) -> str:
    """Bytes in the largest binary unit that keeps a whole part, one decimal: 41.5Gi."""
    value, unit = float(count), ""
    for larger in _UNITS:
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{value:.1f}".removesuffix(".0") + unit


def hit_rate_text(usage: Sequence[NodeUsage]) -> str | None:
    """GET keys found over keys asked, over all nodes; None before the first GET."""
    hits = sum(node.hits for node in usage)
    asked = hits + sum(node.misses for node in usage)
    return None if asked == 0 else f"{100 * hits / asked:.1f}%"


def _condition(
    kind: str,
    state: tuple[str, str, str],
    generation: int | None,
    previous: Sequence[Mapping[str, Any]],
    now: str,
) -> Condition:
    status, reason, message = state
    before = next((c for c in previous if c.get("type") == kind), None)
    since = before.get("lastTransitionTime") if before and before.get("status") == status else None
    return Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since or now,
        observed_generation=generation,
    )
