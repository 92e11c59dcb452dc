"""One key contract for the operator, the connector and the router, each built from its real code.

The operator joins a vLLM Deployment (`join_engine`); its pod, as Kubernetes would make it from the
patched template, is read by the router's discovery (the tenant salt) and started as vLLM would
start it: the container's own arguments through vLLM's own argument parser into its engine
config, and the container's env into the connector's settings. The connector's namespace info is
rendered by prometheus_client as the engine's /metrics would serve it and parsed by the router's
scraper. The router must then ask the cluster for exactly the keys the connector stores under.
"""

from __future__ import annotations

import pytest
from json_merge_patch import apply_merge_patch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from transformers import LlamaConfig
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from kvcache.connector.vllm import KVCacheConnector, NamespaceInfo
from kvcache.core.keys import chunk_keys
from kvcache.operator.join import engine_settings, join_engine
from kvcache.operator.names import CLUSTER_ANNOTATION, ClusterRef
from kvcache.operator.spec import KVCacheClusterSpec
from kvcache.router.discovery import engines_of
from kvcache.router.engines import Engine, EnginePool, parse_metrics
from kvcache.router.policy import engine_lookup

REF = ClusterRef("llm", "prod")
UID = "0b6a6c1e-3f2d-4c49-9d8e-2f5b1c7a9e10"
TOKENS = list(range(3, 3 + 2 * 256 + 40))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-config")
    LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=4096,
    ).save_pretrained(path)  # fmt: skip
    return path


def joined_pod(spec: KVCacheClusterSpec, namespace: str, model_dir) -> dict:
    """The pod Kubernetes makes from the joined Deployment's template (ready, with an IP)."""
    args = [
        "--model", str(model_dir), "--served-model-name", "smol", "smol-alias",
        "--dtype", "float32", "--max-model-len", "2048", "--skip-tokenizer-init",
    ]  # fmt: skip
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "vllm",
            "namespace": namespace,
            "annotations": {CLUSTER_ANNOTATION: "llm/prod"},
        },  # fmt: skip
        "spec": {
            "selector": {"matchLabels": {"app": "vllm"}},
            "template": {
                "metadata": {"labels": {"app": "vllm"}},
                "spec": {
                    "containers": [{"name": "vllm", "image": "vllm/vllm-openai", "args": args}]
                },  # fmt: skip
            },
        },
    }
    settings = engine_settings(spec, REF, UID, namespace)
    template = apply_merge_patch(deployment, join_engine(deployment, settings))["spec"]["template"]
    metadata = {**template["metadata"], "name": "vllm-0", "namespace": namespace}
    status = {"podIP": "10.0.0.7", "conditions": [{"type": "Ready", "status": "True"}]}
    return {"metadata": metadata, "spec": template["spec"], "status": status}


def started_as_vllm(pod: dict, monkeypatch):
    """The pod's vLLM container's engine config, parsed from its args by vLLM itself, and its
    env as the connector reads it (plain values; a Secret's references are not resolved here)."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    (container,) = pod["spec"]["containers"]
    for entry in container.get("env", []):
        if "value" in entry:
            monkeypatch.setenv(entry["name"], entry["value"])
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(container["args"])
    return EngineArgs.from_cli_args(args).create_engine_config()


def published_metrics(config) -> str:
    """The connector's namespace info as the engine's /metrics serves it."""
    registry = CollectorRegistry()

    class RegistryGauge(Gauge):
        def __init__(self, *args, **kwargs):
            kwargs.pop("multiprocess_mode", None)
            super().__init__(*args, registry=registry, **kwargs)

    types = {Gauge: RegistryGauge, Counter: Counter, Histogram: Histogram}
    NamespaceInfo(config, types, ["model_name", "engine"], {0: ["smol", "0"]})
    return generate_latest(registry).decode()


def both_sides(spec, namespace, model_dir, monkeypatch):
    """(keys the connector stores under, keys the router asks the cluster for)."""
    pod = joined_pod(spec, namespace, model_dir)
    config = started_as_vllm(pod, monkeypatch)
    connector = KVCacheConnector(config, KVConnectorRole.SCHEDULER)
    try:
        stored = connector.connector.keys(TOKENS)
    finally:
        connector.shutdown()
    (discovered,) = engines_of(pod)
    engine = Engine(discovered.name, discovered.url, tenant_salt=discovered.tenant_salt)
    EnginePool._learn_keys(engine, parse_metrics(published_metrics(config)).key_labels)
    lookup = engine_lookup(engine, {"model": "smol", "prompt": TOKENS})
    return stored, chunk_keys(TOKENS, lookup.namespace, lookup.chunk_tokens)


def test_the_router_asks_for_exactly_the_keys_a_joined_engine_stores_under(model_dir, monkeypatch):
    stored, asked = both_sides(KVCacheClusterSpec.from_dict({}), "llm", model_dir, monkeypatch)
    assert len(stored) == 2 and asked == stored


def test_engines_of_two_namespaces_are_kept_apart_unless_isolation_is_off(model_dir, monkeypatch):
    spec = {"allowedNamespaces": ["team-b"]}
    isolated = KVCacheClusterSpec.from_dict(spec)
    own, _ = both_sides(isolated, "llm", model_dir, monkeypatch)
    other, asked_other = both_sides(isolated, "team-b", model_dir, monkeypatch)
    assert asked_other == other and not set(own) & set(other)
    shared = KVCacheClusterSpec.from_dict({**spec, "isolation": "None"})
    monkeypatch.delenv("KVCACHE_TENANT_SALT")
    own_shared, _ = both_sides(shared, "llm", model_dir, monkeypatch)
    other_shared, asked_shared = both_sides(shared, "team-b", model_dir, monkeypatch)
    assert own_shared == other_shared == asked_shared
