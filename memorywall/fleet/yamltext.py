"""YAML text for JSON-shaped data, written here (PyYAML is not a dependency): the
Prometheus scrape config (`prometheus.py`) and the Kubernetes manifests
(`kubernetes.py`) both come out through `dump`.

Block mappings and lists; every string value double-quoted as JSON quotes it (a JSON
string is a YAML one, so no `yes`/`on`/number surprises). A key is written bare when it
is plainly a name, JSON-quoted otherwise.
"""

from __future__ import annotations

import json
import re
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_./-]*")
# Words YAML 1.1 readers (PyYAML) take for booleans or null even as keys.
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _key(key: Any) -> str:
    text = str(key)
    if _BARE_KEY.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    return json.dumps(text)


def _scalar(value: Any) -> str:
    if isinstance(value, bool) or value is None or isinstance(value, int | float):
        return json.dumps(value)
    return json.dumps(str(value))


def _flow(value: Any) -> str:
    """An empty collection or a scalar, inline."""
    if isinstance(value, dict):
        return "{}"
    if isinstance(value, list):
        return "[]"
    return _scalar(value)


def lines(value: Any, indent: int = 0) -> list[str]:
    """Block-style YAML lines for nested dicts and lists of scalars, dicts and lists."""
    pad = " " * indent
    out: list[str] = []
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, dict | list) and item:
                out.append(f"{pad}{_key(key)}:")
                out += lines(item, indent + 2)
            else:
                out.append(f"{pad}{_key(key)}: {_flow(item)}")
    else:
        for item in value:
            nested = lines(item, indent + 2) if isinstance(item, dict | list) and item else None
            if nested:
                # "- " takes the place of the first line's indentation.
                out.append(f"{pad}- {nested[0].lstrip()}")
                out += nested[1:]
            else:
                out.append(f"{pad}- {_flow(item)}")
    return out


def dump(value: Any, *, comment: str = "") -> str:
    """`value` as YAML text ending in a newline, `comment` lines first (as `# ...`)."""
    head = [f"# {line}".rstrip() for line in comment.splitlines()]
    return "\n".join([*head, *lines(value)]) + "\n"
