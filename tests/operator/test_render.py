"""The children of a KVCacheCluster, rendered without a cluster: valid Kubernetes objects,
labelled and selected consistently, ready to be adopted, and running commands the kvcache CLI
accepts."""

from __future__ import annotations

import copy
import dataclasses

import kopf
import pytest
import zmq
from kube_schemas import validate_builtin

from kvcache.cli import build_parser
from kvcache.core.config import parse_bytes
from kvcache.core.secrets import curve_client_keys, curve_server_keys
from kvcache.operator.names import CLUSTER_LABEL, NODE, ROUTER, ClusterRef
from kvcache.operator.render import (
    DISK_MOUNT,
    NODE_HEADROOM_BYTES,
    ImagePulling,
    client_env,
    curve_client_env,
    etcd_endpoint,
    render_cluster,
    router_command,
)
from kvcache.operator.spec import KVCacheClusterSpec

REF = ClusterRef("llm", "prod")
IMAGE = "registry.example/kvcache:0.1.0"
SPECS = {
    "defaults": {},
    "disk": {"nodes": 5, "memory": "32Gi", "disk": "200Gi", "storageClassName": "fast-ssd"},
    "external-etcd-no-router": {
        "etcd": {"managed": False, "endpoint": "etcd.infra.svc:2379"},
        "router": {"enabled": False},
    },
    "everything": {
        "nodes": 6,
        "replication": 3,
        "disk": "1Ti",
        "codec": "cachegen",
        "allowedNamespaces": ["team-a", "team-b", "llm"],
        "image": "registry.example/kvcache:custom",
        "resources": {"requests": {"cpu": "4", "memory": "80Gi"}, "limits": {"memory": "80Gi"}},
        "nodeSelector": {"kvcache.io/pool": "cache"},
        "tolerations": [{"key": "cache", "operator": "Exists", "effect": "NoSchedule"}],
        "topologySpreadConstraints": [
            {
                "maxSkew": 1,
                "topologyKey": "topology.kubernetes.io/zone",
                "whenUnsatisfiable": "DoNotSchedule",
            }
        ],
        "security": {"curveSecret": "prod-curve", "atRestSecret": "prod-disk-key"},
        "router": {
            "replicas": 3,
            "blockSize": 128,
            "tokenizer": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "resources": {"requests": {"cpu": "1"}},
        },
    },
}


def render(name):
    return render_cluster(KVCacheClusterSpec.from_dict(SPECS[name]), REF, IMAGE)


def by_kind(objects, kind):
    return [obj for obj in objects if obj["kind"] == kind]


def container(workload):
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    return only


def node_statefulset(objects):
    (statefulset,) = [
        obj for obj in by_kind(objects, "StatefulSet") if "-node" in obj["metadata"]["name"]
    ]
    return statefulset


@pytest.mark.parametrize("name", SPECS)
def test_every_object_is_a_valid_kubernetes_object(name):
    rendered = render(name)
    for obj in rendered.owned + rendered.elsewhere:
        validate_builtin(obj)


@pytest.mark.parametrize("name", SPECS)
def test_objects_are_labelled_and_selected_consistently(name):
    rendered = render(name)
    objects = rendered.owned + rendered.elsewhere
    pod_labels = []
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == "prod"
        assert labels["app.kubernetes.io/managed-by"] == "kvcache-operator"
        assert labels["app.kubernetes.io/part-of"] == "kvcache"
        assert "app.kubernetes.io/component" in labels
        assert "ownerReferences" not in obj["metadata"] and "status" not in obj
        if obj["kind"] in ("StatefulSet", "Deployment"):
            template = obj["spec"]["template"]["metadata"]["labels"]
            assert obj["spec"]["selector"]["matchLabels"].items() <= template.items()
            # The router discovers engines by this label: a child carrying it would be taken
            # for an engine.
            assert CLUSTER_LABEL not in template
            pod_labels.append(template)
        if obj["kind"] == "PodDisruptionBudget":
            assert any(
                obj["spec"]["selector"]["matchLabels"].items() <= p.items() for p in pod_labels
            )
    for service in by_kind(objects, "Service"):
        selected = [p for p in pod_labels if service["spec"]["selector"].items() <= p.items()]
        assert len(selected) == 1, service["metadata"]["name"]
    names = [
        (obj["kind"], obj["metadata"]["namespace"], obj["metadata"]["name"]) for obj in objects
    ]
    assert len(names) == len(set(names))
    assert {obj["metadata"]["namespace"] for obj in rendered.owned} == {"llm"}
    assert "llm" not in {obj["metadata"]["namespace"] for obj in rendered.elsewhere}


def test_owned_objects_are_ready_for_adoption():
    owner = {
        "apiVersion": "kvcache.io/v1alpha1",
        "kind": "KVCacheCluster",
        "metadata": {
            "name": "prod",
            "namespace": "llm",
            "uid": "6a2f0c1e-0000-4000-8000-000000000001",
        },
    }
    for obj in render("everything").owned:
        kopf.adopt(obj, owner=owner)
        (reference,) = obj["metadata"]["ownerReferences"]
        assert reference["uid"] == owner["metadata"]["uid"] and reference["controller"] is True
        assert obj["metadata"]["namespace"] == "llm"
        validate_builtin(obj)


def node_flags(statefulset):
    command = container(statefulset)["command"]
    assert command[:2] == ["kvcache", "node"]
    args = [part.replace("$(POD_NAME)", "prod-node-0") for part in command[1:]]
    return build_parser().parse_args(args)


def test_the_node_command_is_one_the_cli_accepts():
    flags = node_flags(node_statefulset(render("disk").owned))
    assert flags.node_id == "prod-node-0"
    assert flags.host == "0.0.0.0" and (flags.port, flags.admin_port) == (7400, 7401)
    assert flags.memory == 32 << 30
    assert flags.etcd == "prod-etcd.llm.svc:2379" and flags.cluster == "llm.prod"
    assert flags.advertise == "tcp://prod-node-0.prod-node.llm.svc:7400"
    assert flags.disk_dir.startswith(DISK_MOUNT) and flags.disk == int(200 * 0.9 * (1 << 30))


def test_a_disk_tier_gets_a_volume_per_node_that_goes_with_it():
    statefulset = node_statefulset(render("disk").owned)
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert {"name": claim["metadata"]["name"], "mountPath": DISK_MOUNT} in container(statefulset)[
        "volumeMounts"
    ]
    assert statefulset["spec"]["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Delete",
        "whenScaled": "Delete",
    }
    assert statefulset["spec"]["replicas"] == 5


def test_sizes_are_rendered_as_the_api_server_stores_them():
    spec = KVCacheClusterSpec.from_dict({"memory": "2560Mi", "disk": "1.5Ti"})
    statefulset = node_statefulset(render_cluster(spec, REF, IMAGE).owned)
    (claim,) = statefulset["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1536Gi"
    assert container(statefulset)["resources"]["limits"]["memory"] == "4Gi"  # 2560Mi + 1.5Gi


def test_memory_only_nodes_get_no_volume_and_a_memory_limit_with_headroom():
    statefulset = node_statefulset(render("defaults").owned)
    assert "volumeClaimTemplates" not in statefulset["spec"]
    assert node_flags(statefulset).disk_dir is None
    resources = container(statefulset)["resources"]
    assert resources["requests"] == resources["limits"]
    assert parse_bytes(resources["limits"]["memory"]) == (4 << 30) + NODE_HEADROOM_BYTES


def test_the_specs_scheduling_and_secrets_reach_the_node_pods():
    statefulset = node_statefulset(render("everything").owned)
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"kvcache.io/pool": "cache"}
    assert pod["tolerations"][0]["key"] == "cache"
    (spread,) = pod["topologySpreadConstraints"]
    assert spread["labelSelector"]["matchLabels"] == REF.selector(NODE)
    node = container(statefulset)
    assert node["image"] == "registry.example/kvcache:custom"
    assert node["resources"]["requests"]["cpu"] == "4"
    assert node["envFrom"] == [
        {"secretRef": {"name": "prod-curve"}},
        {"secretRef": {"name": "prod-disk-key"}},
    ]


CURVE_REFERENCES = [
    {
        "name": "KVCACHE_CURVE_SERVER_KEY",
        "valueFrom": {"secretKeyRef": {"name": "prod-curve", "key": "KVCACHE_CURVE_PUBLIC_KEY"}},
    },
    {
        "name": "KVCACHE_CURVE_PUBLIC_KEY",
        "valueFrom": {
            "secretKeyRef": {
                "name": "prod-curve",
                "key": "KVCACHE_CURVE_CLIENT_PUBLIC_KEY",
                "optional": True,
            }
        },
    },
    {
        "name": "KVCACHE_CURVE_SECRET_KEY",
        "valueFrom": {
            "secretKeyRef": {
                "name": "prod-curve",
                "key": "KVCACHE_CURVE_CLIENT_SECRET_KEY",
                "optional": True,
            }
        },
    },
]


def test_with_a_curve_secret_the_router_reads_the_client_keys_from_it():
    (router,) = by_kind(render("everything").owned, "Deployment")
    env = container(router)["env"]
    assert env[1:] == CURVE_REFERENCES
    (plain,) = by_kind(render("defaults").owned, "Deployment")
    assert [entry["name"] for entry in container(plain)["env"]] == ["HF_HOME"]


def test_the_router_always_asks_the_nodes_and_never_guesses_the_engines_keys():
    """The engines publish what their connectors key chunks by; the router is given only where
    the cluster is (a router told a model and dtype asked for keys no engine stores under)."""
    for name in ("defaults", "everything"):
        spec = KVCacheClusterSpec.from_dict(SPECS[name])
        command = router_command(spec, REF)
        assert command[command.index("--cluster-etcd") + 1] == etcd_endpoint(spec, REF)
        assert command[command.index("--cluster") + 1] == REF.etcd_cluster
        assert not {"--model", "--kv-dtype", "--chunk-tokens"} & set(command)


def test_the_client_references_name_the_secret_as_the_clients_read_it():
    """Resolved as the kubelet does, the nodes' Secret gives the nodes their pair and allow-list
    and each client the nodes' public key and the allowed pair, never the nodes' secret key."""
    (node_public, node_secret), (client_public, client_secret) = (
        zmq.curve_keypair(),
        zmq.curve_keypair(),
    )
    secret = {
        "KVCACHE_CURVE_PUBLIC_KEY": node_public.decode(),
        "KVCACHE_CURVE_SECRET_KEY": node_secret.decode(),
        "KVCACHE_CURVE_ALLOWED_CLIENTS": client_public.decode(),
        "KVCACHE_CURVE_CLIENT_PUBLIC_KEY": client_public.decode(),
        "KVCACHE_CURVE_CLIENT_SECRET_KEY": client_secret.decode(),
    }
    spec = KVCacheClusterSpec.from_dict(SPECS["everything"])
    env = {
        name: secret[source["secretKeyRef"]["key"]]
        for name, source in curve_client_env(spec).items()
    }
    assert node_secret.decode() not in env.values()
    node = curve_server_keys(None, None, secret)  # envFrom: the whole Secret
    client = curve_client_keys(None, None, env)
    assert client.server_public_key == node.public_key
    assert (client.public_key, client.secret_key) == (client_public, client_secret)
    assert client.public_key in node.allowed_clients


def test_an_external_etcd_replaces_the_managed_one():
    objects = render("external-etcd-no-router").owned
    assert [obj["metadata"]["name"] for obj in by_kind(objects, "StatefulSet")] == ["prod-node"]
    assert node_flags(node_statefulset(objects)).etcd == "etcd.infra.svc:2379"
    assert not by_kind(objects, "Deployment") and not by_kind(objects, "Role")


def test_the_managed_etcd_is_one_member_behind_its_service():
    objects = render("defaults").owned
    (etcd,) = [
        obj for obj in by_kind(objects, "StatefulSet") if obj["metadata"]["name"] == "prod-etcd"
    ]
    command = container(etcd)["command"]
    assert command[0] == "etcd" and etcd["spec"]["replicas"] == 1
    assert "http://prod-etcd.llm.svc:2379" in command
    assert etcd["spec"]["serviceName"] == "prod-etcd"


def test_the_router_may_read_pods_in_every_namespace_allowed_to_join():
    rendered = render("everything")
    roles = by_kind(rendered.owned, "Role") + by_kind(rendered.elsewhere, "Role")
    assert sorted(role["metadata"]["namespace"] for role in roles) == ["llm", "team-a", "team-b"]
    for binding in by_kind(rendered.owned + rendered.elsewhere, "RoleBinding"):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "prod-router", "namespace": "llm"}
        ]
        assert binding["metadata"]["labels"]["kvcache.io/cluster-namespace"] == "llm"
    (deployment,) = by_kind(rendered.owned, "Deployment")
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == "prod-router"
    assert deployment["spec"]["replicas"] == 3
    command = container(deployment)["command"]
    assert command[command.index("--engine-selector") + 1] == (
        "kvcache.io/cluster=prod,kvcache.io/cluster-namespace=llm"
    )
    namespaces = [command[i + 1] for i, part in enumerate(command) if part == "--engine-namespace"]
    assert namespaces == ["llm", "team-a", "team-b"]


def test_the_router_command_is_one_the_cli_accepts():
    (deployment,) = by_kind(render("everything").owned, "Deployment")
    flags = build_parser().parse_args(container(deployment)["command"][1:])
    assert flags.block_size == 128 and flags.hash_seed == "0"
    assert flags.engine_selector and flags.engine_namespace == ["llm", "team-a", "team-b"]
    assert flags.engine == []  # every engine comes from discovery


def test_the_routing_settings_reach_the_router_and_default_to_the_routers_own():
    """The CRD's routing fields become the router's settings through its real flag parsing; the
    CRD's defaults are the router's (the operator cannot import the router's modules)."""
    from kvcache.cli import _given
    from kvcache.router.app import ProxySettings
    from kvcache.router.policy import PolicySettings
    from kvcache.router.score import ScoreSettings

    def settings(spec):
        command = router_command(KVCacheClusterSpec.from_dict(spec), REF)
        flags = build_parser().parse_args(command[1:])
        score = ScoreSettings(**_given(flags, "score_", dataclasses.fields(ScoreSettings)))
        proxy = ProxySettings(**_given(flags, "", dataclasses.fields(ProxySettings)))
        return flags, score, proxy

    flags, score, proxy = settings({})
    assert score == ScoreSettings() and proxy == ProxySettings()
    policy = PolicySettings()
    assert (flags.history_ttl_s, flags.speculative_ttl_s, flags.index_capacity_blocks) == (
        policy.history_ttl_s, policy.speculative_ttl_s, policy.index_capacity_blocks,
    )  # fmt: skip
    tuned = {
        "minMatchTokens": 256,
        "prefillSecondsPerToken": 0.002,
        "loadSecondsPerToken": 1e-5,
        "firstByteTimeoutSeconds": 30,
        "idleTimeoutSeconds": 5,
        "historyTtlSeconds": 60,
    }
    flags, score, proxy = settings({"router": tuned})
    assert (score.min_match_tokens, score.prefill_s_per_token, score.load_s_per_token) == (
        256, 0.002, 1e-5,
    )  # fmt: skip
    assert (proxy.first_byte_timeout_s, proxy.idle_timeout_s, flags.history_ttl_s) == (30, 5, 60)


def test_the_routers_probes_restart_it_only_when_it_stops_serving():
    """With no engine up the router is unready (out of its Service) but alive (not restarted)."""
    from starlette.testclient import TestClient

    from kvcache.router.app import create_app
    from kvcache.router.engines import EnginePool
    from kvcache.router.policy import PolicySettings, PrefixPolicy

    (deployment,) = by_kind(render("everything").owned, "Deployment")
    probes = container(deployment)
    app = create_app(EnginePool(), PrefixPolicy(PolicySettings()))
    with TestClient(app) as client:
        assert client.get(probes["livenessProbe"]["httpGet"]["path"]).status_code == 200
        assert client.get(probes["readinessProbe"]["httpGet"]["path"]).status_code == 503


def test_the_client_settings_are_what_the_vllm_connector_reads():
    vllm_settings = pytest.importorskip("kvcache.connector.vllm_settings")
    spec = KVCacheClusterSpec.from_dict(SPECS["everything"])
    settings = vllm_settings.VllmSettings.from_sources({}, env=client_env(spec, REF))
    assert (settings.etcd, settings.cluster) == ("prod-etcd.llm.svc:2379", "llm.prod")
    assert (settings.codec, settings.replicas, settings.chunk_tokens) == ("cachegen", 3, 256)
    (config_map,) = by_kind(render("everything").owned, "ConfigMap")
    assert config_map["data"] == client_env(spec, REF)


def test_rendering_is_pure():
    first = render("everything")
    kept = copy.deepcopy(first)
    node_statefulset(first.owned)["spec"]["template"]["spec"]["securityContext"]["runAsUser"] = 0
    assert render("everything") == kept


def test_component_names_and_labels():
    rendered = render("defaults")
    statefulset = node_statefulset(rendered.owned)
    assert statefulset["spec"]["template"]["metadata"]["labels"] == REF.labels(NODE)
    (router,) = by_kind(rendered.owned, "Deployment")
    assert router["metadata"]["name"] == "prod-router"
    assert router["spec"]["selector"]["matchLabels"] == REF.selector(ROUTER)
    assert REF.node_selector_text() == (
        "app.kubernetes.io/name=kvcache,app.kubernetes.io/instance=prod,"
        "app.kubernetes.io/component=cache-node"
    )


def test_a_private_registrys_pull_settings_reach_every_pod_the_operator_makes():
    """The chart's image.pullPolicy and imagePullSecrets reached only the operator's pod: nodes,
    router and etcd could not pull from a private registry."""
    pulling = ImagePulling.from_env(
        {"KVCACHE_IMAGE_PULL_POLICY": "Always", "KVCACHE_IMAGE_PULL_SECRETS": "regcred,mirror"}
    )
    objects = render_cluster(KVCacheClusterSpec(), REF, IMAGE, pulling=pulling).owned
    workloads = [obj for obj in objects if obj["kind"] in ("StatefulSet", "Deployment")]
    assert {obj["metadata"]["name"] for obj in workloads} == {REF.nodes, REF.etcd, REF.router}
    for workload in workloads:
        pod = workload["spec"]["template"]["spec"]
        assert pod["imagePullSecrets"] == [{"name": "regcred"}, {"name": "mirror"}]
        assert {c["imagePullPolicy"] for c in pod["containers"]} == {"Always"}
    plain = render_cluster(KVCacheClusterSpec(), REF, IMAGE, pulling=ImagePulling.from_env({}))
    for workload in plain.owned:
        if workload["kind"] in ("StatefulSet", "Deployment"):
            assert "imagePullSecrets" not in workload["spec"]["template"]["spec"]
