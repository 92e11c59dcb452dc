"""kmock's Kubernetes emulator, plus the few API server behaviours kopf and the operator rely on.

kmock's `KubernetesEmulator` stores objects as plain JSON and nothing more. A real API server
also: gives every object a uid and a resourceVersion that changes on every write (kopf tells its
own patches' echoes from newer events by it), bumps `metadata.generation` when the spec changes,
rejects a write whose `resourceVersion` precondition is stale (409) or whose JSON patch fails
its `test` ops (422, which kopf retries later), names objects created with `generateName`
(kopf's Events), filters lists by `labelSelector` (the operator prunes children found by
labels), and starts a watch where the list it follows ended, missing no change and repeating
none (kmock replays every object: kopf then handles a stale copy after its own patch, and waits
for an event that does not come). It also refuses what the operator must work around: a
StatefulSet update beyond the fields an update may change (422), a claim that shrinks (422) or
grows where its StorageClass lacks `allowVolumeExpansion` (403, the PersistentVolumeClaimResize
admission plugin), for merge patches; and an object deleted with `propagationPolicy: Orphan`
stays a moment, held by the `orphan` finalizer, while the garbage collector releases what it
owns. This class adds exactly that.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import jsonpatch
import kmock
from json_merge_patch import apply_merge_patch

from kvcache.core.config import parse_bytes

STORAGE_CLASSES = "storage.k8s.io/v1/storageclasses"
ORPHANING_S = 0.3  # how long the garbage collector takes to release an orphaning object
# apps/v1 validation: the only parts of a StatefulSet's spec an update may change. Written out
# here, not imported from kvcache.operator.volumes: the emulator stands for the API server, so the
# operator's own list must not be what checks it.
STATEFULSET_UPDATABLE = (
    "replicas",
    "ordinals",
    "template",
    "updateStrategy",
    "persistentVolumeClaimRetentionPolicy",
    "minReadySeconds",
)


class KubernetesEmulator(kmock.KubernetesEmulator):
    revision = 0  # the last resourceVersion given out, across all objects (etcd's revision)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        self.collecting: set[asyncio.Task[None]] = set()

    def next_version(self) -> str:
        self.revision += 1
        return str(self.revision)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # No await before the parent takes its lock: the check and the write stay atomic.
        if request.resource is not None and request.action == kmock.action.CREATE:
            self._created(request.data)
        elif (
            request.resource is not None
            and request.action == kmock.action.DELETE
            and isinstance(request.data, dict)
            and request.data.get("propagationPolicy") == "Orphan"
        ):
            self._orphaning(request)
        elif request.resource is not None and request.action == kmock.action.UPDATE:
            try:
                current = self.objects[request.resource, request.namespace, request.name]
            except KeyError:
                current = None
            if current is not None and not current.deleted:
                self._updated(request, current.raw)
        return await super()._handle(request)

    async def _serve_list(self, request: kmock.Request) -> dict[str, Any]:
        listing = await super()._serve_list(request)
        listing["metadata"]["resourceVersion"] = str(self.revision)
        selector = request.params.get("labelSelector")
        if selector:
            wanted = dict(term.split("=", 1) for term in selector.split(","))
            listing["items"] = [
                item
                for item in listing["items"]
                if wanted.items() <= item.get("metadata", {}).get("labels", {}).items()
            ]
        return listing

    async def _serve_watch(self, request: kmock.Request) -> AsyncIterator[Any]:
        since = request.params.get("resourceVersion", "")
        since_revision = int(since) if since.isdigit() else 0
        yield b""  # the headers: the stream has begun
        bus = self._buses[request.resource]
        async with self._lock:  # writes take it too: nothing falls between snapshot and stream
            mark = await bus.mark()
            changed = [
                obj.raw
                for (resource, namespace, _), obj in self.objects.items()
                if resource == request.resource
                and not obj.deleted
                and request.namespace in (None, namespace)
                and int(obj.raw["metadata"].get("resourceVersion", "0")) > since_revision
            ]
        try:
            for raw in changed:
                yield {"type": "ADDED", "object": raw}
            async for event in bus.stream(since=mark):
                namespace = event.get("object", {}).get("metadata", {}).get("namespace")
                if request.namespace in (None, namespace):
                    yield event
        finally:
            await bus.unmark(mark)

    def _created(self, data: dict[str, Any]) -> None:
        metadata = data.setdefault("metadata", {})
        version = self.next_version()
        if "name" not in metadata and "generateName" in metadata:
            metadata["name"] = f"{metadata['generateName']}{version}"
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("generation", 1)
        metadata["resourceVersion"] = version

    def _updated(self, request: kmock.Request, current: dict[str, Any]) -> None:
        spec_changed = request.subresource is None
        if isinstance(request.data, list):  # a JSON patch: its `test` ops are its preconditions
            try:
                jsonpatch.apply_patch(current, request.data)
            except jsonpatch.JsonPatchException as error:
                raise kmock.KubernetesError(
                    status=422, reason="Invalid", message=str(error)
                ) from error
            version = self.next_version()
            request.data.append(
                {"op": "add", "path": "/metadata/resourceVersion", "value": version}
            )
            if spec_changed and any(op.get("path", "").startswith("/spec") for op in request.data):
                generation = current["metadata"].get("generation", 0) + 1
                request.data.append(
                    {"op": "add", "path": "/metadata/generation", "value": generation}
                )
            return
        if spec_changed and request.resource.plural == "statefulsets":
            self._check_statefulset(current, request.data)
        if spec_changed and request.resource.plural == "persistentvolumeclaims":
            self._check_claim(current, request.data)
        metadata = request.data.setdefault("metadata", {})
        expected = metadata.get("resourceVersion")
        if expected is not None and expected != current["metadata"].get("resourceVersion"):
            raise kmock.KubernetesError(
                status=409, reason="Conflict", message="the object has been modified"
            )
        metadata["resourceVersion"] = self.next_version()
        if spec_changed and "spec" in request.data:
            metadata["generation"] = current["metadata"].get("generation", 0) + 1

    def _check_statefulset(self, current: dict[str, Any], patch: dict[str, Any]) -> None:
        def fixed(statefulset: dict[str, Any]) -> dict[str, Any]:
            spec = statefulset.get("spec", {})
            return {key: value for key, value in spec.items() if key not in STATEFULSET_UPDATABLE}

        if fixed(apply_merge_patch(current, patch)) != fixed(current):
            raise kmock.KubernetesError(
                status=422,
                reason="Invalid",
                message="spec: Forbidden: updates to statefulset spec for fields other than "
                + ", ".join(f"'{key}'" for key in STATEFULSET_UPDATABLE)
                + " are forbidden",
            )

    def _check_claim(self, current: dict[str, Any], patch: dict[str, Any]) -> None:
        def size(claim: dict[str, Any]) -> str | None:
            return claim.get("spec", {}).get("resources", {}).get("requests", {}).get("storage")

        asked, held = size(patch), size(current)
        if asked is None or held is None or parse_bytes(asked) == parse_bytes(held):
            return
        if parse_bytes(asked) < parse_bytes(held):
            raise kmock.KubernetesError(
                status=422,
                reason="Invalid",
                message="spec.resources.requests.storage: Forbidden: field can not be less "
                "than previous value",
            )
        try:
            storage_class = self.objects[
                STORAGE_CLASSES, None, current["spec"].get("storageClassName")
            ].raw
        except KeyError:
            storage_class = {}
        if not storage_class.get("allowVolumeExpansion"):
            raise kmock.KubernetesError(
                status=403,
                reason="Forbidden",
                message="only dynamically provisioned pvc can be resized and the storageclass "
                "that provisions the pvc must support resize",
            )

    def _orphaning(self, request: kmock.Request) -> None:
        """Hold the object with the `orphan` finalizer (the parent then only marks it deleted),
        and release it a moment later, as the garbage collector does."""
        try:
            current = self.objects[request.resource, request.namespace, request.name]
        except KeyError:
            return
        if current.deleted:
            return
        finalizers = current.raw["metadata"].get("finalizers", [])
        current.patch({"metadata": {"finalizers": [*finalizers, "orphan"]}})
        task = asyncio.create_task(self._collect(request.url.path))
        self.collecting.add(task)
        task.add_done_callback(self.collecting.discard)

    async def _collect(self, path: str) -> None:
        await asyncio.sleep(ORPHANING_S)
        async with self.request("PATCH", path, json={"metadata": {"finalizers": []}}) as response:
            assert response.status == 200, await response.text()
