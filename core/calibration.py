"""Fitting the profiles' efficiency, latency and kernel constants on real measurements.

GPU (`fit_gpu`): H100 Llama-3.1-8B step times in
`calibration/h100-llama8b-measured.json` (decode steps replayed from CUDA graphs,
prefills launched op by op) and `calibration/h100-llama8b-mixed-steps.json`
(steps mixing 0 or 16 decoding sequences with a prefill chunk, replayed from CUDA
graphs). Each point is predicted in the execution mode it was measured in
(`GpuPoint.execution`), whatever the shipped profiles' mode. Four constants are
the first file's own device measurements, not fitted: weight-read efficiency
(weight-streaming ceiling at batch 1), compute efficiency (dense 8192^3 matmul
ceiling), overlap (weight streaming at batch 256, where GEMMs turn
compute-bound) and the launch floor of an eager step (median eager batch-1
decode step). Six are fitted by least squares of relative error on the fit
points of the first file only; every second point of each series is held out
(`held_out`), and every mixed step (`MIXED_RULE`): they check the one-pass
mixed-step cost, which adds no constant. Other GPUs reuse all of them.

Wafer: per-layer latency `a + hidden * b` fitted on the published Cerebras
rows marked `fit = true` in `calibration/published.toml`.

Pure computation over package data; `benchmarks/calibrate.py` writes the
results to the calibration TOML files.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from typing import Generic, Protocol, TypeVar

import numpy as np

from memorywall.core.cost import StepModel, combine_s
from memorywall.core.deployment import plan_deployment
from memorywall.core.gemm import Tiling, gemm_compute_s, split_k_gemms, weight_gemms
from memorywall.core.hardware import (
    Efficiency,
    ExecutionMode,
    Hardware,
    KernelCosts,
    LatencyFloors,
    load_hardware,
)
from memorywall.core.model import load_model
from memorywall.core.precision import Precision
from memorywall.core.work import Batch, PrefillChunk, Work

_DATA = resources.files("memorywall.core") / "calibration"
MEASURED_FILE = "h100-llama8b-measured.json"
MIXED_FILE = "h100-llama8b-mixed-steps.json"
PUBLISHED_FILE = "published.toml"
_NO_FLOOR = LatencyFloors(per_step_s=0.0, per_layer_s=0.0, per_layer_per_hidden_s=0.0)
HELD_OUT_RULE = (
    "every second point of each series (decode points sharing a context, by batch; "
    "prefill points by prompt length) is held out"
)
MIXED_RULE = "every mixed step is held out: the one-pass step cost adds no constant for them to fit"


@dataclass(frozen=True)
class ErrorRow:
    label: str
    measured_s: float
    predicted_s: float
    held_out: bool = False

    @property
    def error(self) -> float:
        """Signed relative error of the prediction."""
        return self.predicted_s / self.measured_s - 1.0


class Compared(Protocol):
    """What an ErrorTable's rows have: a label and the prediction's signed relative error."""

    @property
    def label(self) -> str: ...

    @property
    def error(self) -> float: ...


RowT = TypeVar("RowT", bound=Compared)


@dataclass(frozen=True)
class ErrorTable(Generic[RowT]):
    """Rows of one comparison: measured steps (ErrorRow) or published figures
    (published.PublishedComparison)."""

    name: str
    rows: tuple[RowT, ...]

    @property
    def median_abs_error(self) -> float:
        return float(np.median([abs(r.error) for r in self.rows]))

    @property
    def max_abs_error(self) -> float:
        return max(abs(r.error) for r in self.rows)

    def subset(self: ErrorTable[ErrorRow], held_out: bool) -> ErrorTable[ErrorRow]:
        """The held-out rows (True) or the fit rows (False)."""
        which = "held out" if held_out else "fit points"
        rows = tuple(r for r in self.rows if r.held_out == held_out)
        return ErrorTable(f"{self.name}, {which}", rows)


@dataclass(frozen=True)
class GpuPoint:
    """One measured step (decodes, a prefill, or both) and how it was launched."""

    label: str
    batch: Batch
    measured_s: float
    series: str  # points of one series are ordered and split by `held_out`
    order: int
    execution: ExecutionMode  # as measured: replayed from a graph, or launched op by op
    held_out: bool = False


@dataclass(frozen=True)
class GpuMeasurements:
    decode: tuple[GpuPoint, ...]
    prefill: tuple[GpuPoint, ...]
    mixed: tuple[GpuPoint, ...]  # MIXED_FILE: decodes beside a chunk, graph-replayed
    weight_streaming_bytes_per_s: float  # batch 1
    weight_streaming_b256_bytes_per_s: float
    matmul_flops_per_s: float
    eager_decode_b1_s: tuple[float, ...]
    datasheet_bandwidth_bytes_per_s: float
    datasheet_flops_per_s: float

    @property
    def points(self) -> tuple[GpuPoint, ...]:
        """The decode and prefill points of MEASURED_FILE."""
        return self.decode + self.prefill

    @property
    def all_points(self) -> tuple[GpuPoint, ...]:
        return self.decode + self.prefill + self.mixed


@dataclass(frozen=True)
class GpuFit:
    efficiency: Efficiency
    latency: LatencyFloors
    kernels: KernelCosts
    decode: ErrorTable
    prefill: ErrorTable
    mixed: ErrorTable


@dataclass(frozen=True)
class WaferFit:
    latency: LatencyFloors
    rows: ErrorTable


def held_out(points: list[GpuPoint]) -> tuple[GpuPoint, ...]:
    """Mark every second point of each series held out (`HELD_OUT_RULE`), keeping file order."""
    rank: dict[int, int] = {}
    for series in {p.series for p in points}:
        members = sorted((p.order, i) for i, p in enumerate(points) if p.series == series)
        rank |= {i: k for k, (_, i) in enumerate(members)}
    return tuple(replace(p, held_out=rank[i] % 2 == 1) for i, p in enumerate(points))


def load_gpu_measurements() -> GpuMeasurements:
    data = json.loads((_DATA / MEASURED_FILE).read_text())
    decode = [
        GpuPoint(
            f"decode b={r['batch']} ctx={r['context']}",
            Batch(decode_contexts=(r["context"],) * r["batch"]),
            r["step_s_graph"],
            f"decode ctx={r['context']}",
            r["batch"],
            ExecutionMode.GRAPHS,
        )
        for r in data["decode"]
    ]
    prefill = [
        GpuPoint(
            f"prefill {r['prompt']}",
            Batch(prefill=(PrefillChunk(r["prompt"]),)),
            r["prefill_s"],
            "prefill",
            r["prompt"],
            ExecutionMode.EAGER,
        )
        for r in data["prefill"]
    ]
    ceilings = data["device_ceilings_measured"]
    streaming = ceilings["weight_streaming_GBps_by_batch"]
    return GpuMeasurements(
        decode=held_out(decode),
        prefill=held_out(prefill),
        mixed=tuple(replace(p, held_out=True) for p in load_mixed_points()),
        weight_streaming_bytes_per_s=streaming["b1"] * 1e9,
        weight_streaming_b256_bytes_per_s=streaming["b256"] * 1e9,
        matmul_flops_per_s=ceilings["bf16_dense_matmul_TFLOPs_8192cubed"] * 1e12,
        eager_decode_b1_s=tuple(r["step_s_eager"] for r in data["decode"] if r["batch"] == 1),
        datasheet_bandwidth_bytes_per_s=data["datasheet"]["hbm_GBps"] * 1e9,
        datasheet_flops_per_s=data["datasheet"]["bf16_dense_TFLOPs"] * 1e12,
    )


def load_mixed_points() -> list[GpuPoint]:
    """MIXED_FILE's steps: `decode_batch` sequences over `decode_context` beside one chunk."""
    data = json.loads((_DATA / MIXED_FILE).read_text())
    out = []
    for r in data["steps"]:
        b, ctx, n = r["decode_batch"], r["decode_context"], r["prefill_chunk"]
        chunk = (PrefillChunk(n, r["chunk_prior_context"]),) if n else ()
        out.append(
            GpuPoint(
                f"mixed b={b} ctx={ctx} + chunk {n}",
                Batch(decode_contexts=(ctx,) * b, prefill=chunk),
                r["step_s_graph"],
                f"mixed b={b}",
                n,
                ExecutionMode.GRAPHS,
            )
        )
    return out


def load_published() -> list[dict]:
    return tomllib.loads((_DATA / PUBLISHED_FILE).read_text())["row"]


def point_step_model(hardware: Hardware, execution: ExecutionMode) -> StepModel:
    """Llama-3.1-8B on one `hardware` device, its steps launched as `execution` says."""
    return StepModel(
        plan_deployment(
            replace(hardware, execution=execution), load_model("llama-3.1-8b"), devices=1
        )
    )


def gpu_error_tables(
    hardware: Hardware, m: GpuMeasurements
) -> tuple[ErrorTable, ErrorTable, ErrorTable]:
    """Predicted against measured for every decode, prefill and mixed point, each in the
    execution mode it was measured in, held-out ones marked."""
    models = {e: point_step_model(hardware, e) for e in ExecutionMode}

    def rows(points: tuple[GpuPoint, ...]) -> tuple[ErrorRow, ...]:
        return tuple(
            ErrorRow(
                p.label,
                p.measured_s,
                models[p.execution].step_cost(p.batch).time_s,
                p.held_out,
            )
            for p in points
        )

    return (
        ErrorTable("H100 decode", rows(m.decode)),
        ErrorTable("H100 prefill", rows(m.prefill)),
        ErrorTable("H100 mixed steps", rows(m.mixed)),
    )


def streaming_overlap(hardware: Hardware, m: GpuMeasurements, compute: float) -> float:
    """The overlap at which the 8B GEMMs at 256 rows take as long as the measured streaming
    at batch 256 says (bisection; time grows with overlap)."""
    model = load_model("llama-3.1-8b")
    par = hardware.parallelism
    assert par is not None, f"{hardware.name}: a GPU profile has a [parallelism] table"
    tiling = Tiling(units=par.units, tile_m=par.gemm_tile_m, tile_n=par.gemm_tile_n)
    unit_flops = hardware.compute_peak(Precision.BF16) * compute / par.units
    bw = m.weight_streaming_bytes_per_s
    terms = [
        (g.params * 2 / bw, gemm_compute_s(256, g, tiling, unit_flops))
        for g in weight_gemms(model, 1)
    ]
    target = sum(mem for mem, _ in terms) * bw / m.weight_streaming_b256_bytes_per_s
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if sum(combine_s(0.0, mem, comp, mid, 0.0) for mem, comp in terms) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def fit_gpu(hardware: Hardware | None = None, m: GpuMeasurements | None = None) -> GpuFit:
    """Measured constants first (module docstring), then least squares of relative error on
    the fit points: a grid over KV-read efficiency, per-stream KV bandwidth and attention
    efficiency, refined three times; per-layer latency and activation traffic, which add
    linearly, solved in closed form at every grid point."""
    hardware = hardware or load_hardware("h100-sxm")
    m = m or load_gpu_measurements()
    model = load_model("llama-3.1-8b")
    weight_read = m.weight_streaming_bytes_per_s / m.datasheet_bandwidth_bytes_per_s
    compute = m.matmul_flops_per_s / m.datasheet_flops_per_s
    overlap = streaming_overlap(hardware, m, compute)
    launch = float(np.median(m.eager_decode_b1_s)) / model.n_layers
    fit_points = [p for p in m.all_points if not p.held_out]  # MIXED_RULE: none mixed
    y = np.array([p.measured_s for p in fit_points])
    eager = np.array([p.execution.launches_eagerly(bool(p.batch.prefill)) for p in fit_points])
    work = [Work.of_batch(p.batch, model) for p in fit_points]
    tokens = np.array([w.tokens for w in work])
    act_bw = hardware.resident.bandwidth_bytes_per_s * weight_read
    per_layer_col = np.full_like(y, float(model.n_layers))
    act_col = tokens * model.hidden_size * model.n_layers / act_bw
    par = hardware.parallelism
    assert par is not None, f"{hardware.name}: a GPU profile has a [parallelism] table"
    tiling = Tiling(units=par.units, tile_m=par.gemm_tile_m, tile_n=par.gemm_tile_n)
    split_col = np.array(
        [
            sum(
                split_k_gemms(w.logits if g.head else w.tokens, g, tiling)
                for g in weight_gemms(model, 1)
            )
            for w in work
        ]
    )
    launch_s = launch * model.n_layers

    def constants(
        kv_read: float, stream_bw: float, attention: float, a: float, c: float, k: float = 0.0
    ):
        eff = Efficiency(
            weight_read=weight_read,
            kv_read=kv_read,
            compute=compute,
            attention=attention,
            overlap=overlap,
        )
        lat = replace(_NO_FLOOR, per_layer_s=a, launch_per_layer_s=launch)
        ker = KernelCosts(
            activation_bytes_per_hidden=c, kv_stream_bytes_per_s=stream_bw, split_k_s=k
        )
        return eff, lat, ker

    def base(kv_read: float, stream_bw: float, attention: float) -> np.ndarray:
        """The fit points' times without the linear terms and the launch floor."""
        eff, lat, ker = constants(kv_read, stream_bw, attention, 0.0, 0.0)
        hw = replace(hardware, efficiency=eff, latency=lat, kernels=ker)
        sm = point_step_model(hw, ExecutionMode.GRAPHS)
        return np.array([sm.step_cost(p.batch).time_s for p in fit_points])

    linear = np.stack([per_layer_col, act_col, split_col], axis=1)

    def solve(x: np.ndarray) -> tuple[np.ndarray, float]:
        """Nonnegative (per-layer, activation, split-K) coefficients minimising the relative
        error of max(x + linear @ coef, launch) for eager points: exact NNLS over the
        subsets of free coefficients, with points held up by the launch floor left out."""
        keep = np.ones_like(y, dtype=bool)
        for _ in range(3):
            w = keep / y
            best_coef, best_loss = np.zeros(3), np.inf
            for mask in range(1, 8):
                cols = [i for i in range(3) if mask >> i & 1]
                sol, *_ = np.linalg.lstsq(linear[:, cols] * w[:, None], (y - x) * w, rcond=None)
                if (sol < 0).any():
                    continue
                coef = np.zeros(3)
                coef[cols] = sol
                loss = float((((x + linear @ coef - y) * w) ** 2).sum())
                if loss < best_loss:
                    best_coef, best_loss = coef, loss
            pred = x + linear @ best_coef
            held_up = eager & (pred < launch_s)
            if (keep == ~held_up).all():
                break
            keep = ~held_up
        pred = np.where(eager, np.maximum(pred, launch_s), pred)
        return best_coef, float((((pred - y) / y) ** 2).sum())

    centre = np.array([0.75, 250e9, 0.6])  # kv_read, per-stream bandwidth (B/s), attention
    span = np.array([0.25, 240e9, 0.4])
    best = None
    for _ in range(4):
        axes = [np.linspace(cn - sp, cn + sp, 11) for cn, sp in zip(centre, span, strict=True)]
        axes = [
            np.clip(axes[0], 0.05, 1.0),
            np.clip(axes[1], 1e9, None),
            np.clip(axes[2], 0.05, 1.0),
        ]
        for kv in axes[0]:
            for sb in axes[1]:
                for at in axes[2]:
                    coef, loss = solve(base(kv, sb, at))
                    if best is None or loss < best[0]:
                        best = (loss, kv, sb, at, coef)
        assert best is not None  # the grid above is never empty
        centre = np.array(best[1:4])
        span = span / 5
    assert best is not None
    _, kv, sb, at, (a, c, k) = best
    eff, lat, ker = constants(float(kv), float(sb), float(at), float(a), float(c), float(k))
    fitted = replace(hardware, efficiency=eff, latency=lat, kernels=ker)
    d_table, p_table, x_table = gpu_error_tables(fitted, m)
    return GpuFit(
        efficiency=eff, latency=lat, kernels=ker, decode=d_table, prefill=p_table, mixed=x_table
    )


def published_step_model(row: dict, hardware: Hardware | None = None) -> StepModel:
    hardware = hardware or load_hardware(row["hardware"])
    deployment = plan_deployment(
        hardware,
        load_model(row["model"]),
        devices=row["devices"],
        weight_precision=Precision.parse(row["weight_precision"], field="weight_precision"),
    )
    return StepModel(deployment)


def published_error_table(rows: list[dict], name: str) -> ErrorTable:
    """Predicted single-stream inter-token time against each row's published tok/s.

    Reads the original schema's `tokens_per_s_per_user` key; rows without it
    (the other metrics of `published_comparisons`) are skipped.
    """
    out = []
    for row in (r for r in rows if "tokens_per_s_per_user" in r):
        sm = published_step_model(row)
        step = sm.step_cost(Batch(decode_contexts=(row["context"],))).time_s
        out.append(
            ErrorRow(
                row["label"], 1.0 / row["tokens_per_s_per_user"], step / sm.tokens_per_decode_step
            )
        )
    return ErrorTable(name, tuple(out))


def fit_wafer(hardware: Hardware | None = None, rows: list[dict] | None = None) -> WaferFit:
    """Solve n_layers * (a + hidden * b) = published step time - the rest of the model's time."""
    hardware = hardware or load_hardware("wse-3")
    rows = [r for r in (rows or load_published()) if r["fit"] and r["hardware"] == hardware.name]
    bare = replace(hardware, latency=_NO_FLOOR)
    lhs, rhs = [], []
    for row in rows:
        sm = published_step_model(row, bare)
        model = sm.deployment.model
        rest = sm.step_cost(Batch(decode_contexts=(row["context"],))).time_s
        lhs.append([model.n_layers, model.n_layers * model.hidden_size])
        rhs.append(1.0 / row["tokens_per_s_per_user"] - rest)
    (a, b), *_ = np.linalg.lstsq(np.array(lhs, dtype=float), np.array(rhs), rcond=None)
    latency = LatencyFloors(per_step_s=0.0, per_layer_s=float(a), per_layer_per_hidden_s=float(b))
    fitted = replace(hardware, latency=latency)
    table = []
    for row in rows:
        sm = published_step_model(row, fitted)
        step = sm.step_cost(Batch(decode_contexts=(row["context"],))).time_s
        table.append(ErrorRow(row["label"], 1.0 / row["tokens_per_s_per_user"], step))
    return WaferFit(latency=latency, rows=ErrorTable("WSE-3 published (fit rows)", tuple(table)))
