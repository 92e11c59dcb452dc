"""Engines from the Kubernetes API: the ready pods that carry the cluster's engine labels, watched
(a list, then a watch from its resourceVersion; relisted when the watch ends or expires).

A joined engine's pod names its ports in annotations the operator writes
(`kvcache.io/engine-port`, `kvcache.io/kv-events-port`, `kvcache.io/kv-replay-port`); the router
reaches it at the pod's IP. Inside a cluster the API server, token and CA come from the service
account (`KubernetesAPI.in_cluster`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from kvcache.core.engine_labels import (
    DATA_PARALLEL_ANNOTATION,
    ENGINE_PORT,
    ENGINE_PORT_ANNOTATION,
    EVENTS_PORT_ANNOTATION,
    REPLAY_PORT_ANNOTATION,
    TENANT_SALT_ENV,
)
from kvcache.router.policy import EngineEvents

log = logging.getLogger(__name__)

_SERVICE_ACCOUNT = Path("/var/run/secrets/kubernetes.io/serviceaccount")


@dataclass(frozen=True)
class DiscoveredEngine:
    name: str  # namespace/pod
    url: str
    events: EngineEvents | None
    tenant_salt: str = field(default="", repr=False)  # the operator's, in the engine's env
    dp_rank: int | None = None  # the data-parallel rank it is, in a pod that runs several


@dataclass(frozen=True)
class KubernetesAPI:
    server: str
    token: str | None = None
    ca_file: str | None = None

    @classmethod
    def in_cluster(cls, env: Mapping[str, str] = os.environ) -> KubernetesAPI:
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise ValueError("not in a Kubernetes pod: KUBERNETES_SERVICE_HOST/PORT are unset")
        token = (_SERVICE_ACCOUNT / "token").read_text().strip()
        return cls(f"https://{host}:{port}", token, str(_SERVICE_ACCOUNT / "ca.crt"))

    def session_options(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        tls = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else None
        return {"headers": headers, "connector": aiohttp.TCPConnector(ssl=tls) if tls else None}


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def engines_of(pod: dict[str, Any]) -> list[DiscoveredEngine]:
    """The engines a pod serves (one per data-parallel rank: each has its own KV cache), or
    none while it is not ready (or has no IP yet)."""
    metadata, ip = pod.get("metadata", {}), pod.get("status", {}).get("podIP")
    if not ip or metadata.get("deletionTimestamp") or not _ready(pod):
        return []
    annotations = metadata.get("annotations") or {}
    port = annotations.get(ENGINE_PORT_ANNOTATION, ENGINE_PORT)
    name = f"{metadata.get('namespace', '')}/{metadata.get('name', '')}"
    ranks, salt = _data_parallel_ranks(annotations), _tenant_salt(pod)
    engines = []
    for rank in ranks:
        events = None
        if EVENTS_PORT_ANNOTATION in annotations:
            replay = annotations.get(REPLAY_PORT_ANNOTATION)
            events = EngineEvents(
                f"tcp://{ip}:{int(annotations[EVENTS_PORT_ANNOTATION]) + rank}",
                f"tcp://{ip}:{int(replay) + rank}" if replay else None,
            )
        engines.append(
            DiscoveredEngine(
                f"{name}/dp{rank}" if len(ranks) > 1 else name,
                f"http://{ip}:{port}",
                events,
                salt,
                rank if len(ranks) > 1 else None,
            )
        )
    return engines


def _data_parallel_ranks(annotations: dict[str, str]) -> list[int]:
    """The ranks the join recorded (`kvcache.io/data-parallel-ranks`); rank 0 alone without."""
    text = annotations.get(DATA_PARALLEL_ANNOTATION, "")
    try:
        ranks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        log.warning("ignoring a malformed %s annotation: %r", DATA_PARALLEL_ANNOTATION, text)
        ranks = []
    return ranks or [0]


def _tenant_salt(pod: dict[str, Any]) -> str:
    """The chunk-key salt the operator gave the pod's engine (`KVCACHE_TENANT_SALT`, isolation
    Namespace), so the router names the chunks that engine can load; "" if it has none."""
    for container in pod.get("spec", {}).get("containers") or []:
        for entry in container.get("env") or []:
            if entry.get("name") == TENANT_SALT_ENV and isinstance(entry.get("value"), str):
                return entry["value"]
    return ""


class PodWatcher:
    """Keeps `on_change` told of the ready engines among the pods that `selector` matches in
    `namespaces`, every time that set changes."""

    def __init__(
        self,
        api: KubernetesAPI,
        namespaces: list[str],
        selector: str,
        on_change: Callable[[dict[str, DiscoveredEngine]], None],
        retry_s: float = 1.0,
    ) -> None:
        if not namespaces:
            raise ValueError("pod discovery needs at least one namespace")
        self._api, self._namespaces, self._selector = api, namespaces, selector
        self._wanted = dict(term.split("=", 1) for term in selector.split(",") if term)
        self._on_change, self._retry_s = on_change, retry_s
        self._pods: dict[str, dict[str, dict[str, Any]]] = {ns: {} for ns in namespaces}
        self._engines: dict[str, DiscoveredEngine] = {}

    async def run(self) -> None:
        options = self._api.session_options()
        async with aiohttp.ClientSession(
            headers=options["headers"], connector=options["connector"]
        ) as session:
            await asyncio.gather(*(self._follow(session, ns) for ns in self._namespaces))

    async def _follow(self, session: aiohttp.ClientSession, namespace: str) -> None:
        url = f"{self._api.server}/api/v1/namespaces/{namespace}/pods"
        while True:
            try:
                version = await self._list(session, url, namespace)
                await self._watch(session, url, namespace, version)
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as error:
                log.warning("watching pods in %s: %s; listing again", namespace, error)
            await asyncio.sleep(self._retry_s)

    async def _list(self, session: aiohttp.ClientSession, url: str, namespace: str) -> str:
        async with session.get(url, params={"labelSelector": self._selector}) as response:
            response.raise_for_status()
            listing = await response.json()
        pods = [pod for pod in listing.get("items") or [] if self._selected(pod)]
        self._pods[namespace] = {pod["metadata"]["name"]: pod for pod in pods}
        self._publish()
        return listing["metadata"]["resourceVersion"]

    async def _watch(
        self, session: aiohttp.ClientSession, url: str, namespace: str, version: str
    ) -> None:
        params = {"labelSelector": self._selector, "watch": "true", "resourceVersion": version,
                  "allowWatchBookmarks": "true"}  # fmt: skip
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with session.get(url, params=params, timeout=timeout) as response:
            response.raise_for_status()
            async for line in response.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, pod = event.get("type"), event.get("object") or {}
                if kind == "ERROR":  # e.g. 410 Gone: the version expired; list again
                    raise ValueError(f"watch ended: {pod.get('message', pod)}")
                if kind == "BOOKMARK":
                    continue
                name = pod["metadata"]["name"]
                if kind == "DELETED" or not self._selected(pod):
                    self._pods[namespace].pop(name, None)
                else:
                    self._pods[namespace][name] = pod
                self._publish()

    def _selected(self, pod: dict[str, Any]) -> bool:
        labels = pod.get("metadata", {}).get("labels") or {}
        return self._wanted.items() <= labels.items()

    def _publish(self) -> None:
        engines = {}
        for pods in self._pods.values():
            for pod in pods.values():
                for engine in engines_of(pod):
                    engines[engine.name] = engine
        if engines != self._engines:
            self._engines = engines
            self._on_change(dict(engines))
