"""The Kubernetes API calls the handlers make: read, list, create, merge-patch, delete.

kopf documents no API client of its own (it leaves the choice to the operator), but it has one:
`kopf._cogs.clients.api`, the aiohttp client it watches and patches with. Using it means the
operator's calls share kopf's login (whatever `@kopf.on.login` or the in-cluster service account
provides), its re-login on 401, its retries and its timeouts, and need no second client library
(`kubernetes_asyncio` is not a dependency). That module is private, so this one is the only
place that touches it; its signatures have been stable since kopf 1.33.

Calls must run inside kopf's handlers (they find the credentials in kopf's context).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf
from kopf._cogs.clients import api, errors

Manifest = dict[str, Any]

MERGE_PATCH = {"Content-Type": "application/merge-patch+json"}


def _resource(api_version: str, plural: str) -> kopf.Resource:
    group, _, version = api_version.rpartition("/")
    return kopf.Resource(group, version, plural, namespaced=True)


CLUSTERS = _resource("kvcache.io/v1alpha1", "kvcacheclusters")
DEPLOYMENTS = _resource("apps/v1", "deployments")
STATEFULSETS = _resource("apps/v1", "statefulsets")
# The StatefulSet controller creates the disk tier's claims; the operator only grows them.
CLAIMS = _resource("v1", "persistentvolumeclaims")
# Every kind a KVCacheCluster renders (kvcache.operator.render), by apiVersion and kind.
CHILD_KINDS: dict[tuple[str, str], kopf.Resource] = {
    ("v1", "ConfigMap"): _resource("v1", "configmaps"),
    ("v1", "Service"): _resource("v1", "services"),
    ("v1", "ServiceAccount"): _resource("v1", "serviceaccounts"),
    ("apps/v1", "StatefulSet"): STATEFULSETS,
    ("apps/v1", "Deployment"): DEPLOYMENTS,
    ("policy/v1", "PodDisruptionBudget"): _resource("policy/v1", "poddisruptionbudgets"),
    ("rbac.authorization.k8s.io/v1", "Role"): _resource("rbac.authorization.k8s.io/v1", "roles"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): _resource(
        "rbac.authorization.k8s.io/v1", "rolebindings"
    ),
}


class Conflict(Exception):
    """The object changed since it was read (409): compute the change again from a fresh read."""


class Refused(Exception):
    """The API server refused a change (422 invalid, 403 forbidden, 404 on a create: no such
    namespace); the message says why."""


def resource_of(manifest: Mapping[str, Any]) -> kopf.Resource:
    return CHILD_KINDS[manifest["apiVersion"], manifest["kind"]]


def label_selector(labels: Mapping[str, str]) -> str:
    return ",".join(f"{key}={value}" for key, value in labels.items())


@dataclass(frozen=True)
class Kube:
    settings: kopf.OperatorSettings
    logger: logging.Logger

    async def read(self, resource: kopf.Resource, namespace: str, name: str) -> Manifest | None:
        """The object, or None if there is none."""
        try:
            return await api.get(
                resource.get_url(namespace=namespace, name=name), **self._context()
            )
        except errors.APINotFoundError:
            return None

    async def list(
        self, resource: kopf.Resource, namespace: str | None, labels: Mapping[str, str]
    ) -> list[Manifest]:
        """The objects carrying all of `labels`, in one namespace or (None) in all."""
        url = resource.get_url(
            namespace=namespace, params={"labelSelector": label_selector(labels)}
        )
        return list((await api.get(url, **self._context())).get("items", []))

    async def create(self, manifest: Manifest) -> Manifest:
        metadata = manifest["metadata"]
        url = resource_of(manifest).get_url(namespace=metadata["namespace"])
        try:
            return await api.post(url, payload=manifest, **self._context())
        except errors.APIConflictError as error:
            raise Conflict(
                f"{manifest['kind']} {metadata['name']} was created meanwhile"
            ) from error
        except errors.APINotFoundError as error:  # its namespace does not exist
            raise Refused(error.message or str(error)) from error
        except (errors.APIUnprocessableEntityError, errors.APIForbiddenError) as error:
            raise Refused(error.message or str(error)) from error

    async def patch(
        self,
        resource: kopf.Resource,
        namespace: str,
        name: str,
        patch: Mapping[str, Any],
        subresource: str | None = None,
        *,
        once: bool = False,
    ) -> Manifest | None:
        """Merge-patch (RFC 7386: lists are replaced whole); None if the object is gone,
        Refused if the change is. `once`: no retries, for a change whose refusal is an answer
        (kopf's client retries a 403 for about a minute: an upgrading API server answers so)."""
        url = resource.get_url(namespace=namespace, name=name, subresource=subresource)
        try:
            response = await api.request(
                "patch",
                url,
                payload=patch,
                headers=MERGE_PATCH,
                backoffs=() if once else None,
                **self._context(),
            )
            async with response:
                return await response.json()
        except errors.APINotFoundError:
            return None
        except errors.APIConflictError as error:
            raise Conflict(f"{resource.plural} {namespace}/{name} changed meanwhile") from error
        except (errors.APIUnprocessableEntityError, errors.APIForbiddenError) as error:
            raise Refused(error.message or str(error)) from error

    async def delete(
        self, resource: kopf.Resource, namespace: str, name: str, *, orphan: bool = False
    ) -> None:
        """Delete (in the background: the garbage collector removes what it owns, or with
        `orphan` leaves it running without this owner); no error if it is gone already."""
        url = resource.get_url(namespace=namespace, name=name)
        options = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Orphan"}
        try:
            await api.delete(url, payload=options if orphan else None, **self._context())
        except errors.APINotFoundError:
            pass

    def _context(self) -> dict[str, Any]:
        return {"settings": self.settings, "logger": self.logger}
