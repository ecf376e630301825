"""`memorywall calibrate`: fit a hardware profile's efficiencies to the user's own runs.

Observations come from two kinds of file:
- a CSV of step times, columns `batch,context,new_tokens,seconds`: `batch`
  sequences decoding over `context` cached tokens, plus (when `new_tokens` > 0)
  one prefill chunk of `new_tokens` after `context` cached tokens (`batch` 0:
  a prefill alone). Each row is compared with the core's step cost.
- result JSON files in vLLM `bench serve`'s keys (what `memorywall bench --out`
  writes too): `mean_ttft_ms`, `mean_tpot_ms`, `completed`,
  `total_input_tokens`, `total_output_tokens`, and `max_concurrency` (closed
  loop) or `request_rate` (open loop). Each load level is replayed on the
  serving engine, offline (`memorywall.sim.simulate`), with its mean prompt and
  output lengths, and its mean TTFT and TPOT compared.

Three constants are fitted, the ones such data identify: `weight_read` (how
fast decode streams the weights), `kv_read` (how a decode step grows with the
KV it reads) and `compute` (prefill). The rest stay the base profile's. The
fit minimises squared relative error over the fit observations (Gauss-Newton
on log constants); every third observation, in file order, is held out when at
least five remain to fit. Data that cannot identify a constant is refused with
the reason.
"""

from __future__ import annotations

import csv
import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from memorywall.core import Batch, Deployment, PrefillChunk, StepModel
from memorywall.core.hardware import Efficiency, Hardware

FITTED = ("weight_read", "kv_read", "compute")
HOLD_OUT_EVERY = 3
MIN_FIT = 5
MAX_REPLAY_REQUESTS = 200  # a level's replay: its own request count, capped


class CalibrateError(Exception):
    """Data that cannot be read or cannot identify a constant (one CLI line, exit 2)."""


@dataclass(frozen=True)
class StepRow:
    batch: int
    context: int
    new_tokens: int
    seconds: float

    def as_batch(self) -> Batch:
        prefill = (PrefillChunk(self.new_tokens, cached_tokens=self.context),)
        return Batch(
            decode_contexts=(self.context,) * self.batch,
            prefill=prefill if self.new_tokens else (),
        )


@dataclass(frozen=True)
class Level:
    """One load level of a result file: closed loop (`concurrency`) or open (`rate`)."""

    source: str
    concurrency: int | None
    rate: float | None
    requests: int
    prompt: int
    output: int
    ttft_s: float
    tpot_s: float

    @property
    def name(self) -> str:
        load = f"c{self.concurrency}" if self.concurrency else f"rate{self.rate:g}"
        return f"{self.source} {load}"


@dataclass(frozen=True)
class Observation:
    label: str
    metric: str  # "step", "ttft" or "tpot"
    measured_s: float
    held_out: bool = False


@dataclass(frozen=True)
class Row:
    observation: Observation
    before_s: float
    after_s: float


@dataclass(frozen=True)
class Calibration:
    efficiency: Efficiency
    rows: tuple[Row, ...]
    files: tuple[str, ...]


def read_inputs(paths: list[Path]) -> tuple[list[StepRow], list[Level]]:
    steps: list[StepRow] = []
    levels: list[Level] = []
    for path in paths:
        if not path.is_file():
            raise CalibrateError(f"{path}: no such file")
        if path.suffix == ".csv":
            steps += _read_csv(path)
        elif path.suffix == ".json":
            levels.append(_read_level(path))
        else:
            raise CalibrateError(f"{path}: expected a .csv of step times or a .json result file")
    return steps, levels


def _read_csv(path: Path) -> list[StepRow]:
    want = ("batch", "context", "new_tokens", "seconds")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != want:
            raise CalibrateError(f"{path}: expected the columns {','.join(want)}")
        rows = []
        for i, r in enumerate(reader, start=2):
            try:
                row = StepRow(
                    int(r["batch"]), int(r["context"]), int(r["new_tokens"]), float(r["seconds"])
                )
            except ValueError:
                raise CalibrateError(f"{path}:{i}: not numbers: {list(r.values())}") from None
            if min(row.batch, row.context, row.new_tokens) < 0 or not row.seconds > 0:
                raise CalibrateError(f"{path}:{i}: negative count or non-positive seconds")
            if row.batch == 0 and row.new_tokens == 0:
                raise CalibrateError(f"{path}:{i}: a step with no sequences")
            rows.append(row)
    return rows


def _read_level(path: Path) -> Level:
    try:
        r = json.loads(path.read_text())
        done = int(r["completed"])
        concurrency, rate = r.get("max_concurrency"), r.get("request_rate")
        level = Level(
            source=path.name,
            concurrency=int(concurrency) if concurrency else None,
            rate=float(rate) if rate not in (None, "inf") and not concurrency else None,
            requests=done,
            prompt=round(r["total_input_tokens"] / done),
            output=round(r["total_output_tokens"] / done),
            ttft_s=r["mean_ttft_ms"] / 1e3,
            tpot_s=r["mean_tpot_ms"] / 1e3,
        )
    except (ValueError, KeyError, TypeError, ZeroDivisionError) as e:
        raise CalibrateError(
            f"{path}: not a bench result with completed requests ({e!r})"
        ) from None
    if level.concurrency is None and level.rate is None:
        raise CalibrateError(f"{path}: neither max_concurrency nor a finite request_rate")
    return level


def observations(steps: list[StepRow], levels: list[Level]) -> list[Observation]:
    """Steps, then each level's TTFT and TPOT; every third held out if enough remain."""
    obs = [
        Observation(f"step b={s.batch} ctx={s.context} new={s.new_tokens}", "step", s.seconds)
        for s in steps
    ]
    for lv in levels:
        obs.append(Observation(f"{lv.name} TTFT", "ttft", lv.ttft_s))
        obs.append(Observation(f"{lv.name} TPOT", "tpot", lv.tpot_s))
    held = [(i + 1) % HOLD_OUT_EVERY == 0 for i in range(len(obs))]
    if len(obs) - sum(held) < MIN_FIT:
        return obs
    return [replace(o, held_out=h) for o, h in zip(obs, held, strict=True)]


def check_identifiable(steps: list[StepRow], levels: list[Level]) -> None:
    """Refuse data that cannot pin down each fitted constant, saying what to measure."""
    # (users or request rate, context) of each decode load seen
    decode_loads: set[tuple[float | None, int]] = {
        (s.batch, s.context) for s in steps if s.batch and not s.new_tokens
    }
    decode_loads |= {(lv.concurrency or lv.rate, lv.prompt + lv.output // 2) for lv in levels}
    if not decode_loads:
        raise CalibrateError("no decode data: weight_read needs decode steps or TPOT")
    if len(decode_loads) < 2:
        raise CalibrateError(
            "one decode load only (a single batch size and context): weight_read and kv_read "
            "cannot be told apart; measure two or more batch sizes or concurrency levels"
        )
    if not any(s.new_tokens for s in steps) and not levels:
        raise CalibrateError("no prefill data: compute needs prefill steps or TTFT")


def _with(hardware: Hardware, values: np.ndarray) -> Hardware:
    eff = replace(hardware.efficiency, **dict(zip(FITTED, map(float, values), strict=True)))
    return replace(hardware, efficiency=eff)


def predictor(
    deployment: Deployment, steps: list[StepRow], levels: list[Level], engine_config
) -> Callable[[Hardware], np.ndarray]:
    """Predicted seconds for every observation, in `observations` order, on a hardware."""
    from memorywall.loadgen.bench import BenchConfig
    from memorywall.loadgen.bench import Level as BenchLevel
    from memorywall.loadgen.workload import Fixed, SyntheticWorkload
    from memorywall.sim.simulate import simulate_level

    def predict(hardware: Hardware) -> np.ndarray:
        d = replace(deployment, hardware=hardware)
        sm = StepModel(d)
        out = [sm.step_cost(s.as_batch()).time_s for s in steps]
        for lv in levels:
            config = BenchConfig(
                target="calibrate",
                workload=SyntheticWorkload(Fixed(lv.prompt), Fixed(lv.output)),
                num_prompts=min(lv.requests, MAX_REPLAY_REQUESTS),
                concurrency=(lv.concurrency,) if lv.concurrency else (),
                request_rates=(lv.rate,) if lv.rate else (),
            )
            level = BenchLevel(lv.name, lv.concurrency, lv.rate)
            r = simulate_level(d, engine_config, config, level).result
            out += [r["mean_ttft_ms"] / 1e3, r["mean_tpot_ms"] / 1e3]
        return np.array(out)

    return predict


def fit(
    hardware: Hardware, predict: Callable[[Hardware], np.ndarray], obs: list[Observation]
) -> np.ndarray:
    """Gauss-Newton on log efficiencies, finite differences, steps halved until the loss
    falls; efficiencies stay in (0, 1]."""
    y = np.array([o.measured_s for o in obs])
    fit_mask = np.array([not o.held_out for o in obs])
    x = np.log([getattr(hardware.efficiency, k) for k in FITTED])

    def residual(logs: np.ndarray) -> np.ndarray:
        values = np.minimum(np.exp(logs), 1.0)
        return (predict(_with(hardware, values)) / y - 1.0)[fit_mask]

    r = residual(x)
    for _ in range(20):
        h = 1e-4
        jac = np.stack([(residual(x + h * e) - r) / h for e in np.eye(len(x))], axis=1)
        step, *_ = np.linalg.lstsq(jac, -r, rcond=None)
        loss = float(r @ r)
        for _ in range(10):
            trial = np.minimum(x + step, 0.0)
            rt = residual(trial)
            if float(rt @ rt) < loss:
                break
            step = step / 2
        else:
            break
        converged = np.max(np.abs(trial - x)) < 1e-7
        x, r = trial, rt
        if converged:
            break
    return np.minimum(np.exp(x), 1.0)


def calibrate(paths: list[Path], deployment: Deployment, engine_config) -> Calibration:
    steps, levels = read_inputs(paths)
    check_identifiable(steps, levels)
    obs = observations(steps, levels)
    predict = predictor(deployment, steps, levels, engine_config)
    base = deployment.hardware
    values = fit(base, predict, obs)
    fitted = _with(base, values)
    rows = tuple(Row(o, b, a) for o, b, a in zip(obs, predict(base), predict(fitted), strict=True))
    return Calibration(fitted.efficiency, rows, tuple(p.name for p in paths))


def profile_toml(base_text: str, calibration: Calibration, name: str) -> str:
    """The base profile with the fitted efficiencies inline, each citing the files."""
    data = tomllib.loads(base_text)
    if "efficiency" in data:
        raise CalibrateError(
            "the base profile sets [efficiency] inline; start from one that does not"
        )
    source = "fitted by memorywall calibrate from " + ", ".join(calibration.files)
    lines = []
    for line in base_text.splitlines():
        if line.startswith("name = "):
            line = f'name = "{name}"'
        elif line.startswith("description = "):
            line = f'description = "{data["description"]}, calibrated by memorywall calibrate"'
        lines.append(line)
    lines += ["", "[efficiency]"]
    for key in FITTED:
        value = getattr(calibration.efficiency, key)
        lines.append(f'{key} = {{ value = {value!r}, unit = "1", source = "{source}" }}')
    return "\n".join(lines) + "\n"


def error_table(calibration: Calibration) -> str:
    """Per observation before and after, then MAPE and max per metric, fit and held out."""
    out = ["| observation | measured | before | after | used |", "|---|---|---|---|---|"]
    for r in calibration.rows:
        o = r.observation
        out.append(
            f"| {o.label} | {o.measured_s * 1e3:.3f} ms | {r.before_s / o.measured_s - 1:+.1%} "
            f"| {r.after_s / o.measured_s - 1:+.1%} | {'held out' if o.held_out else 'fit'} |"
        )
    out += ["", "| metric | used | n | MAPE before | max before | MAPE after | max after |"]
    out.append("|---|---|---|---|---|---|---|")
    for metric in ("step", "ttft", "tpot"):
        for held in (False, True):
            group = [
                r
                for r in calibration.rows
                if r.observation.metric == metric and r.observation.held_out == held
            ]
            if not group:
                continue
            before = [abs(r.before_s / r.observation.measured_s - 1) for r in group]
            after = [abs(r.after_s / r.observation.measured_s - 1) for r in group]
            out.append(
                f"| {metric} | {'held out' if held else 'fit'} | {len(group)} "
                f"| {np.mean(before):.1%} | {max(before):.1%} "
                f"| {np.mean(after):.1%} | {max(after):.1%} |"
            )
    return "\n".join(out)
