"""Fit the calibration constants and write them to core/calibration/*.toml.

    python benchmarks/calibrate.py          # fit, print error tables, write files
    python benchmarks/calibrate.py --check  # fit and fail if the files are stale

Prints the error tables as Markdown (the README's calibration table comes from here);
`python -m benchmarks.accuracy` writes the full accuracy page, docs/accuracy.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

import numpy as np

from memorywall.core.calibration import (
    HELD_OUT_RULE,
    MEASURED_FILE,
    ErrorRow,
    ErrorTable,
    GpuFit,
    WaferFit,
    fit_gpu,
    fit_wafer,
    load_published,
)
from memorywall.core.hardware import load_hardware
from memorywall.core.published import published_comparisons

CAL_DIR = Path(__file__).resolve().parent.parent / "core" / "calibration"

# A refit on another CPU differs in the last digits (BLAS and libm differ), so
# freshness compares numbers within these tolerances, never the file text.
FITTED_REL_TOL = 1e-9  # fitted constants, relative
FIT_ERROR_ABS_TOL = 1e-9  # the fit's own error figures (fractions), absolute


def _q(value: float, unit: str, source: str) -> str:
    return f'{{ value = {value!r}, unit = "{unit}", source = "{source}" }}'


_FIT = (
    f"least-squares fit of relative error on the fit points of {MEASURED_FILE} "
    f"({HELD_OUT_RULE}; benchmarks/calibrate.py)"
)
_B256 = (
    "weight streaming at batch 256, 2527.2 GB/s: the overlap at which the Llama-8B GEMMs "
    "at 256 rows take that long (calibration.streaming_overlap)"
)


def _measured(what: str) -> str:
    return f"{MEASURED_FILE}: {what}"


def _gpu_sections(fit: GpuFit, prefix: str = "") -> list[str]:
    """[efficiency] and [kernels] of the GPU fit; `prefix` says where they are borrowed."""
    e, k = fit.efficiency, fit.kernels
    return [
        "[efficiency]",
        "weight_read = "
        + _q(
            e.weight_read,
            "1",
            prefix
            + _measured("weight streaming at batch 1, 2919 GB/s, over the 3350 GB/s datasheet"),
        ),
        "kv_read = " + _q(e.kv_read, "1", prefix + _FIT),
        "compute = "
        + _q(
            e.compute,
            "1",
            prefix
            + _measured("dense bf16 8192^3 matmul, 771.2 TFLOP/s, over the 989 TFLOP/s datasheet"),
        ),
        "attention = " + _q(e.attention, "1", prefix + _FIT),
        "overlap = " + _q(e.overlap, "1", prefix + _measured(_B256)),
        "[kernels]",
        "activation_bytes_per_hidden = " + _q(k.activation_bytes_per_hidden, "B", prefix + _FIT),
        "kv_stream_bytes_per_s = " + _q(k.kv_stream_bytes_per_s, "B/s", prefix + _FIT),
        "split_k_s = " + _q(k.split_k_s, "s", prefix + _FIT),
    ]


def _fit_lines(fit: GpuFit) -> list[str]:
    out = ["[fit]"]
    for kind, table in (("decode", fit.decode), ("prefill", fit.prefill), ("mixed", fit.mixed)):
        for held, tag in ((True, "held_out"), (False, "fitted")):
            t = table.subset(held)
            if not t.rows:
                continue  # MIXED_RULE: no mixed step is fitted
            out += [
                f"{kind}_{tag}_points = {len(t.rows)}",
                f"{kind}_{tag}_median_abs_error = {t.median_abs_error!r}",
                f"{kind}_{tag}_max_abs_error = {t.max_abs_error!r}",
            ]
    return out


def gpu_toml(fit: GpuFit) -> str:
    no_host = _measured("decode replayed from CUDA graphs has no per-step host overhead")
    one_shape = "not separable with one model shape in the data; the wafer fit uses it"
    launch = _measured("median eager (kernel-by-kernel) batch-1 decode step, over 32 layers")
    return "\n".join(
        [
            "# Written by benchmarks/calibrate.py from the H100 Llama-3.1-8B data. Do not edit.",
            "# Every GPU profile uses these constants: nothing is fitted per GPU.",
            *_gpu_sections(fit),
            "[latency]",
            "per_step_s = " + _q(0.0, "s", no_host),
            "per_layer_s = " + _q(fit.latency.per_layer_s, "s", _FIT),
            "per_layer_per_hidden_s = " + _q(0.0, "s", one_shape),
            "launch_per_layer_s = " + _q(fit.latency.launch_per_layer_s, "s", launch),
            *_fit_lines(fit),
            "",
        ]
    )


def wafer_toml(fit: WaferFit, gpu: GpuFit) -> str:
    borrowed = "no wafer measurement exists; H100 fit reused: "
    how = "exact solve on the rows with fit = true in published.toml (benchmarks/calibrate.py)"
    two_rows = "not separable from per-layer latency with two published rows"
    no_launch = (
        "a wafer runs its layers as a resident dataflow program: no per-kernel host launches"
    )
    return "\n".join(
        [
            "# Written by benchmarks/calibrate.py from the published Cerebras rows. Do not edit.",
            *_gpu_sections(gpu, borrowed),
            "[latency]",
            "per_step_s = " + _q(0.0, "s", two_rows),
            "per_layer_s = " + _q(fit.latency.per_layer_s, "s", how),
            "per_layer_per_hidden_s = " + _q(fit.latency.per_layer_per_hidden_s, "s", how),
            "launch_per_layer_s = " + _q(0.0, "s", no_launch),
            f"[fit]\nmax_abs_error = {fit.rows.max_abs_error!r}",
            "",
        ]
    )


def stale_values(written: str, refit: str) -> list[str]:
    """What differs between a calibration file and a fresh fit, one line per value:
    numbers within `FITTED_REL_TOL` (relative) or, for `*_error` figures,
    `FIT_ERROR_ABS_TOL` (absolute); strings and keys exactly."""
    out: list[str] = []
    _diff(tomllib.loads(written), tomllib.loads(refit), "", out)
    return out


def _diff(old: object, new: object, name: str, out: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(old.keys() | new.keys()):
            where = f"{name}.{key}" if name else key
            if key not in new:
                out.append(f"{where}: not produced by the fit")
            elif key not in old:
                out.append(f"{where}: missing from the file")
            else:
                _diff(old[key], new[key], where, out)
        return
    numbers = (int, float)
    if isinstance(old, numbers) and isinstance(new, numbers):
        if name.endswith("_error"):
            ok = math.isclose(old, new, rel_tol=0.0, abs_tol=FIT_ERROR_ABS_TOL)
        else:
            ok = math.isclose(old, new, rel_tol=FITTED_REL_TOL, abs_tol=0.0)
        if not ok:
            rel = abs(new - old) / abs(old) if old else math.inf
            out.append(f"{name}: {old!r} in the file, {new!r} refitted ({rel:.2e} relative)")
    elif old != new:
        out.append(f"{name}: {old!r} in the file, {new!r} refitted")


# What each constant means; the value and how it was obtained come from the fit.
MEANINGS = {
    "efficiency.weight_read": "fraction of datasheet HBM bandwidth a weight GEMM streams at",
    "efficiency.kv_read": "fraction of datasheet HBM bandwidth attention reads KV at, chip full",
    "efficiency.compute": "fraction of datasheet dense FLOP/s a large GEMM reaches",
    "efficiency.attention": "fraction of datasheet FLOP/s prefill attention reaches",
    "efficiency.overlap": "share of a kernel's shorter term (memory or compute) not hidden",
    "kernels.activation_bytes_per_hidden": "bytes per token, layer and hidden unit moved by "
    "norms, rotary, SwiGLU, residual adds (unfused PyTorch here)",
    "kernels.kv_stream_bytes_per_s": "bandwidth one decode-attention stream (sequence x KV "
    "head) draws; caps attention when streams are too few to fill the SMs",
    "kernels.split_k_s": "reduction pass of a GEMM that splits K to fill the SMs",
    "latency.per_layer_s": "fixed kernel time per layer of a graph-replayed step",
    "latency.launch_per_layer_s": "host time to launch a layer's kernels op by op; a step the "
    "profile's execution mode launches so (eager; prefill under decode-graphs) takes at least "
    "layers x this",
    "latency.per_layer_per_hidden_s": "wafer: extra per-layer latency per hidden unit",
}


def constants_markdown(gpu: GpuFit, wafer: WaferFit) -> str:
    """The GPU constants (every GPU profile) and the wafer's own latency, with meaning and how
    each was obtained (measured on the device, fitted, or solved)."""
    text = tomllib.loads(gpu_toml(gpu))
    out = ["| constant | value | meaning | obtained |", "|---|---|---|---|"]
    for section in ("efficiency", "kernels", "latency"):
        for key, q in text[section].items():
            name = f"{section}.{key}"
            if name not in MEANINGS or name == "latency.per_layer_per_hidden_s":
                continue
            how = (
                "fitted" if q["source"] == _FIT else q["source"].removeprefix(f"{MEASURED_FILE}: ")
            )
            unit = "" if q["unit"] == "1" else f" {q['unit']}"
            out.append(f"| `{name}` | {q['value']:.4g}{unit} | {MEANINGS[name]} | {how} |")
    lat = wafer.latency
    solved = "solved exactly from the two fit rows of published.toml"
    out.append(
        f"| wafer `latency.per_layer_s` | {lat.per_layer_s:.4g} s "
        f"| wafer: latency per layer as the activations cross the fabric | {solved} |"
    )
    out.append(
        f"| wafer `latency.per_layer_per_hidden_s` | {lat.per_layer_per_hidden_s:.4g} s "
        f"| {MEANINGS['latency.per_layer_per_hidden_s']} | {solved} |"
    )
    return "\n".join(out)


def markdown(split: list[ErrorTable], tables: list[ErrorTable]) -> str:
    """A summary line per table (the `split` ones as held out and fit points), then each point."""
    out = ["| data set | points | median abs error | max abs error |", "|---|---|---|---|"]
    summary = [t.subset(held) for t in split for held in (True, False)] + tables
    for t in summary:
        out.append(
            f"| {t.name} | {len(t.rows)} | {t.median_abs_error:.1%} | {t.max_abs_error:.1%} |"
        )
    for t in split + tables:
        out += [
            "",
            f"**{t.name}**",
            "",
            "| point | measured | predicted | error | used |",
            "|---|---|---|---|---|",
        ]
        for r in t.rows:
            used = "held out" if r.held_out else ("fit" if t in split else "-")
            out.append(
                f"| {r.label} | {r.measured_s * 1e3:.3f} ms "
                f"| {r.predicted_s * 1e3:.3f} ms | {r.error:+.1%} | {used} |"
            )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--check", action="store_true", help="fail if the calibration files are stale"
    )
    args = parser.parse_args()
    gpu = fit_gpu()
    wafer = fit_wafer(
        replace(load_hardware("wse-3"), efficiency=gpu.efficiency, kernels=gpu.kernels)
    )
    files = {
        CAL_DIR / "gpu-fit.toml": gpu_toml(gpu),
        CAL_DIR / "wse-fit.toml": wafer_toml(wafer, gpu),
    }
    if args.check:
        problems = [
            f"{p.name}: {d}" for p, text in files.items() for d in stale_values(p.read_text(), text)
        ]
        if problems:
            print("stale calibration; run python benchmarks/calibrate.py", file=sys.stderr)
            for line in problems:
                print(f"  {line}", file=sys.stderr)
            return 1
    else:
        for path, text in files.items():
            path.write_text(text)
    others = ErrorTable(
        "Published single-stream ITL rows not used in any fit",
        tuple(
            ErrorRow(c.label, c.published, c.predicted)
            for row, c in zip(load_published(), published_comparisons().rows, strict=True)
            if c.metric == "itl_s" and row["concurrency"] == 1
        ),
    )
    print(constants_markdown(gpu, wafer))
    print()
    print(markdown([gpu.decode, gpu.prefill], [gpu.mixed.subset(True), wafer.rows, others]))
    print()
    print(hidden_stack_markdown())
    return 0


def hidden_stack_markdown(seed: int = 0) -> str:
    """`memorywall calibrate` on the synthetic hidden stack (memorywall/calibrate/synthetic.py):
    held-out errors with every constant the data identify, and with the three of old."""
    from memorywall.calibrate import synthetic
    from memorywall.calibrate.fit import CORE, SPECS

    three = tuple(s for s in SPECS if s.key in CORE)
    out = [
        f"**`memorywall calibrate` on a hidden stack** (synthetic, {synthetic.NOISE:.0%} noise, "
        f"seed {seed}; held out: other batches, contexts and prompt lengths)",
        "",
        "| fit | constants fitted | held-out median abs error | held-out max abs error |",
        "|---|---|---|---|",
    ]
    full = synthetic.run(seed, resamples=50)
    old = synthetic.run(seed, resamples=50, specs=three)
    before = np.abs(full.before_errors)
    fitted = sum(e.fitted for e in full.estimates)
    for name, n, median, worst in (
        ("base profile, unfitted", 0, np.median(before), before.max()),
        ("three constants (weight_read, kv_read, compute)", 3, old.median, old.max),
        ("every constant the data identify", fitted, full.median, full.max),
    ):
        out.append(f"| {name} | {n} | {median:.1%} | {worst:.1%} |")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
