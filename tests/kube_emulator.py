"""kmock's Kubernetes emulator, plus the few API server behaviours kopf and the operator rely on.

kmock's `KubernetesEmulator` stores objects as plain JSON and nothing more. A real API server
also: gives every object a uid and a resourceVersion that changes on every write (kopf tells its
own patches' echoes from newer events by it), bumps `metadata.generation` when the spec changes,
rejects a write whose `resourceVersion` precondition is stale (409) or whose JSON patch fails
its `test` ops (422, which kopf retries later), names objects created with `generateName`
(kopf's Events), filters lists by `labelSelector` (the operator prunes children found by
labels), and starts a watch where the list it follows ended, missing no change and repeating
none (kmock replays every object: kopf then handles a stale copy after its own patch, and waits
for an event that does not come). This class adds exactly that.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import jsonpatch
import kmock


class KubernetesEmulator(kmock.KubernetesEmulator):
    revision = 0  # the last resourceVersion given out, across all objects (etcd's revision)

    def next_version(self) -> str:
        self.revision += 1
        return str(self.revision)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # No await before the parent takes its lock: the check and the write stay atomic.
        if request.resource is not None and request.action == kmock.action.CREATE:
            self._created(request.data)
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
        metadata = request.data.setdefault("metadata", {})
        expected = metadata.get("resourceVersion")
        if expected is not None and expected != current["metadata"].get("resourceVersion"):
            raise kmock.KubernetesError(
                status=409, reason="Conflict", message="the object has been modified"
            )
        metadata["resourceVersion"] = self.next_version()
        if spec_changed and "spec" in request.data:
            metadata["generation"] = current["metadata"].get("generation", 0) + 1
