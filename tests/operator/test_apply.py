"""Idempotent apply: a rendered child the server has filled with defaults needs no patch; a
change patches that change alone; a field no longer rendered is removed; drift is undone."""

from __future__ import annotations

import copy
import json

from json_merge_patch import apply_merge_patch

from kvcache.operator.apply import APPLIED_ANNOTATION, apply_patch, covers, stamped
from kvcache.operator.names import ClusterRef
from kvcache.operator.render import node_statefulset
from kvcache.operator.spec import KVCacheClusterSpec

REF = ClusterRef("ml", "demo")


def statefulset(**spec):
    return stamped(node_statefulset(KVCacheClusterSpec.from_dict(spec), REF, "kvcache:1"))


def as_served(manifest):
    """What the API server stores: identity, and defaults inside maps and list items."""
    live = copy.deepcopy(manifest)
    live["metadata"] |= {"uid": "u-1", "resourceVersion": "7", "generation": 1}
    live["spec"] |= {"revisionHistoryLimit": 10, "updateStrategy": {"type": "RollingUpdate"}}
    pod = live["spec"]["template"]["spec"]
    pod |= {"restartPolicy": "Always", "dnsPolicy": "ClusterFirst"}
    for container in pod["containers"]:
        container |= {"terminationMessagePath": "/dev/termination-log", "imagePullPolicy": "Always"}
        for port in container["ports"]:
            port["protocol"] = "TCP"
    live["status"] = {"replicas": 3, "readyReplicas": 3}
    return live


def applied(live, desired):
    """The live object after the patch, as the API server merges it."""
    return apply_merge_patch(live, apply_patch(live, desired))


def test_a_child_as_the_server_filled_it_needs_no_patch():
    desired = statefulset()
    assert apply_patch(as_served(desired), desired) == {}


def test_a_changed_field_is_patched_alone_with_the_new_record():
    live = as_served(statefulset(nodes=3))
    desired = statefulset(nodes=4)
    patch = apply_patch(live, desired)
    record = desired["metadata"]["annotations"][APPLIED_ANNOTATION]
    assert patch == {
        "spec": {"replicas": 4},
        "metadata": {"annotations": {APPLIED_ANNOTATION: record}},
    }
    assert apply_patch(applied(live, desired), desired) == {}


def test_a_map_key_no_longer_rendered_is_removed_and_server_defaults_stay():
    live = as_served(statefulset(nodeSelector={"pool": "cache"}))
    desired = statefulset()
    after = applied(live, desired)
    assert "nodeSelector" not in after["spec"]["template"]["spec"]
    assert after["spec"]["template"]["spec"]["dnsPolicy"] == "ClusterFirst"
    assert after["spec"]["revisionHistoryLimit"] == 10


def test_a_field_dropped_inside_a_list_item_sends_the_list_whole():
    live = as_served(statefulset(security={"curveSecret": "curve"}))
    desired = statefulset()
    patch = apply_patch(live, desired)
    (container,) = patch["spec"]["template"]["spec"]["containers"]
    assert "envFrom" not in container
    assert covers(applied(live, desired), desired)


def test_drift_is_undone():
    desired = statefulset(nodes=3)
    live = as_served(desired)
    live["spec"]["replicas"] = 7  # edited by hand
    live["spec"]["template"]["spec"]["containers"][0]["image"] = "other:2"
    assert apply_patch(live, desired) == {
        "spec": {
            "replicas": 3,
            "template": {"spec": {"containers": desired["spec"]["template"]["spec"]["containers"]}},
        }
    }


def test_an_object_without_a_record_is_patched_by_coverage_only():
    """Created by hand or by an older operator: nothing can be known to be ours to remove."""
    desired = statefulset()
    live = as_served(desired)
    del live["metadata"]["annotations"]
    live["spec"]["template"]["spec"]["nodeSelector"] = {"pool": "mine"}
    patch = apply_patch(live, desired)
    assert patch == {"metadata": {"annotations": desired["metadata"]["annotations"]}}


def test_the_record_is_the_object_without_itself():
    desired = statefulset()
    record = json.loads(desired["metadata"]["annotations"][APPLIED_ANNOTATION])
    assert "annotations" not in record["metadata"]
    assert stamped(desired) == desired  # stamping twice stamps the same


def test_covers_wants_equal_list_lengths_and_values():
    assert covers({"a": [{"x": 1, "y": 2}], "b": 1}, {"a": [{"x": 1}]})
    assert not covers({"a": [{"x": 1}, {"x": 2}]}, {"a": [{"x": 1}]})
    assert not covers({"a": {"x": 1}}, {"a": {"x": 2}})
    assert not covers({}, {"a": None})
