"""OpenAPI v3 schemas from frozen dataclasses, and parsing of a custom resource's dict into them.

The KVCacheCluster model is declared once, on dataclasses: each field's type, default, bounds and
description live in its `spec_field(...)`. The CRD's structural schema (`openapi_schema`) and the
operator's parser (`parse`) are both derived from that, so the API server and the operator cannot
disagree about what a valid spec is. A rule across fields (`Rule`) carries its CEL expression for
the API server and the same check as a Python predicate for the parser. Nothing here does I/O.

Field names are snake_case in Python and camelCase in the resource (`chunk_tokens` ->
`chunkTokens`), as the Kubernetes API conventions want.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

# Keys of a field's metadata; only `spec_field` writes them.
_DOC, _MINIMUM, _ENUM, _PATTERN, _ITEM_PATTERN, _MAX_ITEMS, _FORMAT, _LIST_MAP_KEYS = (
    "doc", "minimum", "enum", "pattern", "item_pattern", "max_items", "format", "list_map_keys",
)  # fmt: skip


class SpecError(ValueError):
    """Everything wrong with a resource, one problem per field (`spec.memory: ...`)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = tuple(problems)


@dataclasses.dataclass(frozen=True)
class Pattern:
    """A regular expression a string must match (ECMA-262 and RE2 alike: no lookarounds), and
    what it means, for the parser's message."""

    regex: str
    meaning: str


@dataclasses.dataclass(frozen=True)
class Rule:
    """A rule across the fields of one object. The API server runs `cel` (as an
    `x-kubernetes-validations` entry); the parser runs `holds`; both report `message`."""

    cel: str
    message: str
    holds: Callable[[Any], bool]


def spec_field(
    doc: str,
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
    minimum: int | None = None,
    enum: tuple[str, ...] | None = None,
    pattern: Pattern | None = None,
    item_pattern: Pattern | None = None,
    max_items: int | None = None,
    format: str | None = None,
    list_map_keys: tuple[str, ...] | None = None,
) -> Any:
    """A dataclass field with its description and constraints (absent from both when None)."""
    metadata = {
        _DOC: doc,
        _MINIMUM: minimum,
        _ENUM: enum,
        _PATTERN: pattern,
        _ITEM_PATTERN: item_pattern,
        _MAX_ITEMS: max_items,
        _FORMAT: format,
        _LIST_MAP_KEYS: list_map_keys,
    }
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part[:1].upper() + part[1:] for part in rest)


def _optional(tp: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, True) or (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        inner = [arg for arg in typing.get_args(tp) if arg is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"only `X | None` unions are supported, got {tp}")
        return inner[0], True
    return tp, False


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


# ----------------------------------------------------------------------------------------------
# The schema


def openapi_schema(cls: type) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a dataclass, as a CRD's `openAPIV3Schema` wants it."""
    hints = typing.get_type_hints(cls)
    properties = {
        camel(field.name): _field_schema(hints[field.name], field)
        for field in dataclasses.fields(cls)
    }
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    required = [camel(field.name) for field in dataclasses.fields(cls) if _required(field)]
    if required:
        schema["required"] = required
    rules: tuple[Rule, ...] = getattr(cls, "RULES", ())
    if rules:
        schema["x-kubernetes-validations"] = [
            {"rule": rule.cel, "message": rule.message} for rule in rules
        ]
    return schema


def _type_schema(tp: Any) -> dict[str, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"type": "number"}
    if tp is str:
        return {"type": "string"}
    if dataclasses.is_dataclass(tp):
        return openapi_schema(tp)
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        return {"type": "array", "items": _type_schema(args[0])}
    if origin is dict and args == (str, str):
        return {"type": "object", "additionalProperties": {"type": "string"}}
    if origin is dict and args == (str, Any):
        # A Kubernetes type passed through to the pods verbatim (tolerations, resources, ...):
        # the API server validates it against its own schema when the operator applies the pod.
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    raise TypeError(f"no OpenAPI schema for {tp}")


def _field_schema(tp: Any, field: dataclasses.Field) -> dict[str, Any]:
    tp, _ = _optional(tp)
    meta = field.metadata
    schema = {"description": meta[_DOC], **_type_schema(tp)}
    for key, name in ((_MINIMUM, "minimum"), (_FORMAT, "format")):
        if meta[key] is not None:
            schema[name] = meta[key]
    if meta[_PATTERN] is not None:
        schema["pattern"] = meta[_PATTERN].regex
    if meta[_ENUM] is not None:
        schema["enum"] = list(meta[_ENUM])
    if meta[_MAX_ITEMS] is not None:
        schema["maxItems"] = meta[_MAX_ITEMS]
    if meta[_ITEM_PATTERN] is not None:
        schema["items"]["pattern"] = meta[_ITEM_PATTERN].regex
    if meta[_LIST_MAP_KEYS] is not None:
        schema["x-kubernetes-list-type"] = "map"
        schema["x-kubernetes-list-map-keys"] = list(meta[_LIST_MAP_KEYS])
    if field.default not in (dataclasses.MISSING, None):
        schema["default"] = field.default
    elif dataclasses.is_dataclass(field.default_factory):
        # `{}` makes the API server create the object, then default its own fields.
        schema["default"] = {}
    return schema


# ----------------------------------------------------------------------------------------------
# Parsing


def parse(cls: type[T], data: Any, path: str) -> T:
    """`data` (a resource's dict, camelCase) as `cls`, or SpecError naming every bad field."""
    problems: list[str] = []
    parsed = _parse_object(cls, data, path, problems)
    if problems:
        raise SpecError(problems)
    return parsed


def _parse_object(cls: type[T], data: Any, path: str, problems: list[str]) -> T | None:
    if not isinstance(data, Mapping):
        problems.append(f"{path}: must be an object, got {_kind(data)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {camel(field.name): field for field in dataclasses.fields(cls)}
    before = len(problems)
    for key in data:
        if key not in fields:
            problems.append(f"{path}: unknown field {key!r} (known: {', '.join(fields)})")
    values = {}
    for key, field in fields.items():
        if data.get(key) is None:  # absent (or null, which the API server prunes): the default
            if _required(field):
                problems.append(f"{path}.{key}: required")
            continue
        tp, _ = _optional(hints[field.name])
        values[field.name] = _parse_value(tp, field.metadata, data[key], f"{path}.{key}", problems)
    if len(problems) > before:
        return None
    parsed = cls(**values)
    for rule in getattr(cls, "RULES", ()):
        if not rule.holds(parsed):
            problems.append(f"{path}: {rule.message}")
    return parsed


def _parse_value(tp: Any, meta: Mapping[str, Any], value: Any, path: str, problems: list) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return _parse_object(tp, value, path, problems)
    if origin is tuple:
        if not isinstance(value, list):
            problems.append(f"{path}: must be a list, got {_kind(value)}")
            return None
        if meta[_MAX_ITEMS] is not None and len(value) > meta[_MAX_ITEMS]:
            problems.append(f"{path}: at most {meta[_MAX_ITEMS]} items, got {len(value)}")
        item_meta = {**_NO_CONSTRAINTS, _PATTERN: meta[_ITEM_PATTERN]}
        return tuple(
            _parse_value(args[0], item_meta, item, f"{path}[{index}]", problems)
            for index, item in enumerate(value)
        )
    if origin is dict:
        if not isinstance(value, Mapping):
            problems.append(f"{path}: must be an object, got {_kind(value)}")
            return None
        if args == (str, str) and not all(isinstance(item, str) for item in value.values()):
            problems.append(f"{path}: every value must be a string")
        return copy.deepcopy(dict(value))
    return _parse_scalar(tp, meta, value, path, problems)


def _parse_scalar(tp: Any, meta: Mapping[str, Any], value: Any, path: str, problems: list) -> Any:
    # bool is an int in Python; a spec's `nodes: true` must not read as 1.
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        problems.append(f"{path}: must be an integer, got {_kind(value)}")
    elif tp is float and (isinstance(value, bool) or not isinstance(value, int | float)):
        problems.append(f"{path}: must be a number, got {_kind(value)}")
    elif tp is float:
        value = float(value)  # JSON writes 1e-3 or 2: either is a number
        if meta[_MINIMUM] is not None and value < meta[_MINIMUM]:
            problems.append(f"{path}: must be at least {meta[_MINIMUM]}, got {value}")
    elif tp is not int and not isinstance(value, tp):
        problems.append(f"{path}: must be a {_kind_of(tp)}, got {_kind(value)}")
    elif meta[_MINIMUM] is not None and value < meta[_MINIMUM]:
        problems.append(f"{path}: must be at least {meta[_MINIMUM]}, got {value}")
    elif meta[_ENUM] is not None and value not in meta[_ENUM]:
        problems.append(f"{path}: {value!r} is not one of {', '.join(meta[_ENUM])}")
    elif meta[_PATTERN] is not None and not re.search(meta[_PATTERN].regex, value):
        problems.append(f"{path}: {value!r} is not {meta[_PATTERN].meaning}")
    return value


_NO_CONSTRAINTS = {
    key: None
    for key in (_MINIMUM, _ENUM, _PATTERN, _ITEM_PATTERN, _MAX_ITEMS, _FORMAT, _LIST_MAP_KEYS)
}


def _kind_of(tp: Any) -> str:
    return {bool: "boolean", str: "string", float: "number"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}" if not isinstance(value, Mapping) else "an object"


# ----------------------------------------------------------------------------------------------
# Serializing


def to_dict(value: Any) -> Any:
    """A dataclass as the resource's dict: camelCase keys, None fields left out, tuples as lists."""
    if dataclasses.is_dataclass(value):
        return {
            camel(field.name): to_dict(getattr(value, field.name))
            for field in dataclasses.fields(value)
            if getattr(value, field.name) is not None
        }
    if isinstance(value, tuple | list):
        return [to_dict(item) for item in value]
    if isinstance(value, Mapping):
        return {key: to_dict(item) for key, item in value.items()}
    return value
