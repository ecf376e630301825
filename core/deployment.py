"""Deployments: how a model is laid out over devices, and how much KV cache is left."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from enum import Enum
from typing import Any

from memorywall.core.hardware import DeviceKind, Hardware, load_hardware
from memorywall.core.model import ModelShape, load_model
from memorywall.core.precision import Precision
from memorywall.errors import CapacityError, ConfigError

# vLLM's default `gpu_memory_utilization`: the share of device memory the engine may use.
DEFAULT_MEMORY_UTILIZATION = 0.9
# Share of the usable memory kept free for KV cache when choosing the fewest devices.
DEFAULT_KV_RESERVE_FRACTION = 0.1
# Bytes per activation value crossing a link (activations stay bf16 in all formats here).
ACTIVATION_BYTES = 2


class Placement(Enum):
    """Where the weights live. `sram` is the wafer's name for resident."""

    RESIDENT = "resident"
    STREAM = "stream"

    @classmethod
    def parse(cls, text: str) -> Placement:
        if text in ("sram", "hbm"):
            return cls.RESIDENT
        try:
            return cls(text)
        except ValueError:
            raise ConfigError(
                f"placement: unknown {text!r} (valid: sram/resident, stream)"
            ) from None


@dataclass(frozen=True, kw_only=True)
class Speculative:
    """Speculative decoding: `draft_tokens` per step, each accepted with `acceptance_rate`."""

    draft_tokens: int
    acceptance_rate: float
    draft_model: ModelShape | None = None

    def __post_init__(self) -> None:
        if self.draft_tokens < 1:
            raise ConfigError(f"draft_tokens: must be >= 1, got {self.draft_tokens}")
        if not 0.0 <= self.acceptance_rate <= 1.0:
            raise ConfigError(f"acceptance_rate: must be in [0, 1], got {self.acceptance_rate}")

    @property
    def expected_tokens_per_step(self) -> float:
        """(1 - a^(k+1)) / (1 - a): accepted drafts plus the target's own token (Leviathan 2023)."""
        a, k = self.acceptance_rate, self.draft_tokens
        if a >= 1.0:
            return float(k + 1)
        return (1.0 - a ** (k + 1)) / (1.0 - a)


@dataclass(frozen=True, kw_only=True)
class Deployment:
    hardware: Hardware
    model: ModelShape
    devices: int
    tensor_parallel: int
    pipeline_parallel: int
    weight_precision: Precision
    kv_precision: Precision
    placement: Placement
    speculative: Speculative | None
    memory_utilization: float
    # Devices a MoE layer's experts are spread over (`expert_parallel.py`); 1: experts are
    # tensor parallel like the dense layers.
    expert_parallel: int = 1

    @property
    def weight_bytes(self) -> float:
        """Bytes of every stored weight, the draft model's included."""
        params = self.model.total_params()
        if self.speculative and self.speculative.draft_model:
            params += self.speculative.draft_model.total_params()
        return params * self.weight_precision.bytes_per_value

    @property
    def weight_load_s(self) -> float:
        """Seconds to load the weights onto the devices (startup, wake-up): each device's
        share over its host link, all devices at once, plus the link's latency. A floor:
        the weights are taken to be in the host's page cache, not read from disk."""
        link = self.hardware.weight_load_link
        return self.weight_bytes / self.devices / link.bandwidth_bytes_per_s + link.latency_s

    @property
    def kv_shards(self) -> int:
        """Ways the KV cache splits across a tensor-parallel group (the rest is replicated)."""
        return min(self.tensor_parallel, self.model.n_kv_heads)

    @property
    def kv_bytes_per_token(self) -> float:
        """Bytes one cached token occupies across all devices, replicas included.

        Counts every layer as holding the token, sliding-window layers too: an
        upper bound (vLLM's hybrid allocator frees out-of-window blocks).
        """
        m = self.model
        per_token = (
            m.n_layers * m.kv_values_per_token_per_layer() * self.kv_precision.bytes_per_value
        )
        return per_token * self.tensor_parallel / self.kv_shards

    @property
    def usable_bytes(self) -> float:
        return self.devices * self.hardware.resident.capacity_bytes * self.memory_utilization

    @property
    def resident_weight_bytes(self) -> float:
        return self.weight_bytes if self.placement is Placement.RESIDENT else 0.0

    @property
    def kv_capacity_tokens(self) -> int:
        return max(
            0, int((self.usable_bytes - self.resident_weight_bytes) / self.kv_bytes_per_token)
        )

    def describe(self) -> str:
        hw = self.hardware
        layout = (
            f"TP{self.tensor_parallel}"
            + (f" x EP{self.expert_parallel}" if self.expert_parallel > 1 else "")
            + (f" x PP{self.pipeline_parallel}" if self.pipeline_parallel > 1 else "")
        )
        spec = ""
        if self.speculative:
            s = self.speculative
            spec = f", speculative k={s.draft_tokens} a={s.acceptance_rate:g}"
        return (
            f"{self.model.name} on {self.devices} x {hw.name} ({layout}, weights "
            f"{self.weight_precision.value} {self.placement.value}, "
            f"KV {self.kv_precision.value}{spec})"
        )


def plan_deployment(
    hardware: Hardware,
    model: ModelShape,
    *,
    devices: int | None = None,
    weight_precision: Precision = Precision.BF16,
    kv_precision: Precision = Precision.BF16,
    placement: Placement = Placement.RESIDENT,
    speculative: Speculative | None = None,
    tensor_parallel: int | None = None,
    memory_utilization: float = DEFAULT_MEMORY_UTILIZATION,
    kv_reserve_fraction: float = DEFAULT_KV_RESERVE_FRACTION,
    expert_parallel: int = 1,
) -> Deployment:
    """Lay `model` over `devices` (or the fewest that hold its weights plus a KV reserve).

    `tensor_parallel` (with `devices`) picks one of `layouts` (the rest of the devices is
    the pipeline); by default tensor parallel fills the scale-up domain. `expert_parallel`
    above 1 spreads a MoE model's experts over the tensor-parallel group, which it then sets
    (devices by default: the fewest multiple of it that holds the weights).
    """
    if not 0.0 < memory_utilization <= 1.0:
        raise ConfigError(f"memory_utilization: must be in (0, 1], got {memory_utilization}")
    if not 0.0 <= kv_reserve_fraction < 1.0:
        raise ConfigError(f"kv_reserve_fraction: must be in [0, 1), got {kv_reserve_fraction}")
    if devices is not None and devices < 1:
        raise ConfigError(f"devices: must be >= 1, got {devices}")
    if tensor_parallel is not None and devices is None:
        raise ConfigError("tensor_parallel: needs devices")
    if placement is Placement.STREAM and hardware.stream is None:
        raise ConfigError(f"placement: {hardware.name} has no external weight store to stream from")
    if expert_parallel != 1:
        _check_expert_parallel(hardware, model, expert_parallel, tensor_parallel or expert_parallel)
        tensor_parallel = expert_parallel

    def build(n: int) -> Deployment:
        if tensor_parallel is None or n != devices:
            tp, pp = _layout(hardware, model, n)
        else:
            tp, pp = tensor_parallel, n // tensor_parallel
            if n % tp or (tp, pp) not in layouts(hardware, model, n):
                valid = ", ".join(f"TP{t} x PP{p}" for t, p in layouts(hardware, model, n))
                raise ConfigError(
                    f"tensor_parallel: {tp} does not split {n} x {hardware.name} for "
                    f"{model.name} (valid: {valid or 'none'})"
                )
        return Deployment(
            hardware=hardware,
            model=model,
            devices=n,
            tensor_parallel=tp,
            pipeline_parallel=pp,
            weight_precision=weight_precision,
            kv_precision=kv_precision,
            placement=placement,
            speculative=speculative,
            memory_utilization=memory_utilization,
            expert_parallel=expert_parallel,
        )

    needed = _fewest_devices(build(1), hardware, model, kv_reserve_fraction)
    if devices is None and expert_parallel > 1:
        devices = max(needed, expert_parallel)
        devices += -devices % expert_parallel  # whole pipeline stages of the EP group
    if devices is None:
        return build(needed)
    if devices < needed:
        raise CapacityError(
            f"{model.name} at {weight_precision.value} needs at least {needed} x {hardware.name} "
            f"({build(1).weight_bytes / 1e9:.1f} GB of weights plus a "
            f"{kv_reserve_fraction:.0%} KV reserve); {devices} given"
        )
    return build(devices)


def layouts(hardware: Hardware, model: ModelShape, devices: int) -> list[tuple[int, int]]:
    """Every (tensor, pipeline) split of `devices`: tensor parallel a power of two within the
    scale-up domain dividing the attention heads; wafers are one pipeline."""
    if hardware.kind is DeviceKind.WAFER:
        return [(1, devices)] if devices <= model.n_layers else []
    out = []
    tp = 1
    while tp <= min(devices, hardware.scale_up_domain):
        pp = devices // tp
        if devices % tp == 0 and model.n_heads % tp == 0 and pp <= model.n_layers:
            out.append((tp, pp))
        tp *= 2
    return out


@dataclass(frozen=True, kw_only=True)
class DeploymentNames:
    """A deployment as a command line or a spec names it: profile and model by built-in name
    or path, precisions and placement by their values. `build` is the one place a
    `Deployment` is made from names (serve, simulate, calibrate, the fleet's check, a
    disaggregated partner); the defaults here are the CLI's defaults."""

    hardware: str
    model: str
    devices: int | None = None  # None: the fewest that hold the weights and a KV reserve
    weight_precision: str = Precision.BF16.value
    kv_precision: str = Precision.BF16.value
    placement: str = "sram"  # `Placement.parse`: sram/resident/hbm, or stream
    draft_tokens: int | None = None  # speculative decoding: drafts per step; None: off
    acceptance: float = 0.7  # speculative acceptance rate
    draft_model: str | None = None  # None: free drafting
    tensor_parallel: int | None = None  # None: the default split of `devices`
    expert_parallel: int = 1  # MoE experts over this many devices (the tensor-parallel group)

    def speculative(self) -> Speculative | None:
        if self.draft_tokens is None:
            if self.draft_model is not None:
                raise ConfigError("draft_model: needs draft_tokens")
            return None
        return Speculative(
            draft_tokens=self.draft_tokens,
            acceptance_rate=self.acceptance,
            draft_model=load_model(self.draft_model) if self.draft_model else None,
        )

    def build(self) -> Deployment:
        """Load the profile and model and lay the model out; a bad name or a layout that
        does not fit is a one-line MemorywallError."""
        try:
            weight, kv = Precision(self.weight_precision), Precision(self.kv_precision)
        except ValueError as e:
            raise ConfigError(f"precision: {e}") from None
        return plan_deployment(
            load_hardware(self.hardware),
            load_model(self.model),
            devices=self.devices,
            weight_precision=weight,
            kv_precision=kv,
            placement=Placement.parse(self.placement),
            speculative=self.speculative(),
            tensor_parallel=self.tensor_parallel,
            expert_parallel=self.expert_parallel,
        )

    def resolved(self, d: Deployment) -> DeploymentNames:
        """These names with the devices and split `d` (built from them) got, so that another
        process rebuilds the same layout."""
        return replace(self, devices=d.devices, tensor_parallel=d.tensor_parallel)

    @classmethod
    def of(cls, d: Deployment) -> DeploymentNames:
        """Names for a deployment built from loaded profiles (their built-in names)."""
        spec = d.speculative
        return cls(
            hardware=d.hardware.name,
            model=d.model.name,
            devices=d.devices,
            weight_precision=d.weight_precision.value,
            kv_precision=d.kv_precision.value,
            placement=d.placement.value,
            draft_tokens=spec.draft_tokens if spec else None,
            acceptance=spec.acceptance_rate if spec else cls.acceptance,
            draft_model=spec.draft_model.name if spec and spec.draft_model else None,
            tensor_parallel=d.tensor_parallel,
            expert_parallel=d.expert_parallel,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_expert_parallel(
    hardware: Hardware, model: ModelShape, ep: int, tensor_parallel: int
) -> None:
    """A one-line `ConfigError` unless `ep` spreads whole experts over a tensor-parallel
    group within one scale-up domain (ep 1: no expert parallelism, always valid)."""
    if ep < 1:
        raise ConfigError(f"expert_parallel: must be >= 1, got {ep}")
    if ep == 1:
        return
    if hardware.kind is DeviceKind.WAFER:
        raise ConfigError(
            f"expert_parallel: {hardware.name} is a wafer (one layer pipeline, no "
            "tensor-parallel group to spread experts over)"
        )
    if ep > hardware.scale_up_domain:
        raise ConfigError(
            f"expert_parallel: {ep} exceeds {hardware.name}'s scale-up domain of "
            f"{hardware.scale_up_domain} devices"
        )
    if model.moe is None:
        raise ConfigError(f"expert_parallel: {model.name} has no routed experts")
    if model.moe.n_experts % ep:
        raise ConfigError(
            f"expert_parallel: {ep} does not divide {model.name}'s {model.moe.n_experts} experts"
        )
    if ep != tensor_parallel:
        raise ConfigError(
            f"expert_parallel: {ep} must equal the stage's tensor-parallel group "
            f"({tensor_parallel} devices)"
        )


def _fewest_devices(
    one: Deployment, hardware: Hardware, model: ModelShape, kv_reserve_fraction: float
) -> int:
    """Smallest count with a valid layout whose memory holds weights and the KV reserve."""
    if one.placement is Placement.STREAM:
        store = hardware.stream
        assert store is not None, "STREAM placement is refused for hardware without a store"
        if one.weight_bytes > store.capacity_bytes:
            raise CapacityError(
                f"{model.name}: {one.weight_bytes / 1e9:.0f} GB of weights exceed the "
                f"{store.name} store ({store.capacity_bytes / 1e9:.0f} GB)"
            )
        return 1
    per_device = (
        hardware.resident.capacity_bytes * one.memory_utilization * (1 - kv_reserve_fraction)
    )
    n = max(1, math.ceil(one.weight_bytes / per_device))
    while n <= model.n_layers * hardware.scale_up_domain:
        try:
            _layout(hardware, model, n)
            return n
        except ConfigError:
            n += 1
    raise CapacityError(f"{model.name} does not fit any layout of {hardware.name} devices")


def _layout(hardware: Hardware, model: ModelShape, n: int) -> tuple[int, int]:
    """(tensor parallel, pipeline parallel) for n devices.

    GPUs: tensor parallel within the scale-up domain, a power of two dividing
    the attention heads; pipeline across domains. Wafers: one layer pipeline.
    """
    if hardware.kind is DeviceKind.WAFER:
        tp = 1
    else:
        tp = min(n, hardware.scale_up_domain)
        if tp & (tp - 1) or model.n_heads % tp:
            raise ConfigError(
                f"devices: tensor parallel {tp} must be a power of two dividing "
                f"{model.n_heads} attention heads"
            )
    if n % tp:
        raise ConfigError(f"devices: {n} is not a multiple of the tensor-parallel size {tp}")
    pp = n // tp
    if pp > model.n_layers:
        raise ConfigError(f"devices: {pp} pipeline stages exceed {model.n_layers} layers")
    return tp, pp
