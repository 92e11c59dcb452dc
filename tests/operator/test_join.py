"""Joining vLLM Deployments to a cluster and leaving it: the merge patches add the connector, the
KV events and the block-hash settings to the vLLM container, and leaving restores the Deployment
exactly, whatever form its command takes."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path

import pytest
from json_merge_patch import apply_merge_patch
from kube_schemas import validate_builtin

from kvcache.operator.join import (
    KV_EVENTS_CONFIG,
    KV_TRANSFER_CONFIG,
    JoinError,
    engine_flags,
    engine_settings,
    join_engine,
    tenant_salt,
    unjoin_engine,
)
from kvcache.operator.names import (
    CLUSTER_ANNOTATION,
    ENGINE_PORT_ANNOTATION,
    JOINED_ANNOTATION,
    ClusterRef,
)
from kvcache.operator.spec import KVCacheClusterSpec

REF = ClusterRef("llm", "prod")
UID = "0b6a6c1e-3f2d-4c49-9d8e-2f5b1c7a9e10"
SPEC = KVCacheClusterSpec.from_dict({"allowedNamespaces": ["team-a"]})
CURVE = KVCacheClusterSpec.from_dict(
    {"allowedNamespaces": ["team-a"], "security": {"curveSecret": "prod-curve"}}
)
SPECS = {"plain": SPEC, "curve": CURVE}
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def deployment(*containers, annotations=None, pod_annotations=None):
    pod_metadata = {"labels": {"app": "vllm"}}
    if pod_annotations is not None:
        pod_metadata["annotations"] = pod_annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "vllm",
            "namespace": "llm",
            "labels": {"app": "vllm"},
            "annotations": {CLUSTER_ANNOTATION: "prod", **(annotations or {})},
        },
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "vllm"}},
            "template": {"metadata": pod_metadata, "spec": {"containers": list(containers)}},
        },
    }


VLLM_IMAGE = "vllm/vllm-openai:v0.11.0"
STYLES = {
    # the vllm-openai image's entrypoint is `vllm serve`: the Deployment gives only args
    "args": deployment(
        {"name": "vllm", "image": VLLM_IMAGE, "args": [MODEL, "--port", "8080"]},
        pod_annotations={"prometheus.io/scrape": "true"},
    ),
    "command": deployment(
        {
            "name": "engine",
            "image": "my-vllm:1",
            "command": ["python3", "-m", "vllm.entrypoints.openai.api_server", "--model", MODEL],
            "env": [{"name": "HF_HOME", "value": "/models"}],
        }
    ),
    "command-and-args": deployment(
        {
            "name": "vllm",
            "image": VLLM_IMAGE,
            "command": ["vllm", "serve"],
            "args": [MODEL, "--port=9000"],
            "env": [
                {"name": "PYTHONHASHSEED", "value": "42"},
                {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "token"}}},
            ],
        }
    ),
    "shell-script": deployment(
        {
            "name": "vllm",
            "image": VLLM_IMAGE,
            "command": ["/bin/sh", "-c"],
            "args": [f"pip install kvcache[engine] && exec vllm serve {MODEL} --port 8000\n"],
        }
    ),
    "shell-command": deployment(
        {
            "name": "vllm",
            "image": VLLM_IMAGE,
            "command": ["bash", "-ec", f"vllm serve {MODEL}"],
        }
    ),
    "sidecar-named-by-annotation": deployment(
        {"name": "proxy", "image": "envoyproxy/envoy:v1.31", "args": ["-c", "/etc/envoy.yaml"]},
        {"name": "server", "image": VLLM_IMAGE, "args": [MODEL]},
        annotations={"kvcache.io/container": "server"},
    ),
    "sidecar-found-by-vllm": deployment(
        {"name": "metrics", "image": "prom/statsd-exporter:v0.27", "args": ["--log.level=warn"]},
        {"name": "server", "image": VLLM_IMAGE, "args": [MODEL]},
    ),
}


def settings(spec=SPEC, namespace="llm"):
    return engine_settings(spec, REF, UID, namespace)


def joined(original, engine_settings_=None):
    return apply_merge_patch(original, join_engine(original, engine_settings_ or settings()))


def vllm_container(obj, name):
    (found,) = [c for c in obj["spec"]["template"]["spec"]["containers"] if c["name"] == name]
    return found


def argv(container):
    tokens = [*container.get("command", []), *container.get("args", [])]
    if tokens[0].endswith("sh"):
        return shlex.split(tokens[2])
    return tokens


ENGINE_CONTAINER = {
    "args": "vllm",
    "command": "engine",
    "command-and-args": "vllm",
    "shell-script": "vllm",
    "shell-command": "vllm",
    "sidecar-named-by-annotation": "server",
    "sidecar-found-by-vllm": "server",
}


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("style", STYLES)
def test_join_then_unjoin_restores_the_deployment_exactly(style, spec):
    original = STYLES[style]
    kept = copy.deepcopy(original)
    after_join = joined(original, settings(SPECS[spec]))
    assert after_join != original
    assert apply_merge_patch(after_join, unjoin_engine(after_join)) == kept
    assert original == kept  # the functions never modify their argument


@pytest.mark.parametrize("style", STYLES)
def test_join_gives_the_vllm_container_the_connector_events_and_hash_settings(style):
    after_join = joined(STYLES[style])
    validate_builtin(after_join)
    container = vllm_container(after_join, ENGINE_CONTAINER[style])
    tokens = argv(container)
    assert tokens[-len(engine_flags()) :] == engine_flags()
    transfer = json.loads(tokens[tokens.index("--kv-transfer-config") + 1])
    assert transfer == KV_TRANSFER_CONFIG
    assert json.loads(tokens[tokens.index("--kv-events-config") + 1]) == KV_EVENTS_CONFIG
    assert tokens[tokens.index("--prefix-caching-hash-algo") + 1] == "sha256_cbor"
    env = {entry["name"]: entry.get("value") for entry in container["env"]}
    assert env["PYTHONHASHSEED"] == "0"
    assert env["KVCACHE_ETCD"] == "prod-etcd.llm.svc:2379" and env["KVCACHE_CLUSTER"] == "llm.prod"
    assert env["KVCACHE_CODEC"] == "int8" and env["KVCACHE_TENANT_SALT"] == tenant_salt(UID, "llm")
    for labels in (
        after_join["metadata"]["labels"],
        after_join["spec"]["template"]["metadata"]["labels"],
    ):
        assert (
            labels["kvcache.io/cluster"] == "prod"
            and labels["kvcache.io/cluster-namespace"] == "llm"
        )
    others = [c for c in after_join["spec"]["template"]["spec"]["containers"] if c is not container]
    assert others == [
        c
        for c in STYLES[style]["spec"]["template"]["spec"]["containers"]
        if c["name"] != container["name"]
    ]


def test_the_connector_module_and_class_exist():
    source = Path(__file__).resolve().parents[2] / "kvcache" / "connector" / "vllm.py"
    assert KV_TRANSFER_CONFIG["kv_connector_module_path"] == "kvcache.connector.vllm"
    assert f"class {KV_TRANSFER_CONFIG['kv_connector']}(" in source.read_text()


@pytest.mark.parametrize(
    ("style", "port"),
    [("args", "8080"), ("command-and-args", "9000"), ("shell-script", "8000"), ("command", "8000")],
)
def test_the_pods_say_which_port_the_engine_serves_on(style, port):
    pod = joined(STYLES[style])["spec"]["template"]["metadata"]
    assert pod["annotations"][ENGINE_PORT_ANNOTATION] == port
    assert pod["annotations"]["kvcache.io/kv-events-port"] == "5557"


def test_flags_go_into_a_shell_script_before_its_trailing_newline():
    container = vllm_container(joined(STYLES["shell-script"]), "vllm")
    script = container["args"][0]
    assert script.endswith("sha256_cbor\n") and script.count("\n") == 1
    assert container["command"] == ["/bin/sh", "-c"]


def test_a_preset_hash_seed_is_replaced_and_restored():
    original = STYLES["command-and-args"]
    after_join = joined(original)
    env = vllm_container(after_join, "vllm")["env"]
    assert env[0] == {"name": "PYTHONHASHSEED", "value": "0"}  # in place
    assert env[1] == vllm_container(original, "vllm")["env"][1]
    assert (
        vllm_container(apply_merge_patch(after_join, unjoin_engine(after_join)), "vllm")["env"]
        == (vllm_container(original, "vllm")["env"])
    )


@pytest.mark.parametrize("spec", SPECS)
def test_joining_again_with_the_same_settings_changes_nothing(spec):
    after_join = joined(STYLES["args"], settings(SPECS[spec]))
    assert join_engine(after_join, settings(SPECS[spec])) == {}


def test_joining_again_after_the_cluster_changed_replaces_the_settings():
    original = STYLES["command"]
    first = joined(original)
    cachegen = KVCacheClusterSpec.from_dict({"codec": "cachegen", "chunkTokens": 512})
    second = joined(first, settings(cachegen))
    container = vllm_container(second, "engine")
    codecs = [entry["value"] for entry in container["env"] if entry["name"] == "KVCACHE_CODEC"]
    assert codecs == ["cachegen"]
    assert argv(container).count("--kv-transfer-config") == 1
    assert apply_merge_patch(second, unjoin_engine(second)) == original


def test_leaving_keeps_what_the_user_changed_since_joining():
    after_join = joined(STYLES["command"])
    for entry in vllm_container(after_join, "engine")["env"]:
        if entry["name"] == "KVCACHE_CODEC":
            entry["value"] = "none"  # the user's own choice now
    after_join["spec"]["template"]["spec"]["containers"][0]["image"] = "my-vllm:2"
    restored = apply_merge_patch(after_join, unjoin_engine(after_join))
    container = vllm_container(restored, "engine")
    assert container["image"] == "my-vllm:2"
    assert container["env"] == [
        {"name": "HF_HOME", "value": "/models"},
        {"name": "KVCACHE_CODEC", "value": "none"},
    ]
    assert "args" not in container


def test_removing_the_annotation_then_leaving_gives_the_deployment_without_it():
    original = STYLES["args"]
    after_join = joined(original)
    del after_join["metadata"]["annotations"][CLUSTER_ANNOTATION]
    restored = apply_merge_patch(after_join, unjoin_engine(after_join))
    expected = copy.deepcopy(original)
    del expected["metadata"]["annotations"]  # Kubernetes drops an emptied map
    assert restored == expected


def test_a_deployment_that_never_joined_has_nothing_to_undo():
    assert unjoin_engine(STYLES["args"]) == {}


def test_the_joined_record_is_json_naming_cluster_and_container():
    record = json.loads(
        joined(STYLES["sidecar-named-by-annotation"])["metadata"]["annotations"][JOINED_ANNOTATION]
    )
    assert (record["cluster"], record["container"]) == ("llm/prod", "server")


def test_engines_in_another_namespace_join_only_where_allowed():
    assert ClusterRef.from_annotation("llm/prod", "team-a") == REF
    assert ClusterRef.from_annotation("prod", "llm") == REF
    allowed = settings(namespace="team-a")
    assert allowed.env["KVCACHE_ETCD"] == "prod-etcd.llm.svc:2379"
    with pytest.raises(JoinError, match="namespace 'team-b' may not join cluster llm/prod"):
        settings(namespace="team-b")


def test_each_namespace_keys_chunks_with_its_own_salt_unless_isolation_is_off():
    assert (
        settings(namespace="team-a").env["KVCACHE_TENANT_SALT"]
        != settings().env["KVCACHE_TENANT_SALT"]
    )
    assert tenant_salt(UID, "llm") == tenant_salt(UID, "llm") != tenant_salt("other-uid", "llm")
    shared = KVCacheClusterSpec.from_dict({"isolation": "None"})
    assert "KVCACHE_TENANT_SALT" not in settings(shared).env


def curve_reference(key, optional=False):
    reference = {"name": "prod-curve", "key": key}
    if optional:
        reference["optional"] = True
    return {"secretKeyRef": reference}


CURVE_CLIENT_ENV = {
    "KVCACHE_CURVE_SERVER_KEY": curve_reference("KVCACHE_CURVE_PUBLIC_KEY"),
    "KVCACHE_CURVE_PUBLIC_KEY": curve_reference("KVCACHE_CURVE_CLIENT_PUBLIC_KEY", True),
    "KVCACHE_CURVE_SECRET_KEY": curve_reference("KVCACHE_CURVE_CLIENT_SECRET_KEY", True),
}


@pytest.mark.parametrize("namespace", ["llm", "team-a"])
def test_with_a_curve_secret_an_engine_reads_the_client_keys_by_reference(namespace):
    """The same references in every namespace: a Secret reference is namespace-local, so an
    engine elsewhere reads the copy of the Secret in its own namespace."""
    after_join = joined(STYLES["command"], settings(CURVE, namespace))
    validate_builtin(after_join)
    env = vllm_container(after_join, "engine")["env"]
    by_reference = {entry["name"]: entry["valueFrom"] for entry in env if "valueFrom" in entry}
    assert by_reference == CURVE_CLIENT_ENV
    assert all("value" not in entry for entry in env if entry["name"] in CURVE_CLIENT_ENV)
    assert not any(name.startswith("KVCACHE_CURVE") for name in settings(SPEC).env)


def test_the_curve_references_replace_the_users_own_and_leaving_puts_them_back():
    own = [
        {"name": "KVCACHE_CURVE_SERVER_KEY", "value": "their-own-server-key"},
        {
            "name": "KVCACHE_CURVE_PUBLIC_KEY",
            "valueFrom": {"secretKeyRef": {"name": "mine", "key": "public"}},
        },
    ]
    original = deployment({"name": "vllm", "image": VLLM_IMAGE, "args": [MODEL], "env": own})
    after_join = joined(original, settings(CURVE))
    env = vllm_container(after_join, "vllm")["env"]
    assert [entry["name"] for entry in env[:2]] == [entry["name"] for entry in own]  # in place
    assert [entry["valueFrom"] for entry in env[:2]] == [
        CURVE_CLIENT_ENV["KVCACHE_CURVE_SERVER_KEY"],
        CURVE_CLIENT_ENV["KVCACHE_CURVE_PUBLIC_KEY"],
    ]
    assert apply_merge_patch(after_join, unjoin_engine(after_join)) == original


def test_leaving_keeps_a_curve_reference_the_user_changed_since_joining():
    after_join = joined(STYLES["command"], settings(CURVE))
    theirs = {"secretKeyRef": {"name": "mine", "key": "secret"}}
    for entry in vllm_container(after_join, "engine")["env"]:
        if entry["name"] == "KVCACHE_CURVE_SECRET_KEY":
            entry["valueFrom"] = theirs
    restored = vllm_container(apply_merge_patch(after_join, unjoin_engine(after_join)), "engine")
    assert restored["env"] == [
        {"name": "HF_HOME", "value": "/models"},
        {"name": "KVCACHE_CURVE_SECRET_KEY", "valueFrom": theirs},
    ]


def test_a_curve_secret_set_or_removed_later_rejoins_with_or_without_the_references():
    original = STYLES["args"]
    with_curve = joined(joined(original), settings(CURVE))
    names = [entry["name"] for entry in vllm_container(with_curve, "vllm")["env"]]
    assert set(CURVE_CLIENT_ENV) <= set(names) and len(names) == len(set(names))
    without = joined(with_curve, settings(SPEC))
    assert without == joined(original)
    assert apply_merge_patch(with_curve, unjoin_engine(with_curve)) == original


def test_a_container_without_command_or_args_is_refused():
    bare = deployment({"name": "vllm", "image": VLLM_IMAGE})
    with pytest.raises(JoinError, match="has neither command nor args"):
        join_engine(bare, settings())


@pytest.mark.parametrize(
    "resources",
    [
        {"limits": {"nvidia.com/gpu": 1}},
        {"requests": {"amd.com/gpu": "2"}},
        {"limits": {"cpu": "8", "google.com/tpu": 4}},
    ],  # fmt: skip
)
def test_an_engine_on_a_platform_the_connector_cannot_serve_is_not_joined(resources):
    """A GPU engine would start with a connector that can only stand aside (GPU page layouts
    are not read yet): the join is refused, with the reason, until that platform is served."""
    gpu = deployment({"name": "vllm", "image": VLLM_IMAGE, "args": [MODEL],
                      "resources": resources})  # fmt: skip
    with pytest.raises(JoinError, match="serves vLLM's CPU backend only"):
        join_engine(gpu, settings())
    cpu = deployment({"name": "vllm", "image": VLLM_IMAGE, "args": [MODEL],
                      "resources": {"limits": {"cpu": "8", "memory": "32Gi"}}})  # fmt: skip
    assert join_engine(cpu, settings())


@pytest.mark.parametrize(
    ("flags", "ranks"),
    [([], "0"), (["--data-parallel-size", "2"], "0,1"), (["-dp=4"], "0,1,2,3"),
     (["-dp", "4", "--data-parallel-size-local", "2", "--data-parallel-start-rank", "2"], "2,3")],
)  # fmt: skip
def test_the_pods_data_parallel_ranks_are_recorded_for_the_router(flags, ranks):
    """Each rank has its own KV cache and KV-event ports (the events port plus its rank, below
    the replay port): the router routes to each and follows each one's events."""
    original = deployment({"name": "vllm", "image": VLLM_IMAGE, "args": [MODEL, *flags]})
    pod = joined(original)["spec"]["template"]["metadata"]["annotations"]
    assert pod["kvcache.io/data-parallel-ranks"] == ranks
    events = int(pod["kvcache.io/kv-events-port"])
    assert int(pod["kvcache.io/kv-replay-port"]) >= events + 64
    too_many = deployment({"name": "vllm", "image": VLLM_IMAGE, "args": [MODEL, "-dp", "65"]})
    with pytest.raises(JoinError, match="ranks below 64"):
        join_engine(too_many, settings())


def test_an_ambiguous_pod_must_name_its_vllm_container():
    ambiguous = deployment(
        {"name": "a", "image": VLLM_IMAGE, "args": [MODEL]},
        {"name": "b", "image": VLLM_IMAGE, "args": [MODEL]},
    )
    with pytest.raises(JoinError, match="name it with the kvcache.io/container annotation"):
        join_engine(ambiguous, settings())
    missing = deployment(
        {"name": "a", "image": VLLM_IMAGE, "args": [MODEL]},
        annotations={"kvcache.io/container": "z"},
    )
    with pytest.raises(JoinError, match="no container 'z'"):
        join_engine(missing, settings())
