"""Rendered pods run on one machine as their containers would run on a node, for the end-to-end
test of what the operator ships.

Each pod gets its own network namespace (a veth pair to the root namespace, which routes between
pods), so a container binds `0.0.0.0` or `tcp://*:P` and listens on its pod's address alone, as
it does in Kubernetes; cluster DNS (Service and pod names) is that namespace's `/etc/hosts`
(`ip netns exec` mounts `/etc/netns/<ns>/hosts` there), the one place names map to addresses.
A container runs with exactly its rendered command and args, its env resolved as the kubelet
resolves it (values, `fieldRef`, `secretKeyRef`/`configMapKeyRef`, `envFrom`, `$(VAR)`
expansion), its emptyDir volumes and service-account token bind-mounted at their paths.

Nothing here chooses a flag: what the objects say is what runs. Needs root (`ip netns`); the
test is skipped where that is not available.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUBNET = "10.77"  # pod i lives at 10.77.i.2, its gateway (the root namespace) at 10.77.i.1
SERVICE_ACCOUNT_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def network_namespaces_work() -> str | None:
    """None when pods can be made here, else why not."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    probe = f"kvcprobe{os.getpid() % 10000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Pod:
    name: str
    namespace: str
    index: int
    netns: str

    @property
    def ip(self) -> str:
        return f"{SUBNET}.{self.index}.2"

    @property
    def gateway(self) -> str:
        return f"{SUBNET}.{self.index}.1"


@dataclass
class ObjectStore:
    """The Secrets and ConfigMaps the pods' env refers to, by (namespace, name)."""

    secrets: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    config_maps: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)

    def add(self, obj: Mapping[str, Any]) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if obj["kind"] == "Secret":
            self.secrets[key] = dict(obj.get("stringData") or {})
        elif obj["kind"] == "ConfigMap":
            self.config_maps[key] = dict(obj.get("data") or {})


_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' `$(VAR)` expansion: a defined variable is replaced, `$$` is a `$`, anything
    else is left as written."""

    def one(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return env.get(match.group(1), match.group(0))

    return _VAR.sub(one, text)


def container_env(
    pod: Pod, container: Mapping[str, Any], objects: ObjectStore, kubelet: Mapping[str, str]
) -> dict[str, str]:
    """The container's environment as the kubelet makes it: `kubelet` (the service variables
    every pod gets) first, then `envFrom`, then `env` in order (each may use the ones before)."""
    env = dict(kubelet)
    for source in container.get("envFrom") or []:
        ref = source.get("secretRef") or source.get("configMapRef")
        store = objects.secrets if "secretRef" in source else objects.config_maps
        values = store.get((pod.namespace, ref["name"]))
        if values is None:
            if ref.get("optional"):
                continue
            raise LookupError(f"pod {pod.name}: {ref['name']} is missing (CreateContainerConfig)")
        env.update(values)
    fields = {"metadata.name": pod.name, "metadata.namespace": pod.namespace,
              "status.podIP": pod.ip}  # fmt: skip
    for entry in container.get("env") or []:
        name, source = entry["name"], entry.get("valueFrom")
        if source is None:
            env[name] = expand(entry.get("value", ""), env)
            continue
        if "fieldRef" in source:
            env[name] = fields[source["fieldRef"]["fieldPath"]]
            continue
        kind = "secretKeyRef" if "secretKeyRef" in source else "configMapKeyRef"
        ref = source[kind]
        store = objects.secrets if kind == "secretKeyRef" else objects.config_maps
        value = store.get((pod.namespace, ref["name"]), {}).get(ref["key"])
        if value is None:
            if ref.get("optional"):
                continue
            raise LookupError(f"pod {pod.name}: {ref['name']}/{ref['key']} is missing")
        env[name] = value
    return env


@dataclass
class RunningContainer:
    pod: Pod
    name: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, size: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-size:]

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


class PodNetwork:
    """The pods of one test: network namespaces, their hosts files, their volumes' folders."""

    def __init__(self, workdir: Path, image_paths: tuple[Path, ...] = ()) -> None:
        """`image_paths`: the host folders that stand for the containers' image (the checkout
        and its virtualenv), which a volume mounted over a folder holding them (an emptyDir at
        /tmp, where a CI checkout may live) must not hide."""
        self._workdir = workdir
        self._keep = tuple(dict.fromkeys([*image_paths, workdir]))
        self._tag = f"kvc{os.getpid() % 1000}"
        self._stages = Path("/run") / f"kvcache-e2e-{self._tag}"
        self.pods: dict[str, Pod] = {}
        self.names: dict[str, str] = {}  # DNS name -> address
        self.running: list[RunningContainer] = []

    def add_pod(self, name: str, namespace: str) -> Pod:
        index = len(self.pods) + 1
        pod = Pod(name, namespace, index, f"{self._tag}p{index}")
        host_end, pod_end = f"{self._tag}h{index}", f"{self._tag}c{index}"
        commands = [
            ["ip", "netns", "add", pod.netns],
            ["ip", "link", "add", host_end, "type", "veth", "peer", "name", pod_end],
            ["ip", "link", "set", pod_end, "netns", pod.netns],
            ["ip", "addr", "add", f"{pod.gateway}/24", "dev", host_end],
            ["ip", "link", "set", host_end, "up"],
            *(
                ["ip", "netns", "exec", pod.netns, *command]
                for command in (
                    ["ip", "addr", "add", f"{pod.ip}/24", "dev", pod_end],
                    ["ip", "link", "set", pod_end, "up"],
                    ["ip", "link", "set", "lo", "up"],
                    # other pods through the root namespace; no default route: nothing leaves
                    ["ip", "route", "add", f"{SUBNET}.0.0/16", "via", pod.gateway],
                )
            ),
        ]
        for command in commands:
            subprocess.run(command, check=True, capture_output=True)
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
        self.pods[name] = pod
        self.names[name] = pod.ip
        self._write_hosts()
        return pod

    def add_name(self, name: str, pod: Pod) -> None:
        """Cluster DNS: `name` (a Service, or a pod's name under its headless Service)."""
        self.names[name] = pod.ip
        self._write_hosts()

    def _write_hosts(self) -> None:
        lines = ["127.0.0.1 localhost", *(f"{ip} {name}" for name, ip in self.names.items())]
        for pod in self.pods.values():
            folder = Path("/etc/netns") / pod.netns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(lines) + "\n")

    def start(
        self,
        pod: Pod,
        container: Mapping[str, Any],
        volumes: list[Mapping[str, Any]],
        objects: ObjectStore,
        base_env: Mapping[str, str],
        kubelet_env: Mapping[str, str] | None = None,
        service_account: Mapping[str, str] | None = None,
    ) -> RunningContainer:
        """Run one container of `pod` with exactly its command and args. `base_env` stands for
        the image's own environment (PATH, HOME); `service_account` (file name -> text) is the
        token volume the kubelet mounts in pods that run under a service account."""
        env = {**base_env, **container_env(pod, container, objects, kubelet_env or {})}
        argv = [expand(part, env) for part in [*container.get("command", []),
                                               *container.get("args", [])]]  # fmt: skip
        if not argv:
            raise ValueError(f"{pod.name}/{container['name']}: no command (an image default)")
        mounts = self._mounts(pod, container, volumes, service_account)
        script = mount_script(mounts, self._keep, self._stages / f"{pod.netns}-{len(self.running)}")
        log = self._workdir / f"{pod.name}-{container['name']}.log"
        with log.open("ab") as out:
            process = subprocess.Popen(
                ["ip", "netns", "exec", pod.netns, "sh", "-c", script + 'exec "$@"', "sh", *argv],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        running = RunningContainer(pod, container["name"], process, log)
        self.running.append(running)
        return running

    def _mounts(
        self,
        pod: Pod,
        container: Mapping[str, Any],
        volumes: list[Mapping[str, Any]],
        service_account: Mapping[str, str] | None,
    ) -> list[tuple[str, str]]:
        by_name = {volume["name"]: volume for volume in volumes}
        mounts = []
        for mount in container.get("volumeMounts") or []:
            volume = by_name[mount["name"]]
            if "emptyDir" not in volume:
                raise ValueError(f"{pod.name}: volume {mount['name']} is not an emptyDir")
            folder = Path(tempfile.mkdtemp(prefix=f"{pod.name}-{mount['name']}-",
                                           dir=self._workdir))  # fmt: skip
            mounts.append((str(folder), mount["mountPath"]))
        if service_account is not None:
            folder = Path(tempfile.mkdtemp(prefix=f"{pod.name}-sa-", dir=self._workdir))
            for file_name, text in service_account.items():
                (folder / file_name).write_text(text)
            mounts.append((str(folder), SERVICE_ACCOUNT_PATH))
        return mounts

    def close(self) -> None:
        for running in reversed(self.running):
            running.stop(timeout_s=15)
        for index, pod in enumerate(self.pods.values(), start=1):
            subprocess.run(["ip", "netns", "del", pod.netns], capture_output=True)
            subprocess.run(["ip", "link", "del", f"{self._tag}h{index}"], capture_output=True)
            shutil.rmtree(Path("/etc/netns") / pod.netns, ignore_errors=True)
        shutil.rmtree(self._stages, ignore_errors=True)  # empty folders: the mounts died with
        # the pods' mount namespaces


def mount_script(mounts: list[tuple[str, str]], keep: tuple[Path, ...], stage: Path) -> str:
    """Shell steps, run in the pod's own mount namespace, that bind each volume's folder at its
    mount path. The `keep` folders are first bound under `stage` (outside every mount path) and
    the volumes bound from there, then bound back at their own paths if a volume covered them:
    a volume at /tmp hides the host's /tmp in the pod, as an emptyDir hides the image's."""

    def bind(source: str | Path, target: str | Path) -> str:
        source, target = shlex.quote(str(source)), shlex.quote(str(target))
        return f"mkdir -p {target} && mount --bind {source} {target} && "

    def staged(path: Path) -> Path:
        for index, folder in enumerate(keep):
            if path.is_relative_to(folder):
                return stage / str(index) / path.relative_to(folder)
        return path

    targets = [Path(target) for _, target in mounts]
    steps = [bind(folder, stage / str(index)) for index, folder in enumerate(keep)]
    steps += [bind(staged(Path(source)), target) for source, target in mounts]
    steps += [
        bind(stage / str(index), folder)
        for index, folder in enumerate(keep)
        if any(folder.is_relative_to(target) for target in targets)
    ]
    return "".join(steps) if mounts else ""
