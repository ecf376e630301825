"""Fit the calibration constants and write them to core/calibration/*.toml.

    python benchmarks/calibrate.py          # fit, print error tables, write files
    python benchmarks/calibrate.py --check  # fit and fail if the files are stale

Prints the error tables as Markdown (the README's calibration table comes from here).
"""

from __future__ import annotations

import argparse
import math
import sys
import tomllib
from dataclasses import replace
from pathlib import Path

from memorywall.core.calibration import (
    MEASURED_FILE,
    ErrorTable,
    GpuFit,
    WaferFit,
    fit_gpu,
    fit_wafer,
    load_published,
    published_error_table,
)
from memorywall.core.hardware import Efficiency, load_hardware

CAL_DIR = Path(__file__).resolve().parent.parent / "core" / "calibration"

# A refit on another CPU differs in the last digits (BLAS and libm differ), so
# freshness compares numbers within these tolerances, never the file text.
FITTED_REL_TOL = 1e-9  # fitted constants, relative
FIT_ERROR_ABS_TOL = 1e-9  # the fit's own error figures (fractions), absolute


def _q(value: float, unit: str, source: str) -> str:
    return f'{{ value = {value!r}, unit = "{unit}", source = "{source}" }}'


def _efficiency_lines(e: Efficiency, how: str, prefix: str = "") -> list[str]:
    ceiling = (
        f"{MEASURED_FILE}: measured weight-streaming ceiling at batch 1, 2919 GB/s, "
        "over the 3350 GB/s datasheet"
    )
    return [
        "[efficiency]",
        "weight_read = " + _q(e.weight_read, "1", prefix + ceiling),
        "kv_read = " + _q(e.kv_read, "1", prefix + how),
        "compute = " + _q(e.compute, "1", prefix + how),
        "attention = " + _q(e.attention, "1", prefix + how),
        "overlap = " + _q(e.overlap, "1", prefix + how),
    ]


def gpu_toml(fit: GpuFit) -> str:
    how = f"least-squares fit of relative error on {MEASURED_FILE} (benchmarks/calibrate.py)"
    no_host = f"{MEASURED_FILE}: decode replayed from CUDA graphs has no per-step host overhead"
    one_shape = "not separable with one model shape in the data; the wafer fit uses it"
    return "\n".join(
        [
            "# Written by benchmarks/calibrate.py from the H100 Llama-3.1-8B data. Do not edit.",
            "# Every GPU profile uses these constants: nothing is fitted per GPU.",
            *_efficiency_lines(fit.efficiency, how),
            "[latency]",
            "per_step_s = " + _q(0.0, "s", no_host),
            "per_layer_s = " + _q(fit.latency.per_layer_s, "s", how),
            "per_layer_per_hidden_s = " + _q(0.0, "s", one_shape),
            "[fit]",
            f"decode_median_abs_error = {fit.decode.median_abs_error!r}",
            f"decode_max_abs_error = {fit.decode.max_abs_error!r}",
            f"prefill_median_abs_error = {fit.prefill.median_abs_error!r}",
            f"prefill_max_abs_error = {fit.prefill.max_abs_error!r}",
            "",
        ]
    )


def wafer_toml(fit: WaferFit, efficiency: Efficiency) -> str:
    gpu_how = f"least-squares fit of relative error on {MEASURED_FILE} (benchmarks/calibrate.py)"
    borrowed = "no wafer measurement exists; H100 fit reused: "
    how = "exact solve on the rows with fit = true in published.toml (benchmarks/calibrate.py)"
    two_rows = "not separable from per-layer latency with two published rows"
    return "\n".join(
        [
            "# Written by benchmarks/calibrate.py from the published Cerebras rows. Do not edit.",
            *_efficiency_lines(efficiency, gpu_how, borrowed),
            "[latency]",
            "per_step_s = " + _q(0.0, "s", two_rows),
            "per_layer_s = " + _q(fit.latency.per_layer_s, "s", how),
            "per_layer_per_hidden_s = " + _q(fit.latency.per_layer_per_hidden_s, "s", how),
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


def markdown(tables: list[ErrorTable]) -> str:
    out = ["| data set | points | median abs error | max abs error |", "|---|---|---|---|"]
    for t in tables:
        out.append(
            f"| {t.name} | {len(t.rows)} | {t.median_abs_error:.1%} | {t.max_abs_error:.1%} |"
        )
    for t in tables:
        out += [
            "",
            f"**{t.name}**",
            "",
            "| point | measured | predicted | error |",
            "|---|---|---|---|",
        ]
        for r in t.rows:
            out.append(
                f"| {r.label} | {r.measured_s * 1e3:.3f} ms "
                f"| {r.predicted_s * 1e3:.3f} ms | {r.error:+.1%} |"
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
    wafer = fit_wafer(replace(load_hardware("wse-3"), efficiency=gpu.efficiency))
    files = {
        CAL_DIR / "gpu-fit.toml": gpu_toml(gpu),
        CAL_DIR / "wse-fit.toml": wafer_toml(wafer, gpu.efficiency),
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
    others = published_error_table(
        [r for r in load_published() if not r["fit"]], "Published rows not used in any fit"
    )
    print(markdown([gpu.decode, gpu.prefill, wafer.rows, others]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
