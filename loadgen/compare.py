"""`memorywall bench compare`: several saved sweeps side by side, each labelled by what it
measured, in one table and in the legends of the plots."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit

from memorywall.loadgen import rates

SUMMARY = "summary.json"
BENCH_DEFAULT_LABEL = "run"  # `memorywall bench --label`'s default: says nothing
_NEEDED = {"label", "request_rate", "max_concurrency", "output_throughput"}


class CompareError(Exception):
    """A path that is not a saved sweep, or labels that do not match the paths."""


def load_summary(path: Path) -> list[dict]:
    """A sweep's level results from its --out folder or its summary.json."""
    summary = path / SUMMARY if path.is_dir() else path
    try:
        results = json.loads(summary.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CompareError(f"{summary}: not a bench summary ({e})") from None
    if (
        not isinstance(results, list)
        or not results
        or not all(isinstance(r, dict) and r.keys() >= _NEEDED for r in results)
    ):
        raise CompareError(f"{summary}: not a bench summary (a non-empty list of level results)")
    return results


def _folder(path: Path) -> str:
    """The name of a sweep's --out folder, given the folder or its summary.json."""
    return (path.parent if path.suffix == ".json" else path).resolve().name


def describe(results: Sequence[dict], path: Path) -> str:
    """What a sweep measured: hardware x devices and model for the emulator (or a
    simulation), the model and host of any other server, else the folder's name."""
    r = results[0]
    folder = _folder(path)
    if r.get("hardware") and r.get("model"):
        text = f"{r['hardware']} x{r.get('devices', 1)} {r['model']}"
        return f"{text} (simulated)" if r.get("simulated") else text
    target = r.get("target") or ""
    host = urlsplit(target).netloc if "://" in target else target
    if r.get("model") and host:
        return f"{r['model']} @ {host}"
    return r.get("model") or folder or str(path)


def labels_for(sweeps: Sequence[tuple[Path, list[dict]]], given: Sequence[str] | None) -> list[str]:
    """`given` (one per sweep) if any; else each sweep's own --label when it was set, else
    `describe`. Labels that still collide get their folder's name added."""
    if given is not None:
        if len(given) != len(sweeps):
            raise CompareError(
                f"--label: {len(given)} labels for {len(sweeps)} sweeps; give one per path"
            )
        return list(given)
    out = [
        r[0]["label"] if r[0].get("label") not in (None, BENCH_DEFAULT_LABEL) else describe(r, p)
        for p, r in sweeps
    ]
    seen = Counter(out)
    return [
        f"{label} ({_folder(p)})" if seen[label] > 1 else label
        for label, (p, _) in zip(out, sweeps, strict=True)
    ]


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.2f} ms"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def load_label(r: dict) -> str:
    if r.get("request_rate"):
        return f"{r['request_rate']:g}/s"
    if r.get("max_concurrency"):
        return f"c={r['max_concurrency']}"
    return "trace"


def table(sweeps: Sequence[tuple[str, list[dict]]]) -> str:
    header = (
        "sweep",
        "load",
        "TTFT mean",
        "TPOT mean",
        "tok/s/user",
        "output tok/s",
        "tok/s/device",
    )
    rows = [header]
    for label, results in sweeps:
        for r in results:
            tput = r.get("output_throughput")
            rows.append(
                (
                    label,
                    load_label(r),
                    _ms(r.get("mean_ttft_ms")),
                    _ms(r.get("mean_tpot_ms")),
                    _rate(rates.measured(r).per_user),
                    _rate(tput),
                    _rate(None if tput is None else tput / r.get("devices", 1)),
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    return "\n".join(lines)


def compare(paths: Sequence[Path], out: Path | None, labels: Sequence[str] | None = None) -> int:
    """Print the sweeps side by side; with `out`, write the comparison plots there."""
    loaded = [(p, load_summary(p)) for p in paths]
    sweeps = list(zip(labels_for(loaded, labels), (r for _, r in loaded), strict=True))
    print(table(sweeps))
    if out:
        from memorywall.loadgen import plots  # matplotlib: only when plotting

        out.mkdir(parents=True, exist_ok=True)
        plots.latency_vs_load(sweeps, out / "latency_vs_load.png")
        plots.per_user_vs_load(sweeps, out / "per_user_vs_load.png")
        plots.throughput_vs_interactivity(sweeps, out / "throughput_vs_interactivity.png")
        print(f"wrote {out}/")
    return 0
