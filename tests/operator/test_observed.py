"""A cluster's status from what was observed: phase and conditions follow the nodes' readiness,
a condition's transition time moves only when its status does, the figures read as
`kubectl get kvcache` shows them, and every status the operator writes fits the CRD."""

from __future__ import annotations

import pytest
from kube_schemas import custom_resource_errors, custom_resource_schema

from kvcache.operator.crd import API_VERSION, KIND, VERSION, custom_resource_definition
from kvcache.operator.names import ClusterRef
from kvcache.operator.observed import (
    NodeUsage,
    Observation,
    Problem,
    byte_text,
    cluster_status,
    hit_rate_text,
    invalid_status,
    standing_problem,
)
from kvcache.operator.schema import to_dict
from kvcache.operator.spec import KVCacheClusterSpec

REF = ClusterRef("ml", "demo")
SPEC = KVCacheClusterSpec.from_dict({"nodes": 3})
T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"
GiB = 1 << 30


def seen(ready, current=None, **kwargs):
    statefulset = {
        "status": {"readyReplicas": ready, "replicas": ready if current is None else current}
    }
    return Observation.of_statefulset(4, statefulset, **kwargs)


def states(status):
    return {c.type: (c.status, c.reason) for c in status.conditions}


@pytest.mark.parametrize(
    ("ready", "current", "phase", "progressing"),
    [
        (0, 0, "Pending", ("True", "NodesStarting")),
        (2, 3, "Progressing", ("True", "NodesStarting")),
        (3, 3, "Ready", ("False", "AllNodesReady")),
        (3, 4, "Progressing", ("True", "NodesStopping")),  # scaled down, a node still stopping
    ],
)
def test_phase_and_conditions_follow_the_nodes(ready, current, phase, progressing):
    status = cluster_status(SPEC, REF, seen(ready, current), [], T0)
    assert status.phase == phase
    assert states(status)["Progressing"] == progressing
    assert states(status)["Ready"][0] == ("True" if phase == "Ready" else "False")
    assert states(status)["Degraded"] == ("False", "SpecValid")
    assert (status.ready, status.ready_nodes) == (f"{ready}/3", ready)
    assert status.selector == REF.node_selector_text()
    assert {c.observed_generation for c in status.conditions} == {4}


def test_a_rollout_is_progressing_while_every_node_stays_ready():
    rolling = {
        "status": {
            "replicas": 3,
            "readyReplicas": 3,
            "updatedReplicas": 1,
            "currentRevision": "demo-node-1",
            "updateRevision": "demo-node-2",
        }
    }
    status = cluster_status(SPEC, REF, Observation.of_statefulset(4, rolling), [], T0)
    assert status.phase == "Progressing"
    assert states(status)["Progressing"] == ("True", "NodesUpdating")
    assert status.conditions[1].message == "1 of 3 cache nodes updated"
    assert states(status)["Ready"] == ("True", "AllNodesReady")  # they all serve meanwhile
    done = {"status": rolling["status"] | {"currentRevision": "demo-node-2"}}
    assert cluster_status(SPEC, REF, Observation.of_statefulset(4, done), [], T0).phase == "Ready"


def test_a_spec_change_the_statefulset_controller_has_not_taken_is_progressing_not_ready():
    """Right after a change the StatefulSet's status still describes the template before
    (ready, no rollout): the phase must not say Ready until the controller observed it."""
    before = {
        "metadata": {"generation": 5},
        "status": {"observedGeneration": 4, "replicas": 3, "readyReplicas": 3},
    }
    status = cluster_status(SPEC, REF, Observation.of_statefulset(4, before), [], T0)
    assert status.phase == "Progressing"
    assert states(status)["Progressing"] == ("True", "NodesUpdating")
    taken = {**before, "status": before["status"] | {"observedGeneration": 5}}
    assert cluster_status(SPEC, REF, Observation.of_statefulset(4, taken), [], T0).phase == "Ready"


def test_nodes_without_their_etcd_are_not_ready():
    nodes = {"status": {"replicas": 3, "readyReplicas": 3}}
    starting = {"status": {"replicas": 1, "readyReplicas": 0}}
    for etcd, phase in ((starting, "Progressing"), (None, "Progressing"),
                        ({"status": {"readyReplicas": 1}}, "Ready")):  # fmt: skip
        seen = Observation.of_statefulset(4, nodes, etcd=etcd, etcd_managed=True)
        status = cluster_status(SPEC, REF, seen, [], T0)
        assert status.phase == phase
        if phase != "Ready":
            assert states(status)["Ready"] == ("False", "EtcdStarting")
    external = Observation.of_statefulset(4, nodes)  # an etcd the operator does not run
    assert cluster_status(SPEC, REF, external, [], T0).phase == "Ready"


DISK_PROBLEM = Problem("DiskResizeRefused", "persistentvolumeclaim disk-demo-node-0 cannot grow")


def test_a_problem_of_the_apply_is_degraded_and_a_look_that_applies_nothing_keeps_it():
    status = cluster_status(SPEC, REF, seen(3, problem=DISK_PROBLEM), [], T0)
    assert status.phase == "Degraded"
    assert states(status) == {
        "Ready": ("True", "AllNodesReady"),  # the nodes serve as they were
        "Progressing": ("False", "AllNodesReady"),
        "Degraded": ("True", "DiskResizeRefused"),
    }
    previous = to_dict(status)["conditions"]
    assert standing_problem(previous) == DISK_PROBLEM
    assert (
        standing_problem(to_dict(cluster_status(SPEC, REF, seen(3), [], T0))["conditions"]) is None
    )
    invalid = to_dict(invalid_status("spec.nodes: must be at least 1, got 0", 2, [], T0))
    assert standing_problem(invalid["conditions"]) is None  # reconcile's own, rewritten each time
    assert standing_problem([]) is None


def test_a_condition_keeps_its_transition_time_until_its_status_changes():
    before = to_dict(cluster_status(SPEC, REF, seen(1), [], T0))["conditions"]
    still = cluster_status(SPEC, REF, seen(2), before, T1)
    assert {c.last_transition_time for c in still.conditions} == {T0}
    ready = {
        c.type: c.last_transition_time
        for c in cluster_status(SPEC, REF, seen(3), before, T1).conditions
    }
    assert ready == {"Ready": T1, "Progressing": T1, "Degraded": T0}


def test_only_a_render_sets_observed_generation_and_only_the_timer_the_figures():
    assert cluster_status(SPEC, REF, seen(3), [], T0).observed_generation is None
    rendered = cluster_status(SPEC, REF, seen(3, rendered=True), [], T0)
    assert rendered.observed_generation == 4
    assert (rendered.capacity, rendered.used, rendered.hit_rate, rendered.engines) == (None,) * 4


def test_the_timers_figures_add_up_over_the_nodes():
    usage = (
        NodeUsage.from_stats(
            {"memory_budget_bytes": 4 * GiB, "memory_used_bytes": GiB, "hits": 9, "misses": 1}
        ),
        NodeUsage.from_stats(
            {
                "memory_budget_bytes": 4 * GiB,
                "disk_budget_bytes": 100 * GiB,
                "disk_used_bytes": GiB // 2,
            }
        ),
    )
    status = cluster_status(SPEC, REF, seen(3, usage=usage, engines=2), [], T0)
    assert (status.capacity, status.used, status.hit_rate, status.engines) == (
        "108Gi",
        "1.5Gi",
        "90.0%",
        2,
    )


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0"),
        (1023, "1023"),
        (1024, "1Ki"),
        (1536 << 20, "1.5Gi"),
        (96 * GiB, "96Gi"),
        (3 << 50, "3Pi"),
    ],
)
def test_bytes_read_in_binary_units(count, text):
    assert byte_text(count) == text


def test_no_hit_rate_before_the_first_get():
    assert hit_rate_text([NodeUsage(0, 0, 0, 0)]) is None
    assert hit_rate_text([NodeUsage(0, 0, 1, 2)]) == "33.3%"


@pytest.mark.parametrize(
    "stats", [[], {"hits": -1}, {"memory_used_bytes": "1Gi"}, {"misses": True}]
)
def test_stats_that_are_not_counts_are_refused(stats):
    with pytest.raises(ValueError):
        NodeUsage.from_stats(stats)


def test_an_invalid_spec_is_degraded():
    status = invalid_status("spec.nodes: must be at least 1, got 0", 2, [], T0)
    assert status.phase == "Degraded"
    assert states(status) == {
        "Ready": ("False", "InvalidSpec"),
        "Progressing": ("False", "InvalidSpec"),
        "Degraded": ("True", "InvalidSpec"),
    }
    assert status.conditions[2].message == "spec.nodes: must be at least 1, got 0"


@pytest.mark.parametrize(
    "status",
    [
        cluster_status(SPEC, REF, seen(3, usage=(NodeUsage(GiB, 1, 2, 3),), engines=1), [], T0),
        cluster_status(SPEC, REF, seen(0, rendered=True), [], T0),
        invalid_status("replication must not exceed nodes", 1, [], T0),
        cluster_status(SPEC, REF, seen(3, problem=DISK_PROBLEM), [], T0),
    ],
    ids=["figures", "rendered", "invalid", "problem"],
)
def test_every_status_written_fits_the_crd(status):
    schema = custom_resource_schema(custom_resource_definition(), VERSION)
    resource = {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": "demo"}, "spec": {}}
    assert custom_resource_errors(schema, resource | {"status": to_dict(status)}) == []
