"""MoE on a rack-scale NVLink domain with and without expert parallelism, against wafers.

    python -m benchmarks.expert_parallel            # the table in docs/expert-parallel.md

Decode steps from the core alone (no serving run): per-user and per-device speed at a
batch of 1, 64 and 512 sequences (context 1,024), and the step's interconnect share. The
GB200 NVL72 runs the model tensor parallel over 64 GPUs, then the same group with its
experts spread whole over it (EP64); the wafer runs the fewest WSE-3s that hold the
weights in SRAM. fp8 weights, bf16 KV, every profile as shipped.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np

from memorywall.core import StepModel, load_hardware, load_model, plan_deployment
from memorywall.core.deployment import Deployment
from memorywall.core.precision import Precision

MODELS = ("deepseek-v3", "gpt-oss-120b")
BATCHES = (1, 64, 512)
CONTEXT = 1024
NVL72_GROUP = 64  # the largest power of two within the 72-GPU domain dividing the heads


@dataclass(frozen=True, kw_only=True)
class Row:
    model: str
    layout: str
    batch: int
    tok_s_user: float
    tok_s_device: float
    tok_s_kw: float
    comm_share: float  # interconnect seconds / step seconds


def deployments(model: str) -> list[Deployment]:
    m = load_model(model)
    nvl, wafer = load_hardware("gb200-nvl72"), load_hardware("wse-3")
    kw = {"weight_precision": Precision.FP8}
    group = min(NVL72_GROUP, m.n_heads)
    return [
        plan_deployment(nvl, m, devices=group, tensor_parallel=group, **kw),
        plan_deployment(nvl, m, devices=group, expert_parallel=group, **kw),
        plan_deployment(wafer, m, **kw),
    ]


def layout(d: Deployment) -> str:
    split = f"TP{d.tensor_parallel}"
    if d.expert_parallel > 1:
        split += f" EP{d.expert_parallel}"
    if d.pipeline_parallel > 1:
        split += f" PP{d.pipeline_parallel}"
    return f"{d.devices} x {d.hardware.name} {split}"


def rows_of(d: Deployment) -> list[Row]:
    sweep = StepModel(d).decode_sweep(np.array(BATCHES, dtype=float), np.array([float(CONTEXT)]))
    kw = d.devices * d.hardware.tdp_w / 1e3
    out = []
    for b, step, comm in zip(
        BATCHES, sweep.time_s.reshape(-1), sweep.comm_s.reshape(-1), strict=True
    ):
        out.append(
            Row(
                model=d.model.name,
                layout=layout(d),
                batch=b,
                tok_s_user=float(1.0 / step),
                tok_s_device=float(b / step / d.devices),
                tok_s_kw=float(b / step / kw),
                comm_share=float(comm / step),
            )
        )
    return out


def rows(models: tuple[str, ...] = MODELS) -> list[Row]:
    return [r for m in models for d in deployments(m) for r in rows_of(d)]


def table(found: list[Row]) -> str:
    head = ["model", "deployment", "batch", "tok/s/user", "tok/s/device", "tok/s/kW", "link share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in found:
        cells = [
            r.model,
            r.layout,
            str(r.batch),
            f"{r.tok_s_user:,.0f}",
            f"{r.tok_s_device:,.1f}",
            f"{r.tok_s_kw:,.1f}",
            f"{r.comm_share:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated MoE models")
    args = p.parse_args()
    print(table(rows(tuple(m.strip() for m in args.models.split(",")))))


if __name__ == "__main__":
    main()
