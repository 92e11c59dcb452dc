"""JSON merge patches (RFC 7386) between two versions of an object: what to send the API server.

A merge patch names changed keys, sets removed ones to null and replaces lists whole. That suits
the engine injection, which knows the exact object it wants and must not touch anything else.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


def diff(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that turns `current` into `desired` (empty when they are equal).
    `desired` holds no nulls: in a merge patch a null means "remove"."""
    patch: dict[str, Any] = {key: None for key in current if key not in desired}
    for key, value in desired.items():
        old = current.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            nested = diff(old, value)
            if nested:
                patch[key] = nested
        elif key not in current or old != value:
            patch[key] = value
    return patch


def apply(current: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """`current` with `patch` applied, as the API server applies it (`current` is left as is)."""
    result = copy.deepcopy(dict(current))
    for key, value in patch.items():
        old = result.get(key)
        if value is None:
            result.pop(key, None)
        elif isinstance(value, Mapping):
            result[key] = apply(old if isinstance(old, Mapping) else {}, value)
        else:
            result[key] = copy.deepcopy(value)
    return result
