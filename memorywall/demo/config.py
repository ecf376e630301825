"""What a demo runs: the hardware, the model, the load levels, and their defaults.

Its own module so that `runner` (which starts the servers) and `report` (which prints
what their users got) both read it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from memorywall.core.deployment import DeploymentNames
from memorywall.errors import ConfigError

DEFAULT_HARDWARE = ("wse-3", "h100-sxm")
DEFAULT_MODEL = "llama-3.1-8b"
DEFAULT_LEVELS = (1, 8, 32)
DEFAULT_PROMPT_TOKENS = 128
DEFAULT_OUTPUT_TOKENS = 64


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    hardware: tuple[str, ...] = DEFAULT_HARDWARE
    model: str = DEFAULT_MODEL
    levels: tuple[int, ...] = DEFAULT_LEVELS  # closed-loop users
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    output_tokens: int = DEFAULT_OUTPUT_TOKENS
    out: Path
    keep_serving: bool = False
    dashboard: bool = False  # serve the live dashboard on the servers while the demo runs
    startup_timeout_s: float = 60.0
    stop_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.hardware:
            raise ConfigError("--hardware: name at least one profile")
        twice = sorted({h for h in self.hardware if self.hardware.count(h) > 1})
        if twice:
            raise ConfigError(f"--hardware: {', '.join(twice)} named twice")
        for hw in self.hardware:  # unknown names and models that cannot fit fail here
            DeploymentNames(hardware=hw, model=self.model).build()

    def requests(self, users: int) -> int:
        """Two rounds of requests per user, and at least four, at each level."""
        return max(4, 2 * users)
