"""The KVCacheCluster spec model: defaults, parsing from a resource's dict, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvcache.operator.schema import SpecError, to_dict
from kvcache.operator.spec import CODECS, EtcdSpec, KVCacheClusterSpec, RouterSpec
from kvcache.operator.status import Condition, KVCacheClusterStatus

FULL_SPEC = {
    "nodes": 4,
    "memory": "64Gi",
    "disk": "500Gi",
    "storageClassName": "fast-ssd",
    "eviction": "lru",
    "chunkTokens": 512,
    "replication": 2,
    "codec": "cachegen",
    "isolation": "None",
    "allowedNamespaces": ["team-a", "team-b"],
    "image": "registry.example/kvcache:1.0",
    "resources": {"requests": {"cpu": "2", "memory": "70Gi"}},
    "nodeSelector": {"node.kubernetes.io/instance-type": "r7i.4xlarge"},
    "tolerations": [{"key": "cache", "operator": "Exists", "effect": "NoSchedule"}],
    "topologySpreadConstraints": [
        {
            "maxSkew": 1,
            "topologyKey": "topology.kubernetes.io/zone",
            "whenUnsatisfiable": "DoNotSchedule",
        }
    ],
    "security": {"curveSecret": "kvcache-curve", "atRestSecret": "kvcache-disk-key"},
    "router": {"replicas": 2, "blockSize": 128, "tokenizer": "HuggingFaceTB/SmolLM2-135M"},
    "etcd": {"managed": False, "endpoint": "etcd.infra.svc:2379"},
}


def test_an_empty_spec_takes_every_default():
    spec = KVCacheClusterSpec.from_dict({})
    assert spec == KVCacheClusterSpec()
    assert KVCacheClusterSpec.from_dict(None) == spec
    assert (spec.nodes, spec.memory_bytes, spec.disk_bytes) == (3, 4 << 30, 0)
    assert (spec.codec, spec.replication, spec.chunk_tokens) == ("int8", 1, 256)
    assert spec.router == RouterSpec() and spec.etcd == EtcdSpec()
    assert spec.etcd.managed and spec.router.enabled


def test_every_field_parses_from_camel_case():
    spec = KVCacheClusterSpec.from_dict(FULL_SPEC)
    assert spec.storage_class_name == "fast-ssd"
    assert spec.chunk_tokens == 512 and spec.replication == 2 and spec.codec == "cachegen"
    assert spec.allowed_namespaces == ("team-a", "team-b")
    assert spec.tolerations[0]["key"] == "cache"
    assert spec.security.curve_secret == "kvcache-curve"
    assert spec.router.block_size == 128 and spec.router.replicas == 2
    assert spec.etcd.endpoint == "etcd.infra.svc:2379"
    assert spec.disk_bytes == 500 << 30


def test_serializing_and_parsing_again_gives_the_same_spec():
    spec = KVCacheClusterSpec.from_dict(FULL_SPEC)
    assert KVCacheClusterSpec.from_dict(to_dict(spec)) == spec
    assert to_dict(spec)["topologySpreadConstraints"] == FULL_SPEC["topologySpreadConstraints"]


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ({"memory": "-1Gi"}, "spec.memory: '-1Gi' is not a byte quantity above zero"),
        ({"memory": "0"}, "spec.memory: '0' is not a byte quantity above zero"),
        ({"disk": "-100Gi"}, "spec.disk: '-100Gi' is not a byte quantity such as 0, 512Mi"),
        ({"disk": "100GB"}, "spec.disk: '100GB' is not a byte quantity"),
        ({"nodes": -1}, "spec.nodes: must be at least 1, got -1"),
        ({"nodes": True}, "spec.nodes: must be an integer, got bool True"),
        ({"chunkTokens": 0}, "spec.chunkTokens: must be at least 1, got 0"),
        ({"codec": "zstd"}, "spec.codec: 'zstd' is not one of cachegen, int8, none"),
        ({"eviction": "random"}, "spec.eviction: 'random' is not one of prefix, lru"),
        (
            {"allowedNamespaces": ["Team_A"]},
            "spec.allowedNamespaces[0]: 'Team_A' is not a namespace",
        ),
        ({"router": {"replicas": 0}}, "spec.router.replicas: must be at least 1, got 0"),
        (
            {"router": {"prefillSecondsPerToken": "fast"}},
            "spec.router.prefillSecondsPerToken: must be a number, got str 'fast'",
        ),
        (
            {"router": {"loadSecondsPerToken": -1}},
            "spec.router.loadSecondsPerToken: must be at least 0, got -1.0",
        ),
        ({"router": []}, "spec.router: must be an object, got list []"),
        ({"nodeSelector": {"zone": 1}}, "spec.nodeSelector: every value must be a string"),
        (
            {"etcd": {"managed": False, "endpoint": "etcd"}},
            "spec.etcd.endpoint: 'etcd' is not host:port",
        ),
        ({"replicas": 3}, "spec: unknown field 'replicas' (known: nodes, memory,"),
    ],
)
def test_a_bad_field_is_named_with_what_is_wrong(spec, problem):
    with pytest.raises(SpecError) as caught:
        KVCacheClusterSpec.from_dict(spec)
    assert len(caught.value.problems) == 1
    assert caught.value.problems[0].startswith(problem)


def test_every_bad_field_is_reported_at_once():
    with pytest.raises(SpecError) as caught:
        KVCacheClusterSpec.from_dict({"memory": "-1Gi", "codec": "zstd", "nodes": 0})
    assert [problem.split(":")[0] for problem in caught.value.problems] == [
        "spec.nodes",
        "spec.memory",
        "spec.codec",
    ]


def test_replication_above_nodes_is_refused():
    KVCacheClusterSpec.from_dict({"nodes": 3, "replication": 3})
    with pytest.raises(SpecError, match="spec: replication must not exceed nodes"):
        KVCacheClusterSpec.from_dict({"nodes": 2, "replication": 3})


def test_an_external_etcd_needs_an_endpoint_and_a_managed_one_takes_none():
    with pytest.raises(SpecError, match="spec.etcd: endpoint is required when managed is false"):
        KVCacheClusterSpec.from_dict({"etcd": {"managed": False}})
    with pytest.raises(SpecError, match="spec.etcd: endpoint is only for an external etcd"):
        KVCacheClusterSpec.from_dict({"etcd": {"endpoint": "etcd:2379"}})


def test_the_codecs_are_the_codec_registry():
    kernels = pytest.importorskip("kvcache.kernels")  # torch: not in the operator's image
    assert list(CODECS) == kernels.codec_names()


def test_status_serializes_in_camel_case_without_unset_fields():
    condition = Condition(
        type="Ready",
        status="True",
        reason="NodesReady",
        last_transition_time="2026-01-01T00:00:00Z",
        observed_generation=3,
    )
    status = KVCacheClusterStatus(
        phase="Ready", conditions=(condition,), ready_nodes=3, ready="3/3"
    )
    assert to_dict(status) == {
        "phase": "Ready",
        "conditions": [
            {
                "type": "Ready",
                "status": "True",
                "reason": "NodesReady",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
                "message": "",
                "observedGeneration": 3,
            }
        ],
        "readyNodes": 3,
        "ready": "3/3",
    }


def test_the_operator_imports_only_kvcache_core():
    """DESIGN's arrows: the operator's image has no torch, no ZeroMQ node or client code."""
    code = (
        "import json, sys, kvcache.operator.crd, kvcache.operator.join, kvcache.operator.render\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    loaded = json.loads(result.stdout)
    ours = {".".join(name.split(".")[:2]) for name in loaded if name.startswith("kvcache.")}
    assert ours <= {"kvcache.core", "kvcache.operator"}
    assert not {name.split(".")[0] for name in loaded} & {"torch", "zmq", "aetcd", "fastapi"}
