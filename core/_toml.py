"""Reading `{ value, unit, source }` quantities from TOML tables; errors name the field."""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memorywall.errors import ConfigError


def load_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file; a syntax error becomes a one-line ConfigError."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


@dataclass
class QuantityReader:
    """Reads quantities from one file and keeps each one's source, keyed by dotted field name."""

    origin: str
    sources: dict[str, str] = field(default_factory=dict)

    def table(
        self, parent: dict[str, Any], key: str, prefix: str = "", *, optional: bool = False
    ) -> dict[str, Any]:
        name = f"{prefix}{key}"
        value = parent.get(key)
        if value is None and optional:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{self.origin}: [{name}]: missing table")
        return value

    def text(self, parent: dict[str, Any], key: str, prefix: str = "") -> str:
        value = parent.get(key)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.origin}: {prefix}{key}: expected a non-empty string")
        return value

    def quantity(
        self,
        parent: dict[str, Any],
        key: str,
        unit: str,
        prefix: str = "",
        *,
        minimum: float = 0.0,
        strict: bool = True,
        maximum: float | None = None,
    ) -> float:
        """Return `parent[key].value`, checking its unit, its range and that it cites a source."""
        name = f"{prefix}{key}"
        entry = parent.get(key)
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{self.origin}: {name}: expected {{ value = ..., unit = {unit!r}, source = ... }}"
            )
        value = entry.get("value")
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{self.origin}: {name}.value: expected a number, got {value!r}")
        if entry.get("unit") != unit:
            raise ConfigError(
                f"{self.origin}: {name}.unit: expected {unit!r}, got {entry.get('unit')!r}"
            )
        source = entry.get("source")
        if not isinstance(source, str) or not source.strip():
            raise ConfigError(f"{self.origin}: {name}.source: every constant must cite a source")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{self.origin}: {name}.value: must be finite, got {value!r}")
        too_small = value <= minimum if strict else value < minimum
        if too_small or (maximum is not None and value > maximum):
            bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
            if maximum is not None:
                bound += f" and <= {maximum:g}"
            raise ConfigError(f"{self.origin}: {name}.value: must be {bound}, got {value:g}")
        self.sources[name] = source.strip()
        return value
