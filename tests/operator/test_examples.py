"""The example KVCacheCluster the README applies is valid: for the CRD's schema, and for the
operator's own parser (which also runs the rules the API server runs as CEL)."""

from __future__ import annotations

from pathlib import Path

import yaml
from kube_schemas import custom_resource_errors, custom_resource_schema

from kvcache.operator.crd import API_VERSION, KIND, VERSION, custom_resource_definition
from kvcache.operator.spec import KVCacheClusterSpec

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "kvcachecluster.yaml"


def test_the_example_cluster_is_valid():
    resource = yaml.safe_load(EXAMPLE.read_text())
    assert (resource["apiVersion"], resource["kind"]) == (API_VERSION, KIND)
    schema = custom_resource_schema(custom_resource_definition(), VERSION)
    assert custom_resource_errors(schema, resource) == []
    spec = KVCacheClusterSpec.from_dict(resource["spec"])
    assert (spec.nodes, spec.memory, spec.disk) == (3, "8Gi", "50Gi")
