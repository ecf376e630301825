"""The Grafana dashboard for memorywall workers, built from a list of panels.

`memorywall grafana-dashboard` prints it; docs/grafana/memorywall.json is a copy (a
test keeps the two equal). It reads what a worker serves on `/metrics` (vLLM's
names and `memorywall:*`) and on its emulated dcgm-exporter (`DCGM_FI_DEV_*`), with
the target labels `memorywall fleet --prometheus-config` gives each scrape: `worker`
(the fleet's name for it) and `hardware` (its profile, as DCGM's `modelName`). Series
without them (a worker scraped by a hand-written job) still show, under one empty
name. The datasource is the `${DS_PROMETHEUS}` input of an exported dashboard:
Grafana asks for a Prometheus datasource on import.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DATASOURCE_INPUT",
    "ROWS",
    "Panel",
    "Row",
    "Target",
    "dashboard",
    "expressions",
    "render",
]

DATASOURCE_INPUT = "DS_PROMETHEUS"
_DATASOURCE = {"type": "prometheus", "uid": "${" + DATASOURCE_INPUT + "}"}
# Every series is filtered by the two template variables (both "All" by default: `.*`,
# which also matches a series without the label).
_SEL = 'worker=~"$worker",hardware=~"$hardware"'
_BY = "worker, hardware"
_WHO = "{{worker}} ({{hardware}})"
_RATE = "$__rate_interval"
_WIDTH, _HEIGHT = 12, 8  # two panels side by side on Grafana's 24-column grid


@dataclass(frozen=True)
class Target:
    """One PromQL query of a panel and its legend; `heatmap`: the buckets, as a heatmap
    panel wants them."""

    expr: str
    legend: str
    heatmap: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str  # Grafana's unit id ("s", "watt", "suffix:tok/s", ...)
    targets: tuple[Target, ...]
    description: str = ""
    kind: str = "timeseries"  # or "heatmap"


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


def _rate(name: str) -> str:
    return f"rate({name}{{{_SEL}}}[{_RATE}])"


def _sum_rate(name: str, by: str = _BY) -> str:
    return f"sum by ({by}) ({_rate(name)})"


def _quantiles(histogram: str, qs: tuple[float, ...] = (0.5, 0.9, 0.99)) -> tuple[Target, ...]:
    """histogram_quantile over the `_bucket` series, per worker."""
    return tuple(
        Target(
            f"histogram_quantile({q:g}, sum by (le, {_BY}) ({_rate(histogram + '_bucket')}))",
            f"p{q * 100:g} {_WHO}",
        )
        for q in qs
    )


def _mean_itl() -> Target:
    itl = "vllm:inter_token_latency_seconds"
    return Target(f"{_sum_rate(itl + '_sum')} / {_sum_rate(itl + '_count')}", f"mean {_WHO}")


def _per_user(by: str, legend: str) -> Target:
    """A user's tokens/s: inter-token latencies counted over their sum (1 / mean ITL)."""
    itl = "vllm:inter_token_latency_seconds"
    return Target(f"{_sum_rate(itl + '_count', by)} / {_sum_rate(itl + '_sum', by)}", legend)


_TOKENS = "vllm:generation_tokens_total"
_DCGM_ENERGY = "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"  # mJ, a counter
_DCGM_POWER = "DCGM_FI_DEV_POWER_USAGE"

ROWS: tuple[Row, ...] = (
    Row(
        "Latency (modelled time)",
        (
            Panel("Time to first token", "s", _quantiles("vllm:time_to_first_token_seconds")),
            Panel(
                "Inter-token latency",
                "s",
                (*_quantiles("vllm:inter_token_latency_seconds"), _mean_itl()),
                description="Quantiles from vLLM's buckets, whose first bound is 10 ms: a "
                "wafer's sub-millisecond ITL reads as ~5 ms there; the mean (from _sum and "
                "_count) is exact.",
            ),
            Panel(
                "End-to-end request latency",
                "s",
                _quantiles("vllm:e2e_request_latency_seconds", (0.5, 0.99)),
            ),
            Panel(
                "Inter-token latency histogram",
                "s",
                (
                    Target(
                        f"sum by (le) (increase(vllm:inter_token_latency_seconds_bucket"
                        f"{{{_SEL}}}[{_RATE}]))",
                        "{{le}}",
                        heatmap=True,
                    ),
                ),
                description="Tokens per inter-token latency bucket, all selected workers.",
                kind="heatmap",
            ),
        ),
    ),
    Row(
        "Throughput, batch and KV cache",
        (
            Panel(
                "Tokens/s",
                "suffix:tok/s",
                (
                    Target(_sum_rate(_TOKENS), f"output {_WHO}"),
                    Target(_sum_rate("vllm:prompt_tokens_total"), f"prompt {_WHO}"),
                ),
            ),
            Panel("Tokens/s per user", "suffix:tok/s", (_per_user(_BY, _WHO),)),
            Panel(
                "Batch",
                "short",
                (
                    Target(f"vllm:num_requests_running{{{_SEL}}}", f"running {_WHO}"),
                    Target(f"vllm:num_requests_waiting{{{_SEL}}}", f"waiting {_WHO}"),
                ),
            ),
            Panel(
                "KV cache usage",
                "percentunit",
                (Target(f"vllm:kv_cache_usage_perc{{{_SEL}}}", _WHO),),
            ),
        ),
    ),
    Row(
        "Power and energy (emulated DCGM)",
        (
            Panel(
                "Power per device",
                "watt",
                (Target(f"{_DCGM_POWER}{{{_SEL}}}", "{{worker}} gpu {{gpu}} ({{modelName}})"),),
            ),
            Panel(
                "Energy per output token",
                "joule",
                (
                    Target(
                        f"{_sum_rate(_DCGM_ENERGY)} / 1000 / {_sum_rate(_TOKENS)}",
                        f"DCGM {_WHO}",
                    ),
                    Target(
                        f"{_sum_rate('memorywall:modelled_energy_joules_total')} / "
                        f"{_sum_rate(_TOKENS)}",
                        f"modelled {_WHO}",
                    ),
                ),
                description="Energy of every step (prefill included) over the tokens "
                "generated: from the DCGM energy counters, and from the server's own.",
            ),
            Panel(
                "Utilisation",
                "percent",
                (
                    Target(
                        f"DCGM_FI_DEV_GPU_UTIL{{{_SEL}}}", "{{worker}} gpu {{gpu}} ({{modelName}})"
                    ),
                ),
            ),
            Panel(
                "Device memory used",
                "percentunit",
                (
                    Target(
                        f"DCGM_FI_DEV_FB_USED{{{_SEL}}} / (DCGM_FI_DEV_FB_USED{{{_SEL}}} + "
                        f"DCGM_FI_DEV_FB_FREE{{{_SEL}}})",
                        "{{worker}} gpu {{gpu}} ({{modelName}})",
                    ),
                ),
                description="Resident weights plus the KV cache held, over device memory.",
            ),
        ),
    ),
    Row(
        "Wafer vs GPU",
        (
            Panel(
                "Output tokens/s per device",
                "suffix:tok/s",
                (
                    Target(
                        f"{_sum_rate(_TOKENS, 'hardware')} / "
                        f"count by (hardware) ({_DCGM_POWER}{{{_SEL}}})",
                        "{{hardware}}",
                    ),
                ),
            ),
            Panel("Tokens/s per user", "suffix:tok/s", (_per_user("hardware", "{{hardware}}"),)),
            Panel(
                "Tokens per joule",
                "suffix:tok/J",
                (
                    Target(
                        f"{_sum_rate(_TOKENS, 'hardware')} / "
                        f"({_sum_rate(_DCGM_ENERGY, 'hardware')} / 1000)",
                        "{{hardware}}",
                    ),
                ),
            ),
            Panel(
                "Power by hardware",
                "watt",
                (Target(f"sum by (modelName) ({_DCGM_POWER}{{{_SEL}}})", "{{modelName}}"),),
            ),
        ),
    ),
    Row(
        "Emulation",
        (
            Panel(
                "Emulation lag",
                "s",
                _quantiles("memorywall:emulation_lag_seconds", (0.5, 0.99)),
                description="Wall-clock time a token group reached its stream after its "
                "modelled time: how far the host trails the emulated hardware.",
            ),
            Panel(
                "Host stalls",
                "short",
                (
                    Target(_sum_rate("memorywall:host_stall_seconds_total"), f"stall s/s {_WHO}"),
                    Target(f"memorywall:degraded{{{_SEL}}}", f"degraded {_WHO}"),
                ),
                description="Modelled seconds added per second by host stalls, and 1 while "
                "the host falls behind the modelled timeline.",
            ),
            Panel(
                "Modelled power",
                "watt",
                (
                    Target(f"memorywall:modelled_power_watts{{{_SEL}}}", f"modelled {_WHO}"),
                    Target(f"memorywall:rated_power_watts{{{_SEL}}}", f"rated (TDP) {_WHO}"),
                ),
            ),
            Panel("Step time", "s", _quantiles("memorywall:step_time_seconds", (0.5, 0.99))),
        ),
    ),
)


def _variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A multi-value query variable, "All" (`.*`) by default."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": _DATASOURCE,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-values"},
        "refresh": 2,  # on time range change: workers come and go
        "includeAll": True,
        "allValue": ".*",
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    targets = []
    for i, t in enumerate(panel.targets):
        target = {
            "datasource": _DATASOURCE,
            "expr": t.expr,
            "legendFormat": t.legend,
            "refId": chr(ord("A") + i),
        }
        if t.heatmap:
            target["format"] = "heatmap"
        targets.append(target)
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": _DATASOURCE,
        "gridPos": {"h": _HEIGHT, "w": _WIDTH, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True}},
        "targets": targets,
    }


def _panels() -> list[dict[str, Any]]:
    """Rows and their panels, laid out two to a line."""
    out: list[dict[str, Any]] = []
    y = 0
    for row in ROWS:
        out.append(
            {
                "id": len(out) + 1,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        for i, panel in enumerate(row.panels):
            out.append(_panel(panel, len(out) + 1, (i % 2) * _WIDTH, y + (i // 2) * _HEIGHT))
        y += -(-len(row.panels) // 2) * _HEIGHT
    return out


def dashboard() -> dict[str, Any]:
    """The dashboard, as Grafana's "Export for sharing externally" writes one."""
    kinds = sorted({p.kind for row in ROWS for p in row.panels})
    return {
        "__inputs": [
            {
                "name": DATASOURCE_INPUT,
                "label": "Prometheus",
                "description": "The Prometheus that scrapes the workers and their DCGM ports",
                "type": "datasource",
                "pluginId": "prometheus",
                "pluginName": "Prometheus",
            }
        ],
        "__requires": [
            {"type": "grafana", "id": "grafana", "name": "Grafana", "version": "10.0.0"},
            {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
            *({"type": "panel", "id": k, "name": k, "version": ""} for k in kinds),
        ],
        "annotations": {"list": []},
        "description": "memorywall: emulated wafer-scale and GPU inference servers, side by "
        "side (vLLM metrics, memorywall:* and the emulated dcgm-exporter)",
        "editable": True,
        "graphTooltip": 1,  # shared crosshair
        "links": [],
        "panels": _panels(),
        "refresh": "5s",
        "schemaVersion": 38,
        "tags": ["memorywall", "vllm", "dcgm"],
        "templating": {
            "list": [
                _variable(
                    "hardware", "Hardware", "label_values(vllm:num_requests_running, hardware)"
                ),
                _variable(
                    "worker",
                    "Worker",
                    'label_values(vllm:num_requests_running{hardware=~"$hardware"}, worker)',
                ),
            ]
        },
        "time": {"from": "now-15m", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "memorywall: wafer vs GPU",
        "uid": "memorywall",
        "version": 1,
    }


def expressions(board: dict[str, Any]) -> list[str]:
    """Every PromQL expression of a dashboard: its panels' targets, and its query
    variables' `label_values(SELECTOR, label)` selectors."""
    out = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for variable in board["templating"]["list"]:
        query = variable["query"]["query"]
        if query.startswith("label_values(") and query.endswith(")"):
            out.append(query[len("label_values(") : query.rindex(",")])
        else:
            out.append(query)
    return out


def render() -> str:
    """The dashboard as JSON text (what `memorywall grafana-dashboard` prints)."""
    return json.dumps(dashboard(), indent=2) + "\n"
