"""What the operator observed about a KVCacheCluster: its status, as frozen dataclasses.

The CRD's status schema is generated from these classes, and the operator writes status as
`schema.to_dict(KVCacheClusterStatus(...))`, so `kubectl get kvcache` (whose columns read these
fields) and the handlers agree on every name. Conditions follow the Kubernetes API conventions.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvcache.operator.schema import Pattern, spec_field

PHASES = ("Pending", "Progressing", "Ready", "Degraded")
CONDITION_TYPES = ("Ready", "Progressing", "Degraded")
REASON = Pattern(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", "a CamelCase reason")


@dataclass(frozen=True)
class Condition:
    type: str = spec_field("Ready, Progressing or Degraded.", enum=CONDITION_TYPES)
    status: str = spec_field("True, False or Unknown.", enum=("True", "False", "Unknown"))
    reason: str = spec_field("Why, in one CamelCase word.", pattern=REASON)
    last_transition_time: str = spec_field(
        "When status last changed (RFC 3339).", format="date-time"
    )
    message: str = spec_field("Why, for a human.", "")
    observed_generation: int | None = spec_field(
        "The metadata.generation this condition was computed from.", None, minimum=0
    )


@dataclass(frozen=True)
class KVCacheClusterStatus:
    phase: str | None = spec_field("Pending, Progressing, Ready or Degraded.", None, enum=PHASES)
    conditions: tuple[Condition, ...] = spec_field(
        "Ready, Progressing and Degraded.", default_factory=tuple, list_map_keys=("type",)
    )
    observed_generation: int | None = spec_field(
        "The metadata.generation the children were last rendered from.", None, minimum=0
    )
    ready_nodes: int | None = spec_field(
        "Cache nodes ready (the scale subresource's status replicas).", None, minimum=0
    )
    ready: str | None = spec_field("Ready and desired cache nodes, e.g. 3/3.", None)
    capacity: str | None = spec_field("Memory and disk budget of the ready nodes, e.g. 96Gi.", None)
    used: str | None = spec_field("Bytes held by the ready nodes, e.g. 41.5Gi.", None)
    hit_rate: str | None = spec_field("GET keys found over keys asked, e.g. 87.5%.", None)
    engines: int | None = spec_field("Engine Deployments joined to this cluster.", None, minimum=0)
    selector: str | None = spec_field(
        "Label selector of the cache node pods (the scale subresource's selector).", None
    )
    node_image: str | None = spec_field(
        "The image the cache nodes run: the operator's when the cluster was made, then "
        "spec.image whenever that is set. Upgrading the operator leaves it, and the nodes with "
        "their memory tiers, as they are; set spec.image to move the nodes.",
        None,
    )
