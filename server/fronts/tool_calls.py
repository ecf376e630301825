"""Synthetic tool calls: which tool a request calls, and arguments that satisfy its schema.

The emulator has no model to decide, so `tool_choice` is resolved by a digest of
the request's seed and prompt (`auto` calls a tool half the time, `required` and
a named function always, `none` never), and the arguments are generated from the
function's JSON schema: every required property, of its type, within its bounds.

The JSON-schema subset understood (for generation and for `validate`, which tests
use to check every generated argument object): `type` (one or a list), `enum`,
`const`, `properties`, `required`, `additionalProperties: false`, `items`,
`minItems`/`maxItems`, `minLength`/`maxLength`, `minimum`/`maximum`, `anyOf`/`oneOf`.
Other keywords are accepted and ignored; schemas using them may get arguments that
break them (`pattern`, `format`, `$ref`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from memorywall.server.engine.api import digest, token_text

_TYPES = ("object", "string", "integer", "number", "boolean", "array", "null")
CHARS_PER_ARGUMENT_TOKEN = 4  # the engine's prompt rule of thumb, for the arguments' text
MAX_DEPTH = 8  # nesting a generated argument may reach before optional parts are left out


class SchemaError(ValueError):
    """A tool's `parameters` is not a schema this module can satisfy."""


@dataclass(frozen=True)
class Tool:
    name: str
    parameters: dict[str, Any]


def choose_tool(tools: list[Tool], choice: Any, key: tuple) -> Tool | None:
    """The tool a request calls, or None: `choice` is the parsed `tool_choice`
    ("none", "auto", "required" or a function name); `key` seeds the decision."""
    if not tools or choice == "none":
        return None
    if choice not in ("auto", "required"):
        return next(t for t in tools if t.name == choice)
    h = digest("tool", *key)
    if choice == "auto" and h % 2:
        return None
    return tools[(h >> 1) % len(tools)]


def arguments(schema: dict[str, Any], key: tuple) -> dict[str, Any]:
    """A JSON object satisfying `schema` (an object schema), the same for the same key."""
    value = _Generator(key).value(schema, "$", 0)
    if not isinstance(value, dict):
        raise SchemaError("parameters: must describe an object")
    return value


def arguments_json(schema: dict[str, Any], key: tuple) -> str:
    return json.dumps(arguments(schema, key), separators=(", ", ": "))


class _Generator:
    def __init__(self, key: tuple) -> None:
        self.key = key

    def _draw(self, path: str, what: str) -> int:
        return digest(*self.key, path, what)

    def value(self, schema: Any, path: str, depth: int) -> Any:
        if schema is True or schema == {}:
            return self._word(path)
        if not isinstance(schema, dict):
            raise SchemaError(f"{path}: a schema must be an object")
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            options = schema["enum"]
            if not isinstance(options, list) or not options:
                raise SchemaError(f"{path}: enum must be a non-empty list")
            return options[self._draw(path, "enum") % len(options)]
        for combinator in ("anyOf", "oneOf"):
            if combinator in schema:
                options = schema[combinator]
                if not isinstance(options, list) or not options:
                    raise SchemaError(f"{path}: {combinator} must be a non-empty list")
                return self.value(options[0], path, depth)
        kind = _type_of(schema, path)
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, path, depth)
        if kind == "string":
            return self._string(schema, path)
        if kind == "integer":
            return self._integer(schema, path)
        if kind == "number":
            return self._number(schema, path)
        if kind == "boolean":
            return bool(self._draw(path, "bool") % 2)
        return None

    def _object(self, schema: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(props, dict) or not isinstance(required, list):
            raise SchemaError(f"{path}: properties must be an object and required a list")
        out: dict[str, Any] = {}
        for name in required:
            out[name] = self.value(props.get(name, {}), f"{path}.{name}", depth + 1)
        return out

    def _array(self, schema: dict[str, Any], path: str, depth: int) -> list[Any]:
        low, high = _bounds(schema, "minItems", "maxItems", path, default_high=3)
        n = low if depth >= MAX_DEPTH else low + self._draw(path, "len") % (high - low + 1)
        items = schema.get("items", {})
        return [self.value(items, f"{path}[{i}]", depth + 1) for i in range(n)]

    def _string(self, schema: dict[str, Any], path: str) -> str:
        low, high = _bounds(schema, "minLength", "maxLength", path, default_high=24)
        text = self._word(path)
        while len(text) < low:
            text += self._word(f"{path}+{len(text)}")
        return text[:high]

    def _word(self, path: str) -> str:
        return token_text(self._draw(path, "word")).strip()

    def _integer(self, schema: dict[str, Any], path: str) -> int:
        low, high = _range(schema, path)
        lo = -1000 if low is None else int(-(-low // 1))
        hi = lo + 1000 if high is None else int(high // 1)
        if low is None and high is not None:
            lo = hi - 1000
        if lo > hi:
            raise SchemaError(f"{path}: no integer between minimum and maximum")
        return lo + self._draw(path, "int") % (hi - lo + 1)

    def _number(self, schema: dict[str, Any], path: str) -> float:
        low, high = _range(schema, path)
        lo = -1000.0 if low is None else float(low)
        hi = lo + 1000.0 if high is None else float(high)
        if low is None and high is not None:
            lo = hi - 1000.0
        if lo > hi:
            raise SchemaError(f"{path}: minimum exceeds maximum")
        v = lo + (hi - lo) * ((self._draw(path, "num") % 1001) / 1000)
        return min(hi, max(lo, v))  # rounding may step just past a bound


def _type_of(schema: dict[str, Any], path: str) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind is None:
        kind = "object" if "properties" in schema else "string"
    if kind not in _TYPES:
        raise SchemaError(f"{path}: unknown type {kind!r}")
    return kind


def _bounds(
    schema: dict[str, Any], low_key: str, high_key: str, path: str, *, default_high: int
) -> tuple[int, int]:
    low, high = schema.get(low_key, 0), schema.get(high_key)
    for name, v in ((low_key, low), (high_key, high)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise SchemaError(f"{path}: {name} must be a non-negative integer")
    high = max(low, default_high) if high is None else high
    if low > high:
        raise SchemaError(f"{path}: {low_key} exceeds {high_key}")
    return low, high


def _range(schema: dict[str, Any], path: str) -> tuple[float | None, float | None]:
    low, high = schema.get("minimum"), schema.get("maximum")
    for name, v in (("minimum", low), ("maximum", high)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise SchemaError(f"{path}: {name} must be a number")
    return low, high


def validate(value: Any, schema: Any, path: str = "$") -> list[str]:
    """Where `value` breaks `schema` (the subset above); empty when it conforms."""
    if schema is True or schema == {}:
        return []
    errors: list[str] = []
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: not the const")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: not in enum")
    for combinator in ("anyOf", "oneOf"):
        if combinator in schema and all(validate(value, s, path) for s in schema[combinator]):
            errors.append(f"{path}: matches none of {combinator}")
    kinds = schema.get("type")
    if kinds is not None:
        kinds = kinds if isinstance(kinds, list) else [kinds]
        if not any(_is(value, k) for k in kinds):
            return [*errors, f"{path}: not of type {kinds}"]
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [f"{path}: missing {n!r}" for n in schema.get("required", []) if n not in value]
        for name, v in value.items():
            if name in props:
                errors += validate(v, props[name], f"{path}.{name}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected {name!r}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1e18):
            errors.append(f"{path}: {len(value)} items out of bounds")
        for i, v in enumerate(value):
            errors += validate(v, schema.get("items", {}), f"{path}[{i}]")
    if isinstance(value, str) and not (
        schema.get("minLength", 0) <= len(value) <= schema.get("maxLength", math.inf)
    ):
        errors.append(f"{path}: length {len(value)} out of bounds")
    if _is(value, "number") and not (
        schema.get("minimum", -math.inf) <= value <= schema.get("maximum", math.inf)
    ):
        errors.append(f"{path}: {value} out of bounds")
    return errors


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    python = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}
    return isinstance(value, python[kind])
