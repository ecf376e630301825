"""Hardware profiles: TOML data files loaded into validated frozen dataclasses.

Every number in a profile is `{ value, unit, source }`. Efficiency factors,
latency floors and kernel costs come from a calibration file named by the
profile's `calibration` key (written by `benchmarks/calibrate.py`); a profile
may override any of them inline. Bandwidths are decimal (1 TB/s = 1e12 B/s).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from importlib import resources
from pathlib import Path
from typing import Any

from memorywall.core._toml import QuantityReader, load_toml
from memorywall.core.precision import Precision
from memorywall.errors import ConfigError, NotFoundError

_PROFILES = resources.files("memorywall.core") / "profiles"
_CALIBRATIONS = resources.files("memorywall.core") / "calibration"


class DeviceKind(Enum):
    """What a device is, for the layout: GPUs and ASICs split layers by tensor parallel within
    their scale-up domain; a wafer runs as one layer pipeline (no tensor parallel)."""

    GPU = "gpu"
    WAFER = "wafer"
    ASIC = "asic"  # a TPU, Maia, an LPU: laid out like a GPU, its limits said in `notes`


class ExecutionMode(Enum):
    """How the serving stack launches a step's kernels: which steps pay the host launch floor
    (`LatencyFloors.launch_per_layer_s` per layer).

    EAGER: every step launched op by op from Python; every step pays the floor.
    DECODE_GRAPHS: decode-only steps replayed from CUDA graphs, steps with prefill launched op
        by op (vLLM v0; the harness of h100-llama8b-measured.json).
    GRAPHS: every step replayed from captured graphs or a compiled program (vLLM v1's
        piecewise CUDA graphs, TensorRT-LLM, a wafer's resident dataflow program): no floor.
    """

    EAGER = "eager"
    DECODE_GRAPHS = "decode-graphs"
    GRAPHS = "graphs"

    def launches_eagerly(self, has_prefill: bool) -> bool:
        """Whether a step (with or without prefill tokens) is launched op by op."""
        return self is ExecutionMode.EAGER or (self is ExecutionMode.DECODE_GRAPHS and has_prefill)


# What a profile without an [execution] table runs: the stack vLLM v1 runs by default.
DEFAULT_EXECUTION = ExecutionMode.GRAPHS


@dataclass(frozen=True, kw_only=True)
class MemoryTier:
    name: str
    capacity_bytes: float
    bandwidth_bytes_per_s: float
    energy_pj_per_bit: float


@dataclass(frozen=True, kw_only=True)
class Link:
    """A point-to-point link; bandwidth is per direction."""

    bandwidth_bytes_per_s: float
    latency_s: float
    energy_pj_per_bit: float


@dataclass(frozen=True, kw_only=True)
class Efficiency:
    """Fractions of datasheet peaks reached in practice, and how much memory and compute overlap.

    `overlap` is the share of the shorter of (memory time, compute time) that
    is *not* hidden behind the longer one: 0 is a perfect roofline, 1 no overlap.
    """

    weight_read: float
    kv_read: float
    compute: float
    attention: float
    overlap: float


@dataclass(frozen=True, kw_only=True)
class LatencyFloors:
    """Time a step costs no matter how few bytes or FLOPs it has.

    Per layer: `per_layer_s + hidden_size * per_layer_per_hidden_s` (the second
    term is how far a wafer's dataflow must travel for a wider layer).
    """

    per_step_s: float
    per_layer_s: float
    per_layer_per_hidden_s: float
    # Host time to launch one layer's kernels op by op, for the steps the profile's
    # `ExecutionMode` launches eagerly: such a step takes at least n_layers x this.
    launch_per_layer_s: float = 0.0


@dataclass(frozen=True, kw_only=True)
class KernelCosts:
    """What real kernels add to the bytes of weights and KV cache.

    `activation_bytes_per_hidden`: bytes the non-GEMM kernels (norms, rotary,
    activation function, residual adds, copies) move per token per layer, per
    unit of hidden size. `kv_stream_bytes_per_s`: the bandwidth one decode
    attention stream (one sequence's KV head) draws; a step whose streams are too
    few to fill the chip reads KV at streams x this, not at full bandwidth.
    """

    activation_bytes_per_hidden: float
    kv_stream_bytes_per_s: float
    split_k_s: float = 0.0  # the reduction pass a GEMM that splits K runs after it


@dataclass(frozen=True, kw_only=True)
class Parallelism:
    """How a GPU spreads a kernel: SM count and the GEMM output tile (rows x columns)."""

    units: int
    gemm_tile_m: int
    gemm_tile_n: int


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """One device type, as a deployment sees it."""

    name: str
    description: str
    kind: DeviceKind
    resident: MemoryTier
    stream: MemoryTier | None
    peak_flops_per_s: Mapping[Precision, float]
    scale_up: Link
    scale_up_domain: int
    external_io: Link
    tdp_w: float
    static_w: float
    efficiency: Efficiency
    latency: LatencyFloors
    kernels: KernelCosts
    parallelism: Parallelism | None  # None: a dataflow device (wafer), no SM waves
    calibration: str
    sources: Mapping[str, str]
    execution: ExecutionMode = DEFAULT_EXECUTION  # the serving stack's launch mode
    # Where the profile's figures come from, in one line (`memorywall hardware` shows it).
    source: str = ""
    # A what-if profile describes hardware that does not exist; its `notes` state every assumption.
    what_if: bool = False
    # What the core cannot represent faithfully for this device, and the assumptions made.
    notes: tuple[str, ...] = ()
    # The link weights cross from the host to each device (PCIe on a GPU); None: the
    # profile gives none, and loading uses `external_io`.
    host_link: Link | None = None

    @property
    def weight_load_link(self) -> Link:
        """The link a device's weights are loaded over."""
        return self.host_link if self.host_link is not None else self.external_io

    def compute_peak(self, precision: Precision) -> float:
        """Peak dense FLOP/s for math in `precision`, falling back to bf16 (weight-only formats)."""
        return self.peak_flops_per_s.get(precision, self.peak_flops_per_s[Precision.BF16])


def builtin_hardware() -> list[str]:
    """Names of the built-in profiles, sorted."""
    return sorted(
        p.name.removesuffix(".toml") for p in _PROFILES.iterdir() if p.name.endswith(".toml")
    )


def load_hardware(name_or_path: str) -> Hardware:
    """Load a built-in profile by name, or a profile file by path."""
    builtin = _PROFILES / f"{name_or_path}.toml"
    if builtin.is_file():
        with resources.as_file(builtin) as path:
            return _parse(load_toml(path), path)
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise NotFoundError(f"hardware file {name_or_path!r} does not exist")
        return _parse(load_toml(path), path)
    valid = ", ".join(builtin_hardware())
    raise NotFoundError(f"unknown hardware {name_or_path!r} (built in: {valid}; or a .toml path)")


def _calibration_tables(name: str, profile_path: Path) -> tuple[dict[str, Any], str]:
    builtin = _CALIBRATIONS / f"{name}.toml"
    if builtin.is_file():
        with resources.as_file(builtin) as path:
            return load_toml(path), str(path)
    local = profile_path.parent / name
    if local.is_file():
        return load_toml(local), str(local)
    raise ConfigError(f"{profile_path}: calibration: unknown calibration {name!r}")


def _parse(data: dict[str, Any], path: Path) -> Hardware:
    r = QuantityReader(str(path))
    name = r.text(data, "name")
    kind_text = r.text(data, "kind")
    try:
        kind = DeviceKind(kind_text)
    except ValueError:
        valid = ", ".join(repr(k.value) for k in DeviceKind)
        raise ConfigError(f"{path}: kind: expected one of {valid}, got {kind_text!r}") from None
    what_if, notes = _what_if_and_notes(r, data, name)

    tiers = _memory_tiers(r, r.table(data, "memory"))
    resident = [t for role, t in tiers if role == "resident"]
    stream = [t for role, t in tiers if role == "stream"]
    if len(resident) != 1 or len(stream) > 1:
        raise ConfigError(
            f"{path}: [memory]: need exactly one tier with role 'resident' and at most one 'stream'"
        )

    compute = r.table(data, "compute")
    peaks: dict[Precision, float] = {}
    for key in compute:
        precision = Precision.parse(key, field=f"{path}: [compute.{key}]")
        entry = r.table(compute, key, "compute.")
        peaks[precision] = r.quantity(entry, "peak_flops_per_s", "FLOP/s", f"compute.{key}.")
    if Precision.BF16 not in peaks:
        raise ConfigError(f"{path}: [compute.bf16]: missing (the fallback precision)")

    scale_up_table = r.table(data, "scale_up")
    power = r.table(data, "power")
    calibration = r.text(data, "calibration")
    cal, cal_origin = _calibration_tables(calibration, path)
    cal_reader = QuantityReader(cal_origin, r.sources)
    sections = ("efficiency", "latency", "kernels")
    inline_tables = {s: r.table(data, s, optional=True) for s in sections}
    cal_tables = {s: cal_reader.table(cal, s, optional=True) for s in sections}

    def calibrated(section: str, key: str, unit: str, **bounds: Any) -> float:
        """A profile's inline value if it gives one, else the calibration file's."""
        inline = inline_tables[section]
        reader, table = (r, inline) if key in inline else (cal_reader, cal_tables[section])
        return reader.quantity(table, key, unit, f"{section}.", **bounds)

    def eff(key: str, *, strict: bool = True) -> float:
        return calibrated("efficiency", key, "1", strict=strict, maximum=1.0)

    def floor(key: str) -> float:
        return calibrated("latency", key, "s", strict=False)

    return Hardware(
        name=name,
        description=r.text(data, "description"),
        kind=kind,
        resident=resident[0],
        stream=stream[0] if stream else None,
        peak_flops_per_s=peaks,
        scale_up=_link(r, scale_up_table, "scale_up."),
        scale_up_domain=int(r.quantity(scale_up_table, "domain_devices", "devices", "scale_up.")),
        external_io=_link(r, r.table(data, "external_io"), "external_io."),
        tdp_w=r.quantity(power, "tdp_w", "W", "power."),
        static_w=r.quantity(power, "static_w", "W", "power."),
        efficiency=Efficiency(
            weight_read=eff("weight_read"),
            kv_read=eff("kv_read"),
            compute=eff("compute"),
            attention=eff("attention"),
            overlap=eff("overlap", strict=False),
        ),
        latency=LatencyFloors(
            per_step_s=floor("per_step_s"),
            per_layer_s=floor("per_layer_s"),
            per_layer_per_hidden_s=floor("per_layer_per_hidden_s"),
            launch_per_layer_s=floor("launch_per_layer_s"),
        ),
        kernels=KernelCosts(
            activation_bytes_per_hidden=calibrated(
                "kernels", "activation_bytes_per_hidden", "B", strict=False
            ),
            kv_stream_bytes_per_s=calibrated("kernels", "kv_stream_bytes_per_s", "B/s"),
            split_k_s=calibrated("kernels", "split_k_s", "s", strict=False),
        ),
        parallelism=_parallelism(r, r.table(data, "parallelism", optional=True)),
        calibration=calibration,
        execution=_execution(r, r.table(data, "execution", optional=True)),
        sources=dict(r.sources),
        source=_optional_text(r, data, "source"),
        what_if=what_if,
        notes=notes,
        host_link=_optional_link(r, r.table(data, "host_link", optional=True), "host_link."),
    )


WHAT_IF_PREFIX = "what-if-"


def _optional_text(r: QuantityReader, data: dict[str, Any], key: str) -> str:
    value = data.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(f"{r.origin}: {key}: expected a string")
    return value.strip()


def _what_if_and_notes(
    r: QuantityReader, data: dict[str, Any], name: str
) -> tuple[bool, tuple[str, ...]]:
    """`what_if = true|false` and `notes = ["...", ...]`. A what-if profile must say so in its
    name and list its assumptions, so that it cannot pass for a real part in a table."""
    what_if = data.get("what_if", False)
    if not isinstance(what_if, bool):
        raise ConfigError(f"{r.origin}: what_if: expected true or false, got {what_if!r}")
    raw = data.get("notes", [])
    if not isinstance(raw, list) or not all(isinstance(n, str) and n.strip() for n in raw):
        raise ConfigError(f"{r.origin}: notes: expected a list of non-empty strings")
    notes = tuple(n.strip() for n in raw)
    if what_if and not name.startswith(WHAT_IF_PREFIX):
        raise ConfigError(
            f"{r.origin}: name: a what-if profile's name starts with {WHAT_IF_PREFIX!r}, "
            f"got {name!r}"
        )
    if what_if and not notes:
        raise ConfigError(f"{r.origin}: notes: a what-if profile must state its assumptions")
    if not what_if and name.startswith(WHAT_IF_PREFIX):
        raise ConfigError(f"{r.origin}: what_if: {name!r} is named what-if but not marked so")
    return what_if, notes


def _execution(r: QuantityReader, table: dict[str, Any]) -> ExecutionMode:
    """`[execution] mode = "..."` with its `source`; no table: `DEFAULT_EXECUTION`."""
    if not table:
        return DEFAULT_EXECUTION
    text = r.text(table, "mode", "execution.")
    try:
        mode = ExecutionMode(text)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in ExecutionMode)
        raise ConfigError(
            f"{r.origin}: execution.mode: expected one of {valid}, got {text!r}"
        ) from None
    source = table.get("source")
    if not isinstance(source, str) or not source.strip():
        raise ConfigError(f"{r.origin}: execution.source: the execution mode must cite a source")
    r.sources["execution.mode"] = source.strip()
    return mode


def _memory_tiers(r: QuantityReader, memory: dict[str, Any]) -> list[tuple[str, MemoryTier]]:
    tiers = []
    for name, table in memory.items():
        prefix = f"memory.{name}."
        role = table.get("role") if isinstance(table, dict) else None
        if role not in ("resident", "stream"):
            raise ConfigError(f"{r.origin}: {prefix}role: expected 'resident' or 'stream'")
        tiers.append(
            (
                role,
                MemoryTier(
                    name=name,
                    capacity_bytes=r.quantity(table, "capacity_bytes", "B", prefix),
                    bandwidth_bytes_per_s=r.quantity(table, "bandwidth_bytes_per_s", "B/s", prefix),
                    energy_pj_per_bit=r.quantity(table, "energy_pj_per_bit", "pJ/bit", prefix),
                ),
            )
        )
    return tiers


def _parallelism(r: QuantityReader, table: dict[str, Any]) -> Parallelism | None:
    if not table:
        return None

    def count(key: str, unit: str) -> int:
        value = r.quantity(table, key, unit, "parallelism.")
        if value != int(value):
            raise ConfigError(f"{r.origin}: parallelism.{key}.value: must be a whole number")
        return int(value)

    return Parallelism(
        units=count("units", "SMs"),
        gemm_tile_m=count("gemm_tile_m", "rows"),
        gemm_tile_n=count("gemm_tile_n", "columns"),
    )


def _optional_link(r: QuantityReader, table: dict[str, Any], prefix: str) -> Link | None:
    return _link(r, table, prefix) if table else None


def _link(r: QuantityReader, table: dict[str, Any], prefix: str) -> Link:
    return Link(
        bandwidth_bytes_per_s=r.quantity(table, "bandwidth_bytes_per_s", "B/s", prefix),
        latency_s=r.quantity(table, "latency_s", "s", prefix, strict=False),
        energy_pj_per_bit=r.quantity(table, "energy_pj_per_bit", "pJ/bit", prefix),
    )
