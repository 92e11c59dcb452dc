"""A StatefulSet change an update cannot make is found from its apply patch, and a new disk size
plans the claims: grow the smaller ones, and refuse to shrink, naming the claims."""

from __future__ import annotations

import pytest

from kvcache.operator.names import ClusterRef
from kvcache.operator.render import node_statefulset
from kvcache.operator.spec import KVCacheClusterSpec
from kvcache.operator.volumes import ClaimResize, needs_replacing, refused_problem, resize_plan

REF = ClusterRef("ml", "demo")


def nodes(disk):
    return node_statefulset(KVCacheClusterSpec.from_dict({"disk": disk}), REF, "kvcache:test")


def claim(name, size):
    return {"metadata": {"name": name}, "spec": {"resources": {"requests": {"storage": size}}}}


@pytest.mark.parametrize(
    ("change", "replace"),
    [
        ({"spec": {"replicas": 4}}, False),
        ({"spec": {"template": {"spec": {}}}, "metadata": {"labels": {}}}, False),
        ({"metadata": {"annotations": {"kvcache.io/applied": "{}"}}}, False),
        ({"spec": {"volumeClaimTemplates": []}}, True),
        ({"spec": {"replicas": 4, "serviceName": "other"}}, True),
    ],
)
def test_only_changes_an_update_cannot_make_replace_the_statefulset(change, replace):
    assert needs_replacing(change) == replace


def test_a_larger_disk_grows_the_statefulsets_claims_and_only_those():
    claims = [
        claim(f"disk-{REF.nodes}-0", "10Gi"),
        claim(f"disk-{REF.nodes}-1", "10Gi"),
        claim(f"disk-{REF.nodes}-2", "20Gi"),  # grown before
        claim(f"disk-{REF.nodes}-backup", "10Gi"),  # no ordinal: not the controller's
        claim("disk-other-node-0", "10Gi"),
    ]
    plan = resize_plan(nodes("20480Mi"), claims)
    assert plan.grow == (
        ClaimResize(f"disk-{REF.nodes}-0", "20Gi"),
        ClaimResize(f"disk-{REF.nodes}-1", "20Gi"),
    )
    assert plan.shrink == ()
    assert plan.grow[0].patch() == {"spec": {"resources": {"requests": {"storage": "20Gi"}}}}


def test_a_smaller_disk_is_refused_naming_the_claims_it_would_shrink():
    plan = resize_plan(nodes("5Gi"), [claim(f"disk-{REF.nodes}-0", "10Gi")])
    assert plan.grow == () and plan.shrink == ((f"disk-{REF.nodes}-0", "10Gi"),)
    problem = plan.shrink_problem(REF.nodes)
    assert problem.reason == "DiskCannotShrink"
    assert f"disk-{REF.nodes}-0 (10Gi)" in problem.message and "spec.disk" in problem.message


def test_claims_of_a_disk_tier_turned_off_are_left_alone():
    plan = resize_plan(nodes("0"), [claim(f"disk-{REF.nodes}-0", "10Gi")])
    assert plan.grow == () and plan.shrink == ()


def test_a_refused_resize_says_which_claim_and_why():
    resize = ClaimResize(f"disk-{REF.nodes}-1", "20Gi")
    problem = refused_problem(resize, REF.nodes, "the storageclass must support resize")
    assert problem.reason == "DiskResizeRefused"
    assert all(
        text in problem.message
        for text in (resize.name, "20Gi", "must support resize", "allowVolumeExpansion")
    )
