"""Numeric formats for weights and KV cache."""

from __future__ import annotations

from enum import Enum

from memorywall.errors import ConfigError


class Precision(Enum):
    """A storage format and its size in bytes per value.

    fp4 is NVFP4: 4-bit values plus one 8-bit scale per 16 values, 4.5 bits.
    """

    BF16 = "bf16"
    FP8 = "fp8"
    FP4 = "fp4"

    @property
    def bytes_per_value(self) -> float:
        return _BYTES[self]

    @classmethod
    def parse(cls, text: str, *, field: str) -> Precision:
        try:
            return cls(text.lower())
        except ValueError:
            names = ", ".join(p.value for p in cls)
            raise ConfigError(f"{field}: unknown precision {text!r} (valid: {names})") from None


_BYTES = {Precision.BF16: 2.0, Precision.FP8: 1.0, Precision.FP4: 4.5 / 8}
