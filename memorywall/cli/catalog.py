"""`memorywall hardware` and `memorywall models`: the built-in profiles and models as tables."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from memorywall.core import builtin_hardware, builtin_models, load_hardware, load_model


def register(sub: argparse._SubParsersAction) -> None:
    sub.add_parser("hardware", help="list built-in hardware profiles").set_defaults(
        func=hardware_command
    )
    sub.add_parser("models", help="list built-in models").set_defaults(func=models_command)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(f"{h:<{w}}" for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def hardware_command(args: argparse.Namespace) -> int:
    """Every built-in profile with its kind (what-if profiles say so) and where its figures
    come from; each profile's `notes` say what the core cannot represent for it."""
    rows = []
    for name in builtin_hardware():
        hw = load_hardware(name)
        peaks = ", ".join(f"{p.value} {v / 1e15:g}" for p, v in hw.peak_flops_per_s.items())
        rows.append(
            (
                name,
                f"{hw.kind.value}, what-if" if hw.what_if else hw.kind.value,
                f"{hw.resident.capacity_bytes / 1e9:g} GB {hw.resident.name}",
                f"{hw.resident.bandwidth_bytes_per_s / 1e12:g} TB/s",
                f"{peaks} PF",
                f"{hw.scale_up.bandwidth_bytes_per_s / 1e9:g} GB/s x {hw.scale_up_domain}",
                f"{hw.external_io.bandwidth_bytes_per_s / 1e9:g} GB/s",
                f"{hw.tdp_w:g} W",
                hw.description,
                hw.source or "-",
            )
        )
    print(
        _table(
            (
                "name",
                "kind",
                "memory",
                "bandwidth",
                "dense peak",
                "scale-up (per direction x domain)",
                "external I/O",
                "power",
                "description",
                "source",
            ),
            rows,
        )
    )
    return 0


def models_command(args: argparse.Namespace) -> int:
    rows = []
    for name in builtin_models():
        m = load_model(name)
        kinds = ["MoE" if m.moe else "dense", "MLA" if m.mla else "GQA"]
        if m.n_window_layers:
            kinds.append(f"{m.n_window_layers} windowed layers")
        kv = m.n_layers * m.kv_values_per_token_per_layer() * 2
        rows.append(
            (
                name,
                str(m.n_layers),
                str(m.hidden_size),
                f"{m.n_heads}/{m.n_kv_heads}",
                f"{m.total_params() / 1e9:.1f} B",
                f"{m.active_params_per_token() / 1e9:.1f} B",
                f"{kv:,}",
                f"{m.max_context:,}",
                ", ".join(kinds),
            )
        )
    print(
        _table(
            (
                "name",
                "layers",
                "hidden",
                "q/kv heads",
                "params",
                "active",
                "KV B/token bf16",
                "context",
                "kind",
            ),
            rows,
        )
    )
    return 0
