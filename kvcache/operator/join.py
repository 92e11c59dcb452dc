"""Joining a vLLM Deployment to a KVCacheCluster, and leaving it: merge patches from pure functions.

A Deployment annotated `kvcache.io/cluster: <name>` (or `<namespace>/<name>`) joins: its vLLM
container gets the kvcache connector (`--kv-transfer-config`), KV events for the router
(`--kv-events-config`), `--prefix-caching-hash-algo sha256_cbor` and a fixed `PYTHONHASHSEED` (so
the router can reproduce vLLM's block hashes), the cluster's KVCACHE_* settings and tenant salt,
its CurveZMQ client keys (references to the cluster's curveSecret, never the key text), the
labels the router discovers engines by, and pod annotations naming the ports to reach it on.

`join_engine` returns the JSON merge patch that does this and records what it added in the
`kvcache.io/joined` annotation; `unjoin_engine` returns the patch that removes exactly that:
values the user changed since are left as they are, and a joined Deployment that joins again
(the cluster changed) is first unjoined, so settings never pile up.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvcache.operator import merge_patch
from kvcache.operator.names import (
    CONTAINER_ANNOTATION,
    DATA_PARALLEL_ANNOTATION,
    ENGINE_PORT,
    ENGINE_PORT_ANNOTATION,
    EVENTS_PORT,
    EVENTS_PORT_ANNOTATION,
    HASH_SEED,
    JOINED_ANNOTATION,
    MAX_DATA_PARALLEL_RANKS,
    REPLAY_PORT,
    REPLAY_PORT_ANNOTATION,
    TENANT_SALT_ENV,
    ClusterRef,
)
from kvcache.operator.render import EnvValue, client_env, curve_client_env, env_entry
from kvcache.operator.spec import KVCacheClusterSpec

KV_TRANSFER_CONFIG = {
    "kv_connector": "KVCacheConnector",
    "kv_connector_module_path": "kvcache.connector.vllm",
    "kv_role": "kv_both",
}
# vLLM's publisher binds `tcp://*:P` (and connects for any other form): the router subscribes.
KV_EVENTS_CONFIG = {
    "enable_kv_cache_events": True,
    "publisher": "zmq",
    "endpoint": f"tcp://*:{EVENTS_PORT}",
    "replay_endpoint": f"tcp://*:{REPLAY_PORT}",
}
SHELLS = frozenset({"sh", "bash", "dash", "ash", "zsh"})
RECORD_VERSION = 1


class JoinError(ValueError):
    """A Deployment that cannot join as asked; the message says what to change."""


@dataclass(frozen=True)
class EngineSettings:
    """What a joined engine is given: its cluster, and the environment of its vLLM container
    (values, or `valueFrom` references for the keys a Secret holds)."""

    cluster: ClusterRef
    env: Mapping[str, EnvValue]


def may_join(spec: KVCacheClusterSpec, ref: ClusterRef, engine_namespace: str) -> bool:
    return engine_namespace == ref.namespace or engine_namespace in spec.allowed_namespaces


def tenant_salt(cluster_uid: str, engine_namespace: str) -> str:
    """The chunk-key salt of one namespace's engines: the same for all of them, different in
    every other namespace, and unguessable without reading the cluster resource (its uid is
    random). A cluster created again gets a new uid, hence new keys, as its nodes start empty."""
    return hashlib.sha256(f"{cluster_uid}/{engine_namespace}".encode()).hexdigest()[:32]


def engine_settings(
    spec: KVCacheClusterSpec, ref: ClusterRef, cluster_uid: str, engine_namespace: str
) -> EngineSettings:
    if not may_join(spec, ref, engine_namespace):
        raise JoinError(
            f"namespace {engine_namespace!r} may not join cluster {ref}: "
            "list it in the cluster's spec.allowedNamespaces"
        )
    env: dict[str, EnvValue] = {**client_env(spec, ref), "PYTHONHASHSEED": HASH_SEED}
    if spec.isolation == "Namespace":
        env[TENANT_SALT_ENV] = tenant_salt(cluster_uid, engine_namespace)
    env.update(curve_client_env(spec))
    return EngineSettings(ref, env)


def engine_flags() -> list[str]:
    def compact(config: Mapping[str, Any]) -> str:
        return json.dumps(config, separators=(",", ":"))

    return [
        "--kv-transfer-config", compact(KV_TRANSFER_CONFIG),
        "--kv-events-config", compact(KV_EVENTS_CONFIG),
        "--prefix-caching-hash-algo", "sha256_cbor",
    ]  # fmt: skip


def join_engine(deployment: Mapping[str, Any], settings: EngineSettings) -> dict[str, Any]:
    """The merge patch that joins `deployment` to the cluster (empty if it is joined so)."""
    desired = _joined(_unjoined(copy.deepcopy(dict(deployment))), settings)
    return merge_patch.diff(deployment, desired)


def unjoin_engine(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that removes what joining added (empty if it was never joined)."""
    return merge_patch.diff(deployment, _unjoined(copy.deepcopy(dict(deployment))))


# ----------------------------------------------------------------------------------------------
# Joining


def _joined(deployment: dict[str, Any], settings: EngineSettings) -> dict[str, Any]:
    metadata = deployment["metadata"]
    template = deployment["spec"]["template"]
    container = _vllm_container(deployment)
    _refuse_unserved_platform(container)
    record = {
        "version": RECORD_VERSION,
        "cluster": str(settings.cluster),
        "container": container["name"],
        "flags": _add_flags(container, engine_flags()),
        "env": _set_env(container, settings.env),
        "labels": _set_keys(metadata, "labels", settings.cluster.engine_labels()),
        "podLabels": _set_keys(template["metadata"], "labels", settings.cluster.engine_labels()),
        "podAnnotations": _set_keys(
            template["metadata"],
            "annotations",
            {
                ENGINE_PORT_ANNOTATION: str(_engine_port(container)),
                EVENTS_PORT_ANNOTATION: str(EVENTS_PORT),
                REPLAY_PORT_ANNOTATION: str(REPLAY_PORT),
                DATA_PARALLEL_ANNOTATION: ",".join(map(str, _data_parallel_ranks(container))),
            },
        ),
    }
    metadata.setdefault("annotations", {})[JOINED_ANNOTATION] = json.dumps(record, sort_keys=True)
    return deployment


def _vllm_container(deployment: Mapping[str, Any]) -> dict[str, Any]:
    """The container named by the `kvcache.io/container` annotation, else the only one, else
    the only one that mentions vLLM."""
    containers = deployment["spec"]["template"]["spec"]["containers"]
    wanted = deployment["metadata"].get("annotations", {}).get(CONTAINER_ANNOTATION)
    if wanted:
        chosen = [container for container in containers if container["name"] == wanted]
        if not chosen:
            raise JoinError(f"no container {wanted!r} (named by {CONTAINER_ANNOTATION})")
        return chosen[0]
    if len(containers) == 1:
        return containers[0]
    chosen = [container for container in containers if "vllm" in json.dumps(container).lower()]
    if len(chosen) != 1:
        names = [container["name"] for container in containers]
        raise JoinError(
            f"cannot tell which of the containers {names} runs vLLM: "
            f"name it with the {CONTAINER_ANNOTATION} annotation"
        )
    return chosen[0]


# Words in the names of the extended resources accelerators are requested by (nvidia.com/gpu,
# amd.com/gpu, gpu.intel.com/i915, google.com/tpu, habana.ai/gaudi, aws.amazon.com/neuron).
_ACCELERATORS = ("gpu", "tpu", "gaudi", "neuron")


def _refuse_unserved_platform(container: Mapping[str, Any]) -> None:
    """The connector reads vLLM's CPU backend's pages only (GPU layouts are issue 22): an engine
    that asks for an accelerator is not joined, rather than started with a connector that can
    only stand aside."""
    resources = container.get("resources") or {}
    asked = {name for part in ("limits", "requests") for name in resources.get(part) or {}}
    accelerators = sorted(name for name in asked if any(word in name for word in _ACCELERATORS))
    if accelerators:
        raise JoinError(
            f"container {container['name']!r} asks for {', '.join(accelerators)}: the kvcache "
            "connector serves vLLM's CPU backend only so far; it joins once GPU engines are "
            "served"
        )


def _shell_script(container: Mapping[str, Any]) -> tuple[str, int] | None:
    """(field, index) of the script when the container runs `sh -c SCRIPT` (in any split of
    command and args): flags then go at the end of the script, not into $1, $2, ..."""
    command, args = container.get("command", []), container.get("args", [])
    argv = [*command, *args]
    if len(argv) < 3 or os.path.basename(argv[0]) not in SHELLS:
        return None
    option = argv[1]
    if not (option.startswith("-") and not option.startswith("--") and "c" in option):
        return None
    return ("command", 2) if len(command) > 2 else ("args", 2 - len(command))


def _add_flags(container: dict[str, Any], flags: list[str]) -> dict[str, Any]:
    script = _shell_script(container)
    if script is not None:
        field, index = script
        text = container[field][index]
        suffix = " " + shlex.join(flags)
        body = text.rstrip()  # before a trailing newline, or the flags would be a new command
        container[field][index] = body + suffix + text[len(body) :]
        return {"field": field, "index": index, "text": suffix}
    if "command" not in container and "args" not in container:
        # The flags would replace the image's CMD, which may hold the model: refuse to guess.
        raise JoinError(
            f"container {container['name']!r} has neither command nor args: "
            "write out the vLLM command (e.g. args: [--model, ...]) so flags can be added"
        )
    created = "args" not in container
    container.setdefault("args", []).extend(flags)  # after `command`, as the kubelet runs them
    return {"field": "args", "tokens": flags, "created": created}


def _argv(container: Mapping[str, Any]) -> list[str]:
    script = _shell_script(container)
    if script is not None:
        return shlex.split(container[script[0]][script[1]])
    return [*container.get("command", []), *container.get("args", [])]


def _flag(argv: list[str], *names: str) -> str | None:
    """The value of the last of `names` given (`--name value` or `--name=value`)."""
    found = None
    for position, token in enumerate(argv):
        name, equals, value = token.partition("=")
        if name in names:
            if equals:
                found = value
            elif position + 1 < len(argv):
                found = argv[position + 1]
    return found


def _engine_port(container: Mapping[str, Any]) -> int:
    """The port vLLM serves on: its `--port` flag, else vLLM's default."""
    port = _flag(_argv(container), "--port")
    return int(port) if port is not None and port.isdigit() else ENGINE_PORT


def _data_parallel_ranks(container: Mapping[str, Any]) -> list[int]:
    """The data-parallel ranks this pod's engine runs: each has its own KV cache and publishes
    its KV events on the events port plus its rank (vLLM's `offset_endpoint_port`), and takes
    requests sent with `X-data-parallel-rank`."""
    argv = _argv(container)

    def number(*names: str) -> int | None:
        value = _flag(argv, *names)
        return int(value) if value is not None and value.isdigit() else None

    size = number("--data-parallel-size", "-dp") or 1
    local = number("--data-parallel-size-local", "-dpl") or size
    start = number("--data-parallel-start-rank", "-dpr") or 0
    if start + local > MAX_DATA_PARALLEL_RANKS:
        raise JoinError(
            f"data-parallel ranks up to {start + local - 1}: kvcache's KV-event ports take "
            f"ranks below {MAX_DATA_PARALLEL_RANKS}"
        )
    return list(range(start, start + local))


def _env_index(entries: list[dict[str, Any]], name: str) -> int | None:
    return next((i for i, entry in enumerate(entries) if entry.get("name") == name), None)


def _set_env(container: dict[str, Any], env: Mapping[str, EnvValue]) -> dict[str, Any]:
    """Set each variable, replacing an entry of the same name in place; the record keeps what
    was set (a value or a `valueFrom`) and the replaced entries (None: there was none)."""
    created = "env" not in container
    entries = container.setdefault("env", [])
    previous: dict[str, Any] = {}
    for name, value in env.items():
        index = _env_index(entries, name)
        previous[name] = None if index is None else entries[index]
        if index is None:
            entries.append(env_entry(name, value))
        else:
            entries[index] = env_entry(name, value)
    return {"created": created, "set": dict(env), "previous": previous}


def _set_keys(parent: dict[str, Any], key: str, values: Mapping[str, str]) -> dict[str, Any]:
    created = key not in parent
    target = parent.setdefault(key, {})
    previous = {name: target.get(name) for name in values}
    target.update(values)
    return {"created": created, "set": dict(values), "previous": previous}


# ----------------------------------------------------------------------------------------------
# Leaving


def _unjoined(deployment: dict[str, Any]) -> dict[str, Any]:
    metadata = deployment["metadata"]
    annotations = metadata.get("annotations", {})
    if JOINED_ANNOTATION not in annotations:
        return deployment
    record = json.loads(annotations.pop(JOINED_ANNOTATION))
    if not annotations:  # Kubernetes drops empty maps; so does this, for equal objects
        del metadata["annotations"]
    template = deployment["spec"]["template"]
    containers = template["spec"]["containers"]
    container = next((c for c in containers if c["name"] == record["container"]), None)
    if container is not None:
        _remove_flags(container, record["flags"])
        _restore_env(container, record["env"])
    _restore_keys(metadata, "labels", record["labels"])
    _restore_keys(template["metadata"], "labels", record["podLabels"])
    _restore_keys(template["metadata"], "annotations", record["podAnnotations"])
    return deployment


def _remove_flags(container: dict[str, Any], record: Mapping[str, Any]) -> None:
    field = record["field"]
    if "text" in record:
        values = container.get(field, [])
        index = record["index"]
        if index < len(values) and record["text"] in values[index]:
            text = values[index]
            at = text.rfind(record["text"])
            values[index] = text[:at] + text[at + len(record["text"]) :]
        return
    tokens, values = record["tokens"], container.get(field, [])
    for start in range(len(values) - len(tokens), -1, -1):  # the last occurrence: ours
        if values[start : start + len(tokens)] == tokens:
            del values[start : start + len(tokens)]
            break
    if record["created"] and not values:
        container.pop(field, None)


def _restore_env(container: dict[str, Any], record: Mapping[str, Any]) -> None:
    entries = container.get("env", [])
    for name, old in record["previous"].items():
        index = _env_index(entries, name)
        if index is None or entries[index] != env_entry(name, record["set"][name]):
            continue  # changed since it was set: the user's now
        if old is None:
            del entries[index]
        else:
            entries[index] = old
    if record["created"] and not entries:
        container.pop("env", None)


def _restore_keys(parent: dict[str, Any], key: str, record: Mapping[str, Any]) -> None:
    target = parent.get(key)
    if target is None:
        return
    for name, old in record["previous"].items():
        if target.get(name) != record["set"][name]:
            continue  # changed since it was set: the user's now
        if old is None:
            del target[name]
        else:
            target[name] = old
    if record["created"] and not target:
        del parent[key]
