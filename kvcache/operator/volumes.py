"""A StatefulSet change an update cannot make, and the claim resize it usually is: pure decisions.

Of a StatefulSet's spec only replicas, template, updateStrategy, minReadySeconds, ordinals and
persistentVolumeClaimRetentionPolicy may change. A new spec.disk changes the cache nodes'
volumeClaimTemplates, and the API server refuses (422) every update that does. So the operator
does what prometheus-operator and strimzi do: it grows each claim the StatefulSet controller made
from the template to the new size, then deletes the StatefulSet leaving its pods and claims
(propagationPolicy Orphan) and creates it from the new rendering; the new one adopts the pods by
their labels and rolls them to the new template.

Claims never shrink, and grow only where their storage class allows it. Then the StatefulSet
stays as it was, template included: its pods would otherwise get a disk budget their volumes do
not have. kvcache.operator.children makes the calls; this module only decides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvcache.core.config import parse_bytes
from kvcache.operator.observed import Problem

# What an update may change in a StatefulSet's spec (apps/v1 validation).
MUTABLE_SPEC = frozenset(
    {
        "replicas",
        "ordinals",
        "template",
        "updateStrategy",
        "persistentVolumeClaimRetentionPolicy",
        "minReadySeconds",
    }
)


def needs_replacing(change: Mapping[str, Any]) -> bool:
    """Whether a StatefulSet's apply patch (kvcache.operator.apply) changes a part of its spec
    that an update cannot."""
    return not MUTABLE_SPEC.issuperset(change.get("spec") or {})


@dataclass(frozen=True)
class ClaimResize:
    """One claim to grow to `size` (the template's request, canonical as the API stores it)."""

    name: str
    size: str

    def patch(self) -> dict[str, Any]:
        return {"spec": {"resources": {"requests": {"storage": self.size}}}}


@dataclass(frozen=True)
class ResizePlan:
    """The claims to grow, and those that hold more than their template now asks (with their
    size): a claim cannot shrink."""

    grow: tuple[ClaimResize, ...]
    shrink: tuple[tuple[str, str], ...]

    def shrink_problem(self, statefulset: str) -> Problem:
        held = ", ".join(f"{name} ({size})" for name, size in self.shrink)
        return Problem(
            "DiskCannotShrink",
            f"volumes cannot shrink: {held} hold more than spec.disk asks; StatefulSet "
            f"{statefulset} stays as it was until spec.disk is set back (a smaller disk tier "
            "needs the cluster created again)",
        )


def resize_plan(desired: Mapping[str, Any], claims: Sequence[Mapping[str, Any]]) -> ResizePlan:
    """What the claims of the StatefulSet `desired` need for its new templates. The controller
    names a claim <template>-<statefulset>-<ordinal>; claims of templates `desired` no longer
    has are left alone (nothing mounts them once the pods roll)."""
    name = desired["metadata"]["name"]
    sizes = {
        template["metadata"]["name"]: template["spec"]["resources"]["requests"]["storage"]
        for template in desired["spec"].get("volumeClaimTemplates", [])
    }
    grow: list[ClaimResize] = []
    shrink: list[tuple[str, str]] = []
    for claim in claims:
        claim_name = claim["metadata"]["name"]
        template = next((t for t in sizes if _made_from(claim_name, t, name)), None)
        if template is None:
            continue
        asked = parse_bytes(sizes[template])
        held = claim["spec"]["resources"]["requests"]["storage"]
        if asked > parse_bytes(held):
            grow.append(ClaimResize(claim_name, sizes[template]))
        elif asked < parse_bytes(held):
            shrink.append((claim_name, held))
    return ResizePlan(tuple(grow), tuple(shrink))


def _made_from(claim: str, template: str, statefulset: str) -> bool:
    prefix = f"{template}-{statefulset}-"
    return claim.startswith(prefix) and claim[len(prefix) :].isdigit()


def refused_problem(resize: ClaimResize, statefulset: str, why: str) -> Problem:
    return Problem(
        "DiskResizeRefused",
        f"persistentvolumeclaim {resize.name} cannot grow to {resize.size}: {why}; StatefulSet "
        f"{statefulset} stays as it was until its claims can grow (a storage class with "
        "allowVolumeExpansion) or spec.disk is set back",
    )
