"""LoRA adapters: their size from the model's shape, their load time and their step cost.

A LoRA adapter adds, to each targeted linear layer `W` (in -> out), two small matrices
A (in -> r) and B (r -> out): r * (in + out) parameters per targeted module per layer.
vLLM keeps them in the model's activation dtype (bf16) whatever the base weights'
precision, and shards them across a tensor-parallel group as the base layer is sharded.

- `adapter_params`: the sum over target modules of r * (in + out) x the layers holding
  that module (attention modules: every layer; MLP modules: the dense layers, since the
  routed experts of an MoE layer carry no adapter weights here, as in vLLM until its
  fused-MoE LoRA).
- `LoraCost.load_s`: loading an adapter onto the devices is its bytes over each device's
  host link (each device its share, all at once), as `Deployment.weight_load_s`.
- `LoraCost.step`: a step whose batch holds adapters reads each adapter's A and B once
  (its bytes over the resident memory's weight bandwidth) and multiplies each of its
  tokens through them (2 FLOPs per parameter per token: r * (in + out) multiply-adds per
  module), as one extra kernel per adapter-batched GEMM (vLLM's punica kernels): an
  explicit term the engine adds to the base step's time.

Pure: no I/O (reading `adapter_config.json` is the engine's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from memorywall.core.cost import combine_s
from memorywall.core.deployment import Deployment
from memorywall.core.model import ModelShape
from memorywall.core.precision import Precision
from memorywall.errors import ConfigError

LORA_PRECISION = Precision.BF16  # vLLM's lora_dtype "auto": the activation dtype
_PJ = 1e-12
_BITS = 8.0

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj", "gate_up_proj")
KNOWN_MODULES = ATTENTION_MODULES + MLP_MODULES
# PEFT's shorthand for every linear layer but the LM head.
ALL_LINEAR = "all-linear"
_ALL_LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True, slots=True)
class LoraAdapter:
    """One adapter as the engine schedules it. `lora_id` tells apart two loads of one name
    (vLLM's lora_int_id): an adapter unloaded and loaded again is loaded onto the devices
    again."""

    name: str
    lora_id: int
    rank: int
    target_modules: tuple[str, ...]
    params: int  # A and B over every targeted module and layer

    @property
    def bytes(self) -> float:
        return self.params * LORA_PRECISION.bytes_per_value


def target_modules(raw: object) -> tuple[str, ...]:
    """PEFT's `target_modules`: a list of module names, or "all-linear"; ConfigError else."""
    if raw == ALL_LINEAR:
        return _ALL_LINEAR_MODULES
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list | tuple) or not raw or not all(isinstance(m, str) for m in raw):
        raise ConfigError(f"target_modules: expected a list of module names, got {raw!r}")
    unknown = [m for m in raw if m not in KNOWN_MODULES]
    if unknown:
        raise ConfigError(
            f"target_modules: {', '.join(unknown)} not modelled "
            f"(known: {', '.join(KNOWN_MODULES)}, or {ALL_LINEAR!r})"
        )
    return tuple(dict.fromkeys(raw))  # PEFT dedupes too


def module_shape(model: ModelShape, module: str) -> tuple[int, int, int]:
    """(in, out, layers) of one targeted linear module."""
    h, hd = model.hidden_size, model.head_dim
    q, kv = model.n_heads * hd, model.n_kv_heads * hd
    inter = model.dense_intermediate
    if module in ATTENTION_MODULES and model.mla is not None:
        raise ConfigError(f"target_modules: {module}: LoRA on MLA attention is not modelled")
    shapes = {
        "q_proj": (h, q, model.n_layers),
        "k_proj": (h, kv, model.n_layers),
        "v_proj": (h, kv, model.n_layers),
        "o_proj": (q, h, model.n_layers),
        "qkv_proj": (h, q + 2 * kv, model.n_layers),
        "gate_proj": (h, inter, model.n_dense_layers),
        "up_proj": (h, inter, model.n_dense_layers),
        "down_proj": (inter, h, model.n_dense_layers),
        "gate_up_proj": (h, 2 * inter, model.n_dense_layers),
    }
    if module not in shapes:
        raise ConfigError(f"target_modules: {module}: not modelled")
    return shapes[module]


def adapter_params(model: ModelShape, rank: int, modules: Sequence[str]) -> int:
    """sum over modules of r * (in + out) x layers."""
    if rank < 1:
        raise ConfigError(f"r: must be >= 1, got {rank}")
    total = 0
    for module in modules:
        n_in, n_out, layers = module_shape(model, module)
        total += rank * (n_in + n_out) * layers
    return total


@dataclass(frozen=True, slots=True)
class LoraStep:
    """The adapters' share of one step: seconds (loads included), bytes read, FLOPs, joules."""

    time_s: float
    load_s: float  # of `time_s`, loading adapters onto the devices
    bytes: float
    flops: float
    energy_j: float


class LoraCost:
    """Load times and per-step costs of adapters on one deployment."""

    def __init__(self, deployment: Deployment) -> None:
        d = deployment
        hw = d.hardware
        self._devices = d.devices
        self._tp = d.tensor_parallel
        self._link = hw.weight_load_link
        self._weight_bw = hw.resident.bandwidth_bytes_per_s * hw.efficiency.weight_read
        self._flops_per_s = hw.compute_peak(LORA_PRECISION) * hw.efficiency.compute
        self._overlap = hw.efficiency.overlap
        self._resident_pj = hw.resident.energy_pj_per_bit
        self._static_w = hw.static_w * d.devices

    def load_s(self, adapter: LoraAdapter) -> float:
        """Seconds to load `adapter` onto the devices: each device's share over its host
        link, all at once, plus the link's latency."""
        link = self._link
        return adapter.bytes / self._devices / link.bandwidth_bytes_per_s + link.latency_s

    def step(
        self, batch: Sequence[tuple[LoraAdapter, int]], loads: Sequence[LoraAdapter] = ()
    ) -> LoraStep:
        """The LoRA share of a step running `tokens` tokens through each `adapter`
        ((adapter, tokens) pairs, one per distinct adapter), after loading `loads` (the
        ones the devices lack): the loads one after another, then the kernels, every
        adapter's weights read once, 2 FLOPs per parameter per token, each device its
        tensor-parallel share. Energy: the reads, and static power over the time."""
        read = sum(a.bytes for a, _ in batch)
        flops = sum(2.0 * a.params * tokens for a, tokens in batch)
        memory_s = read / self._tp / self._weight_bw
        compute_s = flops / self._tp / self._flops_per_s
        kernels_s = float(combine_s(0.0, memory_s, compute_s, self._overlap, 0.0))
        load_s = sum(self.load_s(a) for a in loads)
        time_s = load_s + kernels_s
        energy_j = read * _BITS * self._resident_pj * _PJ + self._static_w * time_s
        return LoraStep(time_s=time_s, load_s=load_s, bytes=read, flops=flops, energy_j=energy_j)
