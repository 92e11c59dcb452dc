"""Which patch an engine Deployment gets: it joins the cluster its annotation names while that
cluster exists and lets it, leaves otherwise, is left alone by a cluster with a broken spec, and
every patch is conditional on the version it was computed from."""

from __future__ import annotations

import copy

import pytest
from json_merge_patch import apply_merge_patch

from kvcache.operator.engines import EnginePatch, engine_patch, requested_cluster
from kvcache.operator.join import JoinError, engine_settings, join_engine
from kvcache.operator.names import (
    CLUSTER_ANNOTATION,
    JOINED_ANNOTATION,
    REFUSED_ANNOTATION,
    ClusterRef,
)
from kvcache.operator.spec import KVCacheClusterSpec

UID = "5d0c1f3e-8a1b-4c2d-9e3f-0a1b2c3d4e5f"


def cluster(namespace="ml", name="demo", **spec):
    return {"metadata": {"namespace": namespace, "name": name, "uid": UID}, "spec": spec}


def deployment(annotation=None, namespace="ml"):
    metadata = {"name": "vllm", "namespace": namespace, "resourceVersion": "42"}
    if annotation is not None:
        metadata["annotations"] = {CLUSTER_ANNOTATION: annotation}
    container = {"name": "vllm", "image": "vllm/vllm-openai", "args": ["--model", "m"]}
    template = {"metadata": {"labels": {"app": "vllm"}}, "spec": {"containers": [container]}}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata,
        "spec": {"template": template},
    }


def joined(engine, owner):
    settings = engine_settings(
        KVCacheClusterSpec.from_dict(owner["spec"]),
        ClusterRef(owner["metadata"]["namespace"], owner["metadata"]["name"]),
        UID,
        engine["metadata"]["namespace"],
    )
    return apply_merge_patch(engine, join_engine(engine, settings))


def test_an_annotated_engine_joins_the_cluster_it_names():
    engine = deployment("demo")
    result = engine_patch(engine, cluster())
    assert result.problem is None
    assert result.patch["metadata"]["resourceVersion"] == "42"  # valid for this version only
    assert apply_merge_patch(engine, result.patch) == joined(engine, cluster())


def test_a_joined_engine_gets_no_patch_until_something_changes():
    engine = joined(deployment("demo"), cluster())
    assert engine_patch(engine, cluster()) == EnginePatch()
    rejoin = engine_patch(engine, cluster(codec="none")).patch
    assert apply_merge_patch(engine, rejoin) == joined(deployment("demo"), cluster(codec="none"))


@pytest.mark.parametrize(
    "gone",
    [
        None,
        cluster()
        | {"metadata": cluster()["metadata"] | {"deletionTimestamp": "2026-01-01T00:00:00Z"}},
    ],
    ids=["no cluster", "cluster being deleted"],
)
def test_an_engine_leaves_a_cluster_that_is_gone_and_is_restored(gone):
    engine = joined(deployment("demo"), cluster())
    result = engine_patch(engine, gone)
    assert apply_merge_patch(engine, result.patch) == deployment("demo")


def test_removing_the_annotation_restores_the_engine_exactly():
    engine = joined(deployment("demo"), cluster())
    del engine["metadata"]["annotations"][CLUSTER_ANNOTATION]
    restored = apply_merge_patch(engine, engine_patch(engine, None).patch)
    assert restored == deployment()


def test_a_cluster_the_annotation_no_longer_names_changes_nothing():
    engine = joined(deployment("demo"), cluster())
    engine["metadata"]["annotations"][CLUSTER_ANNOTATION] = "other"
    assert engine_patch(engine, cluster()) == EnginePatch()


def test_a_namespace_not_allowed_is_refused_and_leaves():
    engine = joined(
        deployment("ml/demo", namespace="team-c"), cluster(allowedNamespaces=["team-c"])
    )
    result = engine_patch(engine, cluster())  # team-c no longer allowed
    assert "may not join" in result.problem
    assert (
        JOINED_ANNOTATION not in apply_merge_patch(engine, result.patch)["metadata"]["annotations"]
    )


def test_a_cluster_with_an_invalid_spec_leaves_its_engines_as_they_are():
    engine = joined(deployment("demo"), cluster())
    result = engine_patch(engine, cluster(nodes=0))
    assert "invalid spec" in result.problem and "spec.nodes" in result.problem
    assert apply_merge_patch(engine, result.patch) == recorded(engine, result.problem)


def test_an_annotation_naming_no_valid_cluster_is_refused():
    engine = deployment("Not A Name")
    with pytest.raises(JoinError):
        requested_cluster(engine)
    result = engine_patch(engine, None)
    assert CLUSTER_ANNOTATION in result.problem
    assert apply_merge_patch(engine, result.patch) == recorded(engine, result.problem)


def recorded(engine, problem):
    """`engine` carrying the record of a refusal."""
    engine = copy.deepcopy(engine)
    engine["metadata"]["annotations"][REFUSED_ANNOTATION] = problem
    return engine


def test_a_refusal_is_announced_once_and_again_only_when_its_reason_changes():
    engine = deployment("ml/demo", namespace="team-c")
    first = engine_patch(engine, cluster())
    assert first.announce and "may not join" in first.problem
    engine = apply_merge_patch(engine, first.patch)
    assert engine_patch(engine, cluster()) == EnginePatch(problem=first.problem)  # quiet

    other = engine_patch(engine, cluster(nodes=0))  # a new reason: announced, recorded
    assert other.announce and "invalid spec" in other.problem
    assert apply_merge_patch(engine, other.patch) == recorded(engine, other.problem)


def test_the_record_of_a_refusal_goes_once_the_engine_joins_or_stops_asking():
    refused = apply_merge_patch(
        deployment("ml/demo", namespace="team-c"),
        engine_patch(deployment("ml/demo", namespace="team-c"), cluster()).patch,
    )
    allowed = cluster(allowedNamespaces=["team-c"])
    result = engine_patch(refused, allowed)
    assert not result.announce and result.problem is None
    assert apply_merge_patch(refused, result.patch) == joined(
        deployment("ml/demo", namespace="team-c"), allowed
    )

    del refused["metadata"]["annotations"][CLUSTER_ANNOTATION]
    restored = apply_merge_patch(refused, engine_patch(refused, None).patch)
    assert restored == deployment(namespace="team-c")


def test_the_annotation_may_name_a_cluster_in_another_namespace():
    assert requested_cluster(deployment("ml/demo", namespace="team-c")) == ClusterRef("ml", "demo")
    assert requested_cluster(deployment("demo", namespace="team-c")) == ClusterRef("team-c", "demo")
    assert requested_cluster(deployment()) is None


def test_the_patch_does_not_change_the_deployment_it_was_computed_from():
    engine = deployment("demo")
    before = copy.deepcopy(engine)
    engine_patch(engine, cluster())
    assert engine == before


def test_engines_of_a_cluster_with_a_curve_secret_join_with_references_and_leave_exactly():
    curve = cluster(allowedNamespaces=["team-c"], security={"curveSecret": "demo-curve"})
    for engine in (deployment("demo"), deployment("ml/demo", namespace="team-c")):
        result = engine_patch(engine, curve)
        after_join = apply_merge_patch(engine, result.patch)
        assert result.problem is None and after_join == joined(engine, curve)
        (container,) = after_join["spec"]["template"]["spec"]["containers"]
        references = [e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e]
        assert [reference["name"] for reference in references] == ["demo-curve"] * 3
        assert engine_patch(after_join, curve) == EnginePatch()  # joined as it should be

        left = apply_merge_patch(after_join, engine_patch(after_join, None).patch)
        assert left == engine
