"""LoRA serving the vLLM way: adapter folders, the served adapters, and the batch rule.

- `read_adapter`: a PEFT adapter folder's `adapter_config.json` gives its rank `r` and
  `target_modules`; its size comes from the model's shape (`core.lora`). Errors are
  vLLM's wording, as `InvalidRequestError` (400 / exit 2).
- `LoraRegistry`: the adapters a server serves by name (`--lora-modules`, then
  `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`); fronts resolve a request's
  `model` through it and put the adapter on `Request.lora`.
- `LoraSlots`: the scheduler's hook. At most `max_loras` distinct adapters run in one
  batch; a waiting request whose adapter would be one too many stays queued while later
  ones go (vLLM's scheduler skips it and keeps its place). The devices hold `max_loras`
  adapters, least recently used evicted first; a step whose batch needs one that is not
  held loads it first (`LoraCost.load_s`: its bytes over the host link), and every step
  with adapters pays their kernels (`LoraCost.step`).
"""

from __future__ import annotations

import itertools
import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from memorywall.core import Deployment, ModelShape, StepCost
from memorywall.core.lora import LoraAdapter, LoraCost, adapter_params, target_modules
from memorywall.errors import ConfigError, InvalidRequestError

if TYPE_CHECKING:
    from memorywall.server.engine.scheduler import EngineCore

# vLLM's `--max-lora-rank` choices.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
ADAPTER_CONFIG = "adapter_config.json"


class LoraError(InvalidRequestError):
    """A bad adapter, name or rank: 400, as vLLM answers its load and unload endpoints."""


@dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """`--enable-lora` and its limits (vLLM's defaults)."""

    max_loras: int = 1
    max_lora_rank: int = 16
    modules: tuple[tuple[str, str], ...] = ()  # (name, path) served from the start

    def __post_init__(self) -> None:
        if self.max_loras < 1:
            raise ConfigError(f"max_loras: must be >= 1, got {self.max_loras}")
        if self.max_lora_rank not in LORA_RANKS:
            raise ConfigError(
                f"max_lora_rank: expected one of {', '.join(map(str, LORA_RANKS))}, "
                f"got {self.max_lora_rank}"
            )


def parse_module(text: str) -> tuple[str, str]:
    """`name=path` (vLLM's `--lora-modules`); ConfigError otherwise."""
    name, sep, path = text.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ConfigError(f"--lora-modules: expected name=path, got {text!r}")
    return name.strip(), path.strip()


def read_adapter(
    name: str, path: str, model: ModelShape, max_rank: int, lora_id: int
) -> LoraAdapter:
    """The adapter in PEFT folder `path`; LoraError for a missing or bad folder or a rank
    above `max_rank`."""
    config_path = Path(path) / ADAPTER_CONFIG
    if not config_path.is_file():
        raise LoraError(f"Loading lora {name} failed: No adapter found for {path}")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoraError(
            f"Loading lora {name} failed: {config_path}: not valid JSON ({e})"
        ) from None
    if not isinstance(config, dict):
        raise LoraError(f"Loading lora {name} failed: {config_path}: expected a JSON object")
    rank = config.get("r")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise LoraError(f"Loading lora {name} failed: {config_path}: r: expected an integer >= 1")
    if rank > max_rank:
        raise LoraError(f"LoRA rank {rank} is greater than max_lora_rank {max_rank}.")
    try:
        modules = target_modules(config.get("target_modules"))
        params = adapter_params(model, rank, modules)
    except ConfigError as e:
        raise LoraError(f"Loading lora {name} failed: {config_path}: {e}") from None
    return LoraAdapter(name=name, lora_id=lora_id, rank=rank, target_modules=modules, params=params)


@dataclass(frozen=True, slots=True)
class Served:
    """An adapter the server serves, and where it came from (`/v1/models`' `root`)."""

    adapter: LoraAdapter
    path: str


class LoraRegistry:
    """Adapters served by name. `base`: the base model's name (no adapter may take it)."""

    def __init__(self, config: LoraConfig, model: ModelShape, base: str) -> None:
        self.config = config
        self._model = model
        self._base = base
        self._ids = itertools.count(1)
        self._served: dict[str, Served] = {}
        for name, path in config.modules:
            try:
                self.load(name, path)
            except LoraError as e:
                raise ConfigError(f"--lora-modules: {e}") from None

    def load(self, name: str, path: str) -> LoraAdapter:
        """Serve the adapter in `path` as `name`; LoraError if taken or bad."""
        if name in self._served or name == self._base:
            raise LoraError(f"The lora adapter '{name}' has already been loaded.")
        adapter = read_adapter(name, path, self._model, self.config.max_lora_rank, next(self._ids))
        self._served[name] = Served(adapter, path)
        return adapter

    def unload(self, name: str) -> None:
        """Stop serving `name` (requests already queued with it still run); LoraError if
        not served."""
        if self._served.pop(name, None) is None:
            raise LoraError(f"The lora adapter '{name}' cannot be found.")

    def get(self, name: str) -> LoraAdapter | None:
        served = self._served.get(name)
        return served.adapter if served is not None else None

    def served(self) -> list[Served]:
        return list(self._served.values())


class LoraSlots:
    """The engine's LoRA rule: which waiting requests may join the batch, and what the
    adapters add to a step (`EngineCore` calls `admits` and `cost`)."""

    def __init__(self, max_loras: int, cost: LoraCost) -> None:
        self.max_loras = max_loras
        self._cost = cost
        # lora_id -> adapter, least recently used first: what the devices hold.
        self._resident: OrderedDict[int, LoraAdapter] = OrderedDict()
        self.loads = 0  # adapters loaded onto the devices so far
        self.load_s = 0.0  # the time those loads took

    @classmethod
    def for_deployment(cls, deployment: Deployment, max_loras: int) -> LoraSlots:
        return cls(max_loras, LoraCost(deployment))

    def admits(
        self, request_lora: LoraAdapter | None, running: Iterable[LoraAdapter | None]
    ) -> bool:
        """Whether a request for `request_lora` may join a batch of `running`'s adapters."""
        if request_lora is None:
            return True
        ids = {a.lora_id for a in running if a is not None}
        return request_lora.lora_id in ids or len(ids) < self.max_loras

    def resident(self) -> list[LoraAdapter]:
        """Adapters the devices hold, least recently used first."""
        return list(self._resident.values())

    def load_s_of(self, adapter: LoraAdapter) -> float:
        """The core's load time of `adapter`."""
        return self._cost.load_s(adapter)

    def cost(self, base: StepCost, batch: Sequence[tuple[LoraAdapter | None, int]]) -> StepCost:
        """`base` plus loading the batch's adapters the devices lack and their kernels;
        `batch`: (adapter or None, tokens) per scheduled sequence."""
        tokens: dict[int, int] = {}
        adapters: dict[int, LoraAdapter] = {}
        for adapter, n in batch:
            if adapter is not None:
                tokens[adapter.lora_id] = tokens.get(adapter.lora_id, 0) + n
                adapters[adapter.lora_id] = adapter
        if not adapters:
            return base
        resident = self._resident
        for lora_id in adapters:  # first: so none of the batch's is evicted below
            if lora_id in resident:
                resident.move_to_end(lora_id)
        loads = [a for i, a in adapters.items() if i not in resident]
        for adapter in loads:
            # The batch holds at most max_loras adapters and its resident ones are now
            # the most recently used: the oldest is not one of them.
            while len(resident) >= self.max_loras:
                resident.popitem(last=False)
            resident[adapter.lora_id] = adapter
        step = self._cost.step([(adapters[i], tokens[i]) for i in adapters], loads)
        self.loads += len(loads)
        self.load_s += step.load_s
        return replace(
            base,
            time_s=base.time_s + step.time_s,
            weight_bytes=base.weight_bytes + step.bytes,
            flops=base.flops + step.flops,
            energy_j=base.energy_j + step.energy_j,
        )


def lora_state(core: EngineCore) -> tuple[list[str], list[str]]:
    """The adapters of the running and of the waiting requests, by name, each once in
    order of appearance (vLLM's `lora_requests_info` labels)."""

    def names(seqs: Iterable) -> list[str]:
        return list(dict.fromkeys(s.request.lora.name for s in seqs if s.request.lora))

    return names(core.running), names(core.waiting)
