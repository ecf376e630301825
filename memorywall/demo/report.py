"""What `memorywall demo` prints: the side-by-side table, and where to point tools next."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING

from memorywall.loadgen import rates

if TYPE_CHECKING:
    from memorywall.demo.config import DemoConfig
    from memorywall.ready import ServerReady

HEADER = (
    "users",
    "hardware",
    "",
    "TTFT ms",
    "TPOT ms",
    "tok/s/user",
    "tok/s total",
    "tok/s/device",
    "tok/s/kW",
)


def _ms(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.2f}" if v < 10 else f"{v:,.1f}"


def _rate(v: float | None) -> str:
    if v is None:
        return "n/a"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _figures(r: dict, kind: str) -> list[str]:
    """One row of figures: the level measured, simulated, or the core's steady state."""
    if kind == "predicted":
        got, ttft, tpot = rates.predicted(r), r.get("predicted_ttft_ms"), r.get("predicted_tpot_ms")
    else:
        m = r if kind == "measured" else r.get("offline") or {}
        got, ttft, tpot = rates.measured(m), m.get("mean_ttft_ms"), m.get("mean_tpot_ms")
    devices = r.get("devices", 1)
    kw = devices * r["tdp_w"] / 1e3 if r.get("tdp_w") else None
    total = got.total
    return [
        _ms(ttft),
        _ms(tpot),
        _rate(got.per_user),
        _rate(total),
        _rate(None if total is None else total / devices),
        _rate(None if total is None or kw is None else total / kw),
    ]


def users_text(n: int) -> str:
    return f"{n} user" if n == 1 else f"{n} users"


def _ratio_line(sweeps: Sequence[tuple[str, list[dict]]], levels: Sequence[int]) -> str | None:
    """Per-user speed of the first backend over the second's, at each level: measured where
    both measured rows are faithful (not marked *), else simulated, and said so."""
    if len(sweeps) < 2:
        return None
    (a, ra), (b, rb) = sweeps[0], sweeps[1]
    measured: list[str] = []  # "2.0x at 4 users", where both rows were measured faithfully
    simulated: list[str] = []
    for users, x, y in zip(levels, ra, rb, strict=True):
        if not x.get("suspect") and not y.get("suspect"):
            px, py, parts = rates.measured(x).per_user, rates.measured(y).per_user, measured
        else:
            sx, sy = x.get("offline") or {}, y.get("offline") or {}
            px, py, parts = rates.measured(sx).per_user, rates.measured(sy).per_user, simulated
        if px and py:
            parts.append(f"{px / py:.1f}x at {users_text(users)}")
    if not measured and not simulated:
        return None
    out = f"Per-user speed, {a} over {b}"
    if measured:
        out += f" (measured): {', '.join(measured)}"
        if simulated:
            out += f"; simulated, where a measured row is marked *: {', '.join(simulated)}"
    else:
        out += f" (simulated: every measured row is marked *): {', '.join(simulated)}"
    return out + "."


def table(config: DemoConfig, sweeps: Sequence[tuple[str, list[dict]]]) -> str:
    """Every level of every backend: a measured row, the simulated one (when run) and the
    core's steady-state prediction below it."""
    rows: list[Sequence[str]] = [HEADER]
    notes = []
    for i, users in enumerate(config.levels):
        for j, (name, results) in enumerate(sweeps):
            r = results[i]
            doubts = r.get("suspect", [])
            mark = "*" if doubts else ""
            if doubts:
                notes.append(f"* {name}, {users_text(users)}: {'; '.join(doubts)}")
            first = str(users) if j == 0 else ""
            rows.append((first, name, "measured" + mark, *_figures(r, "measured")))
            if r.get("offline"):
                rows.append(("", "", "simulated", *_figures(r, "simulated")))
            rows.append(("", "", "predicted", *_figures(r, "predicted")))
    widths = [max(len(row[k]) for row in rows) for k in range(len(HEADER))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            c.ljust(w) if k < 3 else c.rjust(w)
            for k, (c, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    head = (
        f"{config.model}, closed loop: {config.prompt_tokens}-token prompts, "
        f"{config.output_tokens} output tokens.\n"
        "measured: this machine's client against the emulated server. simulated: the same "
        "engine and load on a\nvirtual clock (memorywall simulate: what the emulator should "
        "deliver, queueing included). predicted: the\ncore's steady state (its TTFT is one "
        "prompt's prefill, without queueing). tok/s/kW: per kW of rated power."
    )
    out = [head, "", *lines]
    if ratio := _ratio_line(sweeps, config.levels):
        out += ["", ratio]
    if notes:
        out += ["", "* not a fact about the emulated hardware:", *notes]
    return "\n".join(out)


def hints(config: DemoConfig, servers: Sequence[ServerReady]) -> str:
    """How to point `bench`, curl, the openai client and smg at the servers left up."""
    model = config.model
    lines = ["", "The servers are still up:"]
    for s in servers:
        lines.append(
            f"  {s.hardware} x{s.devices}: gRPC {s.grpc_target}, HTTP {s.http_url}, pid {s.pid}"
        )
    first = servers[0]
    body = f'{{"model": "{model}", "prompt": "Hello", "max_tokens": 32, "stream": true}}'
    client = (
        "from openai import OpenAI; "
        f"c = OpenAI(base_url='{first.http_url}/v1', api_key='none'); "
        f"print(c.completions.create(model='{model}', prompt='Hello', max_tokens=16)"
        ".choices[0].text)"
    )
    workers = " ".join(f"grpc://{s.grpc_target}" for s in servers)
    out = shlex.quote(str(config.out))
    lines += [
        "",
        "Try:",
        f"  memorywall bench --target {first.grpc_target} --concurrency 1,4,16 "
        f"--out {out}/more-{first.hardware}",
        f"  curl -N {first.http_url}/v1/completions -H 'Content-Type: application/json' "
        f"-d '{body}'",
        f'  python -c "{client}"',  # no $, ` or " inside: safe in double quotes
        f"  smg launch --worker-urls {workers} --policy round_robin --port 30000"
        "   # pip install 'memorywall[gateway]'",
        "  memorywall bench compare "
        + " ".join(f"{out}/{s.hardware}" for s in servers)
        + f" --out {out}/compare",
    ]
    return "\n".join(lines)
