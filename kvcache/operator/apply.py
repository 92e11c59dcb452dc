"""Idempotent apply of a rendered child: the merge patch that brings the live object to it.

The API server fills defaults into what the operator sends (a container's
`terminationMessagePath`, a Service's `clusterIP`, ...), so live objects are never equal to the
rendered ones: a field counts as applied when the live object covers it (desired ⊆ live). What
that comparison cannot see is a field the operator stopped rendering (a `nodeSelector` removed
from the spec): so each child records what was last applied in an annotation, as
`kubectl apply` does, and a key that record holds and the new rendering lacks is removed.

Pure functions over plain dicts; the handlers send the patches.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from typing import Any

APPLIED_ANNOTATION = "kvcache.io/applied"

Manifest = dict[str, Any]
_ABSENT = object()


def stamped(desired: Mapping[str, Any]) -> Manifest:
    """`desired` carrying its own canonical JSON (without the stamp) as the applied record."""
    record = copy.deepcopy(dict(desired))
    annotations = record.get("metadata", {}).get("annotations", {})
    annotations.pop(APPLIED_ANNOTATION, None)
    if not annotations:
        record.get("metadata", {}).pop("annotations", None)
    result = copy.deepcopy(record)
    text = json.dumps(record, sort_keys=True, separators=(",", ":"))
    result.setdefault("metadata", {}).setdefault("annotations", {})[APPLIED_ANNOTATION] = text
    return result


def apply_patch(live: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch from `live` to the stamped `desired` (empty when nothing is to change):
    desired values live lacks or differs in, values changed since the last apply (a list is sent
    whole: a merge patch cannot edit inside one), and nulls for keys the last apply set and this
    one drops. Keys neither set, such as server defaults, are left alone."""
    record = live.get("metadata", {}).get("annotations", {}).get(APPLIED_ANNOTATION)
    previous = json.loads(record) if record else None
    return _patch(live, desired, previous)


def covers(live: Any, desired: Any) -> bool:
    """Whether `live` holds everything `desired` says: maps may hold more keys, lists must have
    the same length and cover item by item, anything else must be equal."""
    if isinstance(desired, Mapping):
        return isinstance(live, Mapping) and all(
            key in live and covers(live[key], value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(live, list)
            and len(live) == len(desired)
            and all(covers(old, new) for old, new in zip(live, desired))
        )
    return live == desired


def _patch(
    live: Mapping[str, Any], desired: Mapping[str, Any], previous: Mapping[str, Any] | None
) -> dict[str, Any]:
    """`previous` is the last applied map at this level: None where there is no record (an
    object created by hand or by an older operator), so only coverage decides."""
    patch: dict[str, Any] = {}
    if previous is not None:
        patch = {key: None for key in previous if key not in desired and key in live}
    for key, value in desired.items():
        old = live.get(key)
        before = _ABSENT if previous is None else previous.get(key, _ABSENT)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            nested = _patch(old, value, before if isinstance(before, Mapping) else None)
            if nested:
                patch[key] = nested
        elif not covers(old, value) or (previous is not None and before != value):
            patch[key] = value
    return patch
