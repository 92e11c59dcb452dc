"""The KVCacheCluster CRD: generated from the model, a valid CRD, and a schema that refuses bad
specs with the field's name, defaults as the model does, and keeps its CEL rules' intent."""

from __future__ import annotations

from pathlib import Path

import pytest
from kube_schemas import (
    custom_resource_errors,
    custom_resource_schema,
    validate_builtin,
    with_defaults,
)

from kvcache.operator.crd import (
    API_VERSION,
    KIND,
    PRINTER_COLUMNS,
    VERSION,
    crd_yaml,
    custom_resource_definition,
)
from kvcache.operator.schema import SpecError, to_dict
from kvcache.operator.spec import EtcdSpec, KVCacheClusterSpec
from kvcache.operator.status import Condition, KVCacheClusterStatus

ROOT = Path(__file__).resolve().parents[2]
CRD_FILES = [
    ROOT / "crds" / "kvcache.io_kvcacheclusters.yaml",
    ROOT / "charts" / "kvcache" / "crds" / "kvcache.io_kvcacheclusters.yaml",
]
REGENERATE = (
    "regenerate: python -m kvcache.operator.crd > crds/kvcache.io_kvcacheclusters.yaml && "
    "cp crds/kvcache.io_kvcacheclusters.yaml charts/kvcache/crds/"
)


@pytest.fixture(scope="module")
def schema():
    return custom_resource_schema(custom_resource_definition(), VERSION)


def resource(spec, name="prod"):
    return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize("path", CRD_FILES, ids=lambda path: str(path.relative_to(ROOT)))
def test_the_crd_files_are_generated_from_the_model(path):
    assert path.read_text() == crd_yaml(), REGENERATE


def test_the_crd_is_a_valid_custom_resource_definition():
    validate_builtin(custom_resource_definition())


def test_the_schema_is_structural(schema):
    """Every node has a type (or preserves unknown fields), as a structural schema must; every
    spec and status field has a description, for `kubectl explain`."""

    def visit(node, path):
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), path
        for name, child in node.get("properties", {}).items():
            if path.startswith(("spec", "status")):
                assert child.get("description"), f"{path}.{name} has no description"
            visit(child, f"{path}.{name}".lstrip("."))
        if isinstance(node.get("items"), dict):
            visit(node["items"], f"{path}[]")

    visit(schema, "")


def without_empty(value):
    """Empty lists and maps left out: the schema gives them no default (absent means empty)."""
    if isinstance(value, dict):
        return {key: without_empty(item) for key, item in value.items() if item not in ([], {})}
    return value


def test_the_schemas_defaults_are_the_models_defaults(schema):
    defaulted = with_defaults(schema, resource({}))
    assert without_empty(defaulted["spec"]) == without_empty(to_dict(KVCacheClusterSpec()))
    assert KVCacheClusterSpec.from_dict(defaulted["spec"]) == KVCacheClusterSpec()
    partial = with_defaults(schema, resource({"router": {"replicas": 2}, "etcd": {}}))
    assert partial["spec"]["router"] == {
        "enabled": True, "replicas": 2, "blockSize": 16, "historyTtlSeconds": 300,
        "speculativeTtlSeconds": 5, "indexCapacityBlocks": 65536, "minMatchTokens": 768,
        "prefillSecondsPerToken": 4e-4, "loadSecondsPerToken": 4e-5,
        "firstByteTimeoutSeconds": 600, "idleTimeoutSeconds": 120,
    }  # fmt: skip
    assert partial["spec"]["etcd"] == to_dict(EtcdSpec())


def test_good_resources_validate(schema):
    assert custom_resource_errors(schema, with_defaults(schema, resource({}))) == []
    full = {
        "nodes": 4,
        "memory": "0.5Gi",
        "disk": "1Ti",
        "codec": "none",
        "allowedNamespaces": ["team-a"],
        "tolerations": [{"key": "cache", "operator": "Exists"}],
        "resources": {"limits": {"memory": "2Gi", "cpu": 2}},
        "etcd": {"managed": False, "endpoint": "10.0.0.1:2379"},
        "router": {"enabled": False},
    }
    assert custom_resource_errors(schema, resource(full)) == []


@pytest.mark.parametrize(
    ("spec", "path", "words"),
    [
        ({"memory": "-1Gi"}, "spec.memory", "does not match"),
        ({"memory": "0"}, "spec.memory", "does not match"),
        ({"disk": "-5Gi"}, "spec.disk", "does not match"),
        ({"nodes": -1}, "spec.nodes", "less than the minimum of 1"),
        ({"replication": 0}, "spec.replication", "less than the minimum of 1"),
        ({"chunkTokens": 0}, "spec.chunkTokens", "less than the minimum of 1"),
        ({"codec": "zstd"}, "spec.codec", "is not one of ['cachegen', 'int8', 'none']"),
        ({"eviction": "fifo"}, "spec.eviction", "is not one of ['prefix', 'lru']"),
        ({"allowedNamespaces": ["A B"]}, "spec.allowedNamespaces.0", "does not match"),
        ({"router": {"replicas": "2"}}, "spec.router.replicas", "is not of type 'integer'"),
        ({"nodeCount": 3}, "spec", "'nodeCount' was unexpected"),
    ],
)
def test_the_schema_refuses_a_bad_spec_naming_the_field(schema, spec, path, words):
    errors = custom_resource_errors(schema, resource(spec))
    assert len(errors) == 1 and errors[0].startswith(f"{path}: ") and words in errors[0], errors


@pytest.mark.parametrize(
    ("name", "words"), [("x" * 41, "is too long"), ("3fs", "does not match"), ("Prod", "match")]
)
def test_the_schema_refuses_names_too_long_or_odd_for_the_childrens_names(schema, name, words):
    errors = custom_resource_errors(schema, resource({}, name=name))
    assert len(errors) == 1 and errors[0].startswith("metadata.name: ") and words in errors[0]


@pytest.mark.parametrize(
    ("model", "location"), [(KVCacheClusterSpec, ("spec",)), (EtcdSpec, ("spec", "etcd"))]
)
def test_the_cel_rules_are_the_models_rules(schema, model, location):
    node = schema
    for name in location:
        node = node["properties"][name]
    assert node["x-kubernetes-validations"] == [
        {"rule": rule.cel, "message": rule.message} for rule in model.RULES
    ]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"nodes": 2, "replication": 3}, "spec: replication must not exceed nodes"),
        ({"etcd": {"managed": False}}, "spec.etcd: endpoint is required when managed is false"),
        ({"etcd": {"endpoint": "etcd:2379"}}, "spec.etcd: endpoint is only for an external etcd"),
    ],
)
def test_what_only_cel_catches_is_refused_by_the_models_rule(schema, spec, message):
    # CEL itself runs only in the API server (nothing here evaluates it): the JSON schema lets
    # these through, and the model's Python rule, whose message the CEL rule carries, refuses
    # them.
    assert custom_resource_errors(schema, with_defaults(schema, resource(spec))) == []
    with pytest.raises(SpecError) as caught:
        KVCacheClusterSpec.from_dict(spec)
    assert caught.value.problems[0].startswith(message)


def test_scale_subresource_and_printer_columns_point_at_real_fields(schema):
    (version,) = custom_resource_definition()["spec"]["versions"]

    def field(json_path):
        node = schema
        for name in json_path.lstrip(".").split("."):
            node = node["properties"][name] if name != "creationTimestamp" else {"type": "date"}
        return node

    scale = version["subresources"]["scale"]
    assert field(scale["specReplicasPath"]) == schema["properties"]["spec"]["properties"]["nodes"]
    assert field(scale["statusReplicasPath"])["type"] == "integer"
    assert field(scale["labelSelectorPath"])["type"] == "string"
    assert "status" in version["subresources"]
    for name, kind, path, _ in PRINTER_COLUMNS:
        assert field(path)["type"] == ("date" if kind == "date" else kind), name
    assert [column["name"] for column in version["additionalPrinterColumns"]] == [
        "Ready",
        "Capacity",
        "Used",
        "Hit rate",
        "Engines",
        "Phase",
        "Age",
    ]


def test_a_full_status_validates(schema):
    condition = Condition("Ready", "True", "NodesReady", "2026-01-01T00:00:00Z", "3 of 3", 2)
    status = KVCacheClusterStatus(
        phase="Ready",
        conditions=(condition,),
        observed_generation=2,
        ready_nodes=3,
        ready="3/3",
        capacity="192Gi",
        used="41.5Gi",
        hit_rate="87.5%",
        engines=4,
        selector="app.kubernetes.io/instance=prod",
    )
    assert custom_resource_errors(schema, {**resource({}), "status": to_dict(status)}) == []
    bad = {**to_dict(status), "phase": "Sleeping"}
    assert custom_resource_errors(schema, {**resource({}), "status": bad})[0].startswith(
        "status.phase: 'Sleeping' is not one of"
    )
