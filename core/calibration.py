"""Fitting the profiles' efficiency and latency constants on real measurements.

GPU: five constants (KV-read, compute and attention efficiency, memory/compute
overlap, per-layer latency) fitted on the H100 Llama-3.1-8B step times in
`calibration/h100-llama8b-measured.json`; weight-read efficiency is that
file's measured weight-streaming ceiling. Other GPUs reuse these constants.

Wafer: per-layer latency `a + hidden * b` fitted on the published Cerebras
rows marked `fit = true` in `calibration/published.toml`.

Published comparison: every row of that file predicted in its own metric
(`published_comparisons`, printed by `benchmarks/published_table.py`).

Pure computation over package data; `benchmarks/calibrate.py` writes the
results to the calibration TOML files.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, replace
from importlib import resources

import numpy as np

from memorywall.core.cost import StepModel, combine_s
from memorywall.core.deployment import plan_deployment
from memorywall.core.hardware import Efficiency, Hardware, LatencyFloors, load_hardware
from memorywall.core.model import load_model
from memorywall.core.precision import Precision
from memorywall.core.work import Batch, PrefillChunk

_DATA = resources.files("memorywall.core") / "calibration"
MEASURED_FILE = "h100-llama8b-measured.json"
PUBLISHED_FILE = "published.toml"
_UNIT = Efficiency(weight_read=1.0, kv_read=1.0, compute=1.0, attention=1.0, overlap=0.0)
_NO_FLOOR = LatencyFloors(per_step_s=0.0, per_layer_s=0.0, per_layer_per_hidden_s=0.0)


@dataclass(frozen=True)
class ErrorRow:
    label: str
    measured_s: float
    predicted_s: float

    @property
    def error(self) -> float:
        """Signed relative error of the prediction."""
        return self.predicted_s / self.measured_s - 1.0


@dataclass(frozen=True)
class ErrorTable:
    name: str
    rows: tuple[ErrorRow, ...]

    @property
    def median_abs_error(self) -> float:
        return float(np.median([abs(r.error) for r in self.rows]))

    @property
    def max_abs_error(self) -> float:
        return max(abs(r.error) for r in self.rows)


@dataclass(frozen=True)
class GpuMeasurements:
    decode: tuple[tuple[int, int, float], ...]  # (batch, context, step_s)
    prefill: tuple[tuple[int, float], ...]  # (prompt, prefill_s)
    weight_streaming_bytes_per_s: float
    datasheet_bandwidth_bytes_per_s: float


@dataclass(frozen=True)
class GpuFit:
    efficiency: Efficiency
    latency: LatencyFloors
    decode: ErrorTable
    prefill: ErrorTable


@dataclass(frozen=True)
class WaferFit:
    latency: LatencyFloors
    rows: ErrorTable


def load_gpu_measurements() -> GpuMeasurements:
    data = json.loads((_DATA / MEASURED_FILE).read_text())
    return GpuMeasurements(
        decode=tuple((r["batch"], r["context"], r["step_s_graph"]) for r in data["decode"]),
        prefill=tuple((r["prompt"], r["prefill_s"]) for r in data["prefill"]),
        weight_streaming_bytes_per_s=data["device_ceilings_measured"][
            "weight_streaming_GBps_by_batch"
        ]["b1"]
        * 1e9,
        datasheet_bandwidth_bytes_per_s=data["datasheet"]["hbm_GBps"] * 1e9,
    )


def load_published() -> list[dict]:
    return tomllib.loads((_DATA / PUBLISHED_FILE).read_text())["row"]


def _gpu_batches(m: GpuMeasurements) -> tuple[list[Batch], list[Batch]]:
    decode = [Batch(decode_contexts=(c,) * b) for b, c, _ in m.decode]
    prefill = [Batch(prefill=(PrefillChunk(p),)) for p, _ in m.prefill]
    return decode, prefill


def gpu_error_tables(step_model: StepModel, m: GpuMeasurements) -> tuple[ErrorTable, ErrorTable]:
    """Predicted against measured, for every decode and prefill point."""
    decode, prefill = _gpu_batches(m)
    d_rows = tuple(
        ErrorRow(f"decode b={b} ctx={c}", s, step_model.step_cost(batch).time_s)
        for (b, c, s), batch in zip(m.decode, decode, strict=True)
    )
    p_rows = tuple(
        ErrorRow(f"prefill {p}", s, step_model.step_cost(batch).time_s)
        for (p, s), batch in zip(m.prefill, prefill, strict=True)
    )
    return ErrorTable("H100 decode", d_rows), ErrorTable("H100 prefill", p_rows)


def fit_gpu(hardware: Hardware | None = None, m: GpuMeasurements | None = None) -> GpuFit:
    """Least squares of relative error over all points: a grid over the four
    efficiencies and the overlap, refined twice; the latency floor is solved
    in closed form at every grid point."""
    hardware = hardware or load_hardware("h100-sxm")
    m = m or load_gpu_measurements()
    model = load_model("llama-3.1-8b")
    weight_read = m.weight_streaming_bytes_per_s / m.datasheet_bandwidth_bytes_per_s
    raw = StepModel(
        plan_deployment(replace(hardware, efficiency=_UNIT, latency=_NO_FLOOR), model, devices=1)
    )
    decode, prefill = _gpu_batches(m)
    costs = [raw.step_cost(b) for b in decode + prefill]
    bw = hardware.resident.bandwidth_bytes_per_s
    peak = hardware.compute_peak(Precision.BF16)
    weight_s = np.array([c.weight_bytes / bw for c in costs]) / weight_read
    kv_s = np.array([c.kv_bytes / bw for c in costs])
    attn_s = np.array([c.attention_flops / peak for c in costs])
    linear_s = np.array([(c.flops - c.attention_flops) / peak for c in costs])
    y = np.array([s for *_, s in m.decode] + [s for _, s in m.prefill])

    centre = np.array([0.7, 0.6, 0.6, 0.5])  # kv_read, compute, attention, overlap
    span = np.array([0.3, 0.4, 0.4, 0.5])
    for _ in range(3):
        axes = [
            np.clip(np.linspace(c - s, c + s, 21), 0.05, 1.0)
            for c, s in zip(centre, span, strict=True)
        ]
        axes[3] = np.clip(axes[3], 0.0, 1.0)
        kv, comp, attn, ov = np.meshgrid(*axes, indexing="ij", sparse=True)
        mem = weight_s + kv_s / kv[..., None]
        cmp = linear_s / comp[..., None] + attn_s / attn[..., None]
        x = combine_s(0.0, mem, cmp, ov[..., None], 0.0)
        # a = argmin sum(((x + a - y) / y)^2)
        a = ((y - x) / y**2).sum(-1) / (1.0 / y**2).sum()
        a = np.maximum(a, 0.0)
        loss = ((((x + a[..., None]) - y) / y) ** 2).sum(-1)
        best = np.unravel_index(np.argmin(loss), loss.shape)
        centre = np.array([axes[i][best[i]] for i in range(4)])
        span = span / 8
    floor = float(a[best])
    efficiency = Efficiency(
        weight_read=weight_read,
        kv_read=float(centre[0]),
        compute=float(centre[1]),
        attention=float(centre[2]),
        overlap=float(centre[3]),
    )
    latency = LatencyFloors(
        per_step_s=0.0, per_layer_s=floor / model.n_layers, per_layer_per_hidden_s=0.0
    )
    fitted = StepModel(
        plan_deployment(replace(hardware, efficiency=efficiency, latency=latency), model, devices=1)
    )
    d_table, p_table = gpu_error_tables(fitted, m)
    return GpuFit(efficiency=efficiency, latency=latency, decode=d_table, prefill=p_table)


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
