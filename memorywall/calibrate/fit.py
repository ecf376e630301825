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
- a vLLM `/metrics` scrape (`.prom`, Prometheus text format) taken after one
  load level on a fresh server, with the load stated in a comment line
  (`read_prometheus`): the same level, from the TTFT and TPOT histograms.

Every constant in `SPECS` (efficiencies, latency floors, kernel costs) is a
candidate; which ones are fitted the data decide (`core.identify`): a
sensitivity matrix at the base profile rules out constants no observation
depends on, exactly collinear ones (per-step beside per-layer with one model
shape) and ones the data pin only loosely at 2% noise; past weight_read,
kv_read and compute (which must be identifiable, else the data are refused
with the reason) each remaining candidate is kept only if it lowers the
small-sample Akaike criterion of the fit. The rest stay the base profile's,
each with its reason. The fit minimises squared relative error over the fit
observations (projected Levenberg-Marquardt); every third observation, in
file order, is held out when at least five remain to fit. Each fitted
constant gets a 90% interval: observations resampled (seeded) and refitted,
the fit plus or minus Student's t quantile times the resamples' spread
(`core.identify.t_interval`); the same rule over the resampled fits'
predictions of the held-out observations gives the prediction band; both go
to the printed table and the profile.
"""

from __future__ import annotations

import csv
import json
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from memorywall.core import Batch, Deployment, PrefillChunk, StepModel
from memorywall.core.hardware import Efficiency, Hardware
from memorywall.core.identify import (
    FITTED,
    FIXED,
    NO_EFFECT,
    Verdict,
    bootstrap,
    forward_identified,
    jacobian,
    select,
    standard_errors,
    t_interval,
)

CORE = ("weight_read", "kv_read", "compute")  # refused, not fixed, when the data miss one
HOLD_OUT_EVERY = 3
MIN_FIT = 5
MAX_REPLAY_REQUESTS = 200  # a level's replay: its own request count, capped
ASSUMED_NOISE = 0.02  # relative noise of a measured step, for choosing what to fit
MAX_STD = 0.5  # fitted when the data pin it to +-50% of its size (1 sigma, ASSUMED_NOISE)
CONFIDENCE = 0.9
RESAMPLES = 200
BAND_RESAMPLES = 100  # bootstrap fits the prediction band replays (each a full prediction)


@dataclass(frozen=True)
class Spec:
    """A constant `calibrate` may fit: its profile section and key, unit, bounds, and the
    size changes are measured in where the base value is 0."""

    section: str
    key: str
    unit: str
    lower: float
    upper: float
    typical: float

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"


# In priority order: where two constants move the predictions alike, the earlier is fitted.
SPECS = (
    Spec("efficiency", "weight_read", "1", 0.01, 1.0, 0.8),
    Spec("efficiency", "kv_read", "1", 0.01, 1.0, 0.7),
    Spec("efficiency", "compute", "1", 0.01, 1.0, 0.7),
    Spec("efficiency", "attention", "1", 0.01, 1.0, 0.5),
    Spec("kernels", "kv_stream_bytes_per_s", "B/s", 1e9, 1e15, 2e11),
    Spec("efficiency", "overlap", "1", 0.0, 1.0, 0.2),
    Spec("latency", "per_layer_s", "s", 0.0, 1.0, 5e-5),
    Spec("latency", "per_step_s", "s", 0.0, 10.0, 1e-3),
    Spec("latency", "launch_per_layer_s", "s", 0.0, 1.0, 3e-4),
    Spec("kernels", "split_k_s", "s", 0.0, 1.0, 5e-6),
    Spec("kernels", "activation_bytes_per_hidden", "B", 0.0, 1e4, 150.0),
)
NOT_FITTED = {  # why a constant no observation depends on stays the base profile's
    "latency.launch_per_layer_s": "every step is replayed from graphs in this execution mode",
    "kernels.split_k_s": "no step has a GEMM small enough to split K",
    "kernels.kv_stream_bytes_per_s": "no decode step has too few streams to fill the chip",
    "efficiency.attention": "no step has prefill attention or compute-bound decode attention",
}


def get_constant(hardware: Hardware, spec: Spec) -> float:
    return float(getattr(getattr(hardware, spec.section), spec.key))


def with_constants(hardware: Hardware, specs: tuple[Spec, ...], values) -> Hardware:
    """`hardware` with each spec's constant set to its value."""
    changes: dict[str, dict[str, float]] = {}
    for spec, v in zip(specs, values, strict=True):
        changes.setdefault(spec.section, {})[spec.key] = float(v)
    return replace(
        hardware,
        **{sec: replace(getattr(hardware, sec), **kv) for sec, kv in changes.items()},
    )


class CalibrateError(Exception):
    """Data that cannot be read or cannot identify a constant (one CLI line, exit 2)."""


@dataclass(frozen=True)
class StepRow:
    batch: int
    context: int
    new_tokens: int
    seconds: float
    shape: int = 0  # which model shape (deployment) ran it: 0 the command's own

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
    shape: int = 0  # which model shape (deployment) ran it: 0 the command's own

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
class Estimate:
    """One candidate constant: base and fitted values, its verdict and bootstrap interval."""

    spec: Spec
    base: float
    value: float
    verdict: Verdict
    interval: tuple[float, float] | None  # CONFIDENCE bootstrap interval, fitted ones only

    @property
    def fitted(self) -> bool:
        return self.verdict.status == FITTED


@dataclass(frozen=True)
class Calibration:
    hardware: Hardware
    estimates: tuple[Estimate, ...]
    rows: tuple[Row, ...]
    files: tuple[str, ...]
    band: tuple[float, float]  # median and max CONFIDENCE half-width of predictions, relative
    noise: float  # RMS relative error of the fit observations after fitting
    resamples: int
    seed: int

    @property
    def efficiency(self) -> Efficiency:
        return self.hardware.efficiency


def read_inputs(
    paths: list[Path], shapes: Sequence[int] | None = None
) -> tuple[list[StepRow], list[Level]]:
    """Every file's steps and load levels, each marked with its file's model shape
    (`shapes`, one per path; all 0 by default)."""
    steps: list[StepRow] = []
    levels: list[Level] = []
    for path, shape in zip(paths, shapes or [0] * len(paths), strict=True):
        if not path.is_file():
            raise CalibrateError(f"{path}: no such file")
        if path.suffix == ".csv":
            steps += [replace(s, shape=shape) for s in _read_csv(path)]
        elif path.suffix == ".json":
            levels.append(replace(_read_level(path), shape=shape))
        elif path.suffix == ".prom":
            levels.append(replace(read_prometheus(path), shape=shape))
        else:
            raise CalibrateError(
                f"{path}: expected a .csv of step times, a .json result file or a .prom scrape"
            )
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


PROM_LOAD = "# memorywall load:"
PROM_METRICS = (
    "vllm:time_to_first_token_seconds_sum",
    "vllm:time_to_first_token_seconds_count",
    "vllm:time_per_output_token_seconds_sum",
    "vllm:time_per_output_token_seconds_count",
    "vllm:request_success_total",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
)


def read_prometheus(path: Path) -> Level:
    """One load level from a vLLM `/metrics` scrape (Prometheus text format) taken after the
    level ran on a fresh server: mean TTFT and TPOT from the histograms' sums and counts,
    requests and mean prompt and output lengths from the counters (each summed over its
    label sets). The scrape does not say the load, so the file must: a line
    `# memorywall load: concurrency=8` (closed loop) or `# memorywall load: request_rate=2.5`."""
    totals = dict.fromkeys(PROM_METRICS, 0.0)
    seen: set[str] = set()
    load: tuple[str, float] | None = None
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if line.startswith(PROM_LOAD):
            key, _, value = line.removeprefix(PROM_LOAD).strip().partition("=")
            try:
                load = (key.strip(), float(value))
            except ValueError:
                raise CalibrateError(f"{path}:{i}: load: not a number: {value!r}") from None
            if load[0] not in ("concurrency", "request_rate") or not load[1] > 0:
                raise CalibrateError(
                    f"{path}:{i}: expected 'concurrency=N' or 'request_rate=R' (positive)"
                )
            continue
        if not line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in totals:
            try:
                totals[name] += float(line.rsplit("}", 1)[-1].split()[0])
            except (ValueError, IndexError):
                raise CalibrateError(f"{path}:{i}: not a sample line: {line!r}") from None
            seen.add(name)
    if missing := [m for m in PROM_METRICS if m not in seen]:
        raise CalibrateError(f"{path}: not a vLLM metrics scrape: no {', '.join(missing)}")
    if load is None:
        raise CalibrateError(
            f"{path}: say the load the scrape ran under: add a line "
            f"'{PROM_LOAD} concurrency=N' or '{PROM_LOAD} request_rate=R'"
        )
    done = totals["vllm:request_success_total"]
    ttft_n = totals["vllm:time_to_first_token_seconds_count"]
    tpot_n = totals["vllm:time_per_output_token_seconds_count"]
    if not (done > 0 and ttft_n > 0 and tpot_n > 0):
        raise CalibrateError(f"{path}: no completed requests in the scrape")
    kind, amount = load
    return Level(
        source=path.name,
        concurrency=int(amount) if kind == "concurrency" else None,
        rate=amount if kind == "request_rate" else None,
        requests=int(done),
        prompt=round(totals["vllm:prompt_tokens_total"] / done),
        output=round(totals["vllm:generation_tokens_total"] / done),
        ttft_s=totals["vllm:time_to_first_token_seconds_sum"] / ttft_n,
        tpot_s=totals["vllm:time_per_output_token_seconds_sum"] / tpot_n,
    )


def observations(
    steps: list[StepRow], levels: list[Level], shape_names: Sequence[str] = ()
) -> list[Observation]:
    """Steps, then each level's TTFT and TPOT; every third held out if enough remain.
    With more than one model shape, each label starts with its model's name."""

    def tag(shape: int) -> str:
        return f"{shape_names[shape]} " if len(shape_names) > 1 else ""

    obs = [
        Observation(
            f"{tag(s.shape)}step b={s.batch} ctx={s.context} new={s.new_tokens}", "step", s.seconds
        )
        for s in steps
    ]
    for lv in levels:
        obs.append(Observation(f"{tag(lv.shape)}{lv.name} TTFT", "ttft", lv.ttft_s))
        obs.append(Observation(f"{tag(lv.shape)}{lv.name} TPOT", "tpot", lv.tpot_s))
    held = [(i + 1) % HOLD_OUT_EVERY == 0 for i in range(len(obs))]
    if len(obs) - sum(held) < MIN_FIT:
        return obs
    return [replace(o, held_out=h) for o, h in zip(obs, held, strict=True)]


def check_identifiable(steps: list[StepRow], levels: list[Level]) -> None:
    """Refuse data that cannot pin down each fitted constant, saying what to measure."""
    # (users or request rate, context) of each decode load seen
    decode_loads: set[tuple[int, float | None, int]] = {
        (s.shape, s.batch, s.context) for s in steps if s.batch and not s.new_tokens
    }
    decode_loads |= {
        (lv.shape, lv.concurrency or lv.rate, lv.prompt + lv.output // 2) for lv in levels
    }
    if not decode_loads:
        raise CalibrateError("no decode data: weight_read needs decode steps or TPOT")
    if len(decode_loads) < 2:
        raise CalibrateError(
            "one decode load only (a single batch size and context): weight_read and kv_read "
            "cannot be told apart; measure two or more batch sizes or concurrency levels"
        )
    if not any(s.new_tokens for s in steps) and not levels:
        raise CalibrateError("no prefill data: compute needs prefill steps or TTFT")


def predictor(
    deployment: Deployment | Sequence[Deployment],
    steps: list[StepRow],
    levels: list[Level],
    engine_config,
) -> Callable[[Hardware], np.ndarray]:
    """Predicted seconds for every observation, in `observations` order, on a hardware:
    each step and level on its own model shape's deployment (`deployment` indexed by
    `shape`; one deployment serves them all)."""
    shapes = [deployment] if isinstance(deployment, Deployment) else list(deployment)
    from memorywall.loadgen.bench import BenchConfig
    from memorywall.loadgen.bench import Level as BenchLevel
    from memorywall.loadgen.workload import Fixed, SyntheticWorkload
    from memorywall.sim.simulate import simulate_level

    def predict(hardware: Hardware) -> np.ndarray:
        ds = [replace(d, hardware=hardware) for d in shapes]
        sms = [StepModel(d) for d in ds]
        out = [sms[s.shape].step_cost(s.as_batch()).time_s for s in steps]
        for lv in levels:
            d = ds[lv.shape]
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


def fit_observations(
    base: Hardware,
    predict: Callable[[Hardware], np.ndarray],
    obs: list[Observation],
    resamples: int = RESAMPLES,
    seed: int = 0,
    specs: tuple[Spec, ...] = SPECS,
    max_std: float = MAX_STD,
) -> tuple[Hardware, tuple[Estimate, ...], tuple[float, float], float]:
    """Choose the constants the fit observations identify (`core.identify.select`), fit them,
    bootstrap their intervals: the fitted hardware, each candidate's estimate, the
    prediction band over the held-out observations (all if none) and the residual noise."""
    y = np.array([o.measured_s for o in obs])
    fit_mask = np.array([not o.held_out for o in obs])
    base_values = np.array([get_constant(base, s) for s in specs])
    scales = np.maximum(np.abs(base_values), [s.typical for s in specs])
    lower = np.array([s.lower for s in specs]) / scales
    upper = np.array([s.upper for s in specs]) / scales

    def errors_of(chosen: list[int]) -> Callable[[np.ndarray], np.ndarray]:
        def errors(z: np.ndarray) -> np.ndarray:
            values = base_values.copy()
            values[chosen] = z * scales[chosen]
            return predict(with_constants(base, specs, values)) / y - 1.0

        return errors

    every = list(range(len(specs)))
    z_base = base_values / scales
    jac = jacobian(lambda z: errors_of(every)(z)[fit_mask], z_base)
    verdicts = select(
        jac,
        [s.name for s in specs],
        ASSUMED_NOISE,
        max_std,
        why_no_effect=lambda n: NOT_FITTED.get(n, ""),
    )
    for spec, v in zip(specs, verdicts, strict=True):
        if spec.key in CORE and v.status != FITTED:
            raise CalibrateError(f"{spec.name}: {v.status}: {v.reason}")
    core = [i for i, s in enumerate(specs) if s.key in CORE]
    possible = [i for i, v in enumerate(verdicts) if v.status == FITTED and i not in core]

    def fit_errors_of(chosen: list[int]) -> Callable[[np.ndarray], np.ndarray]:
        errors = errors_of(chosen)
        return lambda z: errors(z)[fit_mask]

    chosen, z, left_out = forward_identified(
        fit_errors_of,
        z_base,
        lower,
        upper,
        core,
        possible,
        [s.name for s in specs],
        ASSUMED_NOISE,
        max_std,
    )
    for i, why in left_out.items():
        verdicts[i] = Verdict(specs[i].name, FIXED, why, np.nan)
    errors = errors_of(chosen)
    fit_errors = fit_errors_of(chosen)
    r = fit_errors(z)
    noise = float(np.sqrt(r @ r / max(len(r) - len(chosen), 1)))
    jac_hat = jacobian(fit_errors, z)
    # A core constant is kept even where nothing depends on it at the fit (its interval
    # is then one-sided); other candidates were checked at the fit (`forward_identified`).
    bites = np.max(np.abs(jac_hat), axis=0) >= NO_EFFECT
    stds = standard_errors(jac_hat[:, bites], noise)
    for i, std in zip(np.array(chosen)[bites], stds, strict=True):
        verdicts[i] = Verdict(specs[i].name, FITTED, f"pinned to +-{std:.1%} (1 sigma)", std)
    for i in np.array(chosen)[~bites]:
        why = "fitted to where no step depends on it any more: bounded on one side only"
        verdicts[i] = Verdict(specs[i].name, FITTED, why, np.inf)
    samples = bootstrap(fit_errors, z, jac_hat, lower[chosen], upper[chosen], resamples, seed)
    dof = len(r) - len(chosen)
    lo, hi = t_interval(z, samples, CONFIDENCE, dof)
    lo, hi = np.maximum(lo, lower[chosen]), np.minimum(hi, upper[chosen])
    values = base_values.copy()
    values[chosen] = z * scales[chosen]
    estimates = []
    for i, (spec, v) in enumerate(zip(specs, verdicts, strict=True)):
        interval = None
        if i in chosen:
            k = chosen.index(i)
            interval = (float(lo[k] * scales[i]), float(hi[k] * scales[i]))
        estimates.append(Estimate(spec, float(base_values[i]), float(values[i]), v, interval))
    band_mask = ~fit_mask if (~fit_mask).any() else fit_mask
    preds = np.array([errors(zb)[band_mask] for zb in samples[:BAND_RESAMPLES]]) + 1.0
    centre = errors(z)[band_mask] + 1.0
    low, high = t_interval(centre, preds, CONFIDENCE, dof)
    half = (high - low) / 2 / centre
    band = (float(np.median(half)), float(half.max()))
    return with_constants(base, specs, values), tuple(estimates), band, noise


def calibrate(
    paths: list[Path],
    deployment: Deployment,
    engine_config,
    resamples: int = RESAMPLES,
    seed: int = 0,
    other_shapes: Mapping[Path, Deployment] | None = None,
) -> Calibration:
    """Fit `deployment`'s hardware to the files. A file in `other_shapes` was measured on
    another model (the same hardware, that deployment): two model shapes separate what
    one cannot (a per-step floor from a per-layer one, by their layer counts)."""
    shapes = [deployment]
    for d in (other_shapes or {}).values():
        if all(d is not s for s in shapes):
            shapes.append(d)
    index = [
        next(i for i, s in enumerate(shapes) if s is (other_shapes or {}).get(p, deployment))
        for p in paths
    ]
    steps, levels = read_inputs(paths, index)
    check_identifiable(steps, levels)
    obs = observations(steps, levels, [d.model.name for d in shapes])
    predict = predictor(shapes, steps, levels, engine_config)
    base = deployment.hardware
    fitted, estimates, band, noise = fit_observations(base, predict, obs, resamples, seed)
    rows = tuple(Row(o, b, a) for o, b, a in zip(obs, predict(base), predict(fitted), strict=True))
    return Calibration(
        fitted, estimates, rows, tuple(p.name for p in paths), band, noise, resamples, seed
    )


def profile_toml(base_text: str, calibration: Calibration, name: str) -> str:
    """The base profile with the fitted constants inline, each citing the files, with its
    bootstrap interval; a [calibration_fit] table says what was fitted, what kept, and why."""
    data = tomllib.loads(base_text)
    fitted = [e for e in calibration.estimates if e.fitted]
    if clash := sorted({e.spec.section for e in fitted} & data.keys()):
        raise CalibrateError(
            f"the base profile sets [{clash[0]}] inline; start from one that does not"
        )
    source = "fitted by memorywall calibrate from " + ", ".join(calibration.files)
    lines = []
    for line in base_text.splitlines():
        if line.startswith("name = "):
            line = f'name = "{name}"'
        elif line.startswith("description = "):
            line = f'description = "{data["description"]}, calibrated by memorywall calibrate"'
        lines.append(line)
    for section in ("efficiency", "latency", "kernels"):
        here = [e for e in fitted if e.spec.section == section]
        if here:
            lines += ["", f"[{section}]"]
        for e in here:
            assert e.interval is not None  # every fitted constant was bootstrapped
            lo, hi = e.interval
            lines.append(
                f'{e.spec.key} = {{ value = {e.value!r}, unit = "{e.spec.unit}", '
                f'source = "{source}", interval = [{lo!r}, {hi!r}], confidence = {CONFIDENCE} }}'
            )
    c = calibration
    lines += [
        "",
        "# What memorywall calibrate fitted, what it kept from the base profile, and why.",
        "[calibration_fit]",
        f"files = {json.dumps(list(c.files))}",
        f'interval = "bootstrap over observations, {c.resamples} resamples, seed {c.seed}, '
        f'{CONFIDENCE:.0%} Student-t intervals on the spread of the resamples"',
        f"residual_noise = {c.noise!r}",
        f"prediction_band_median = {c.band[0]!r}",
        f"prediction_band_max = {c.band[1]!r}",
    ]
    for e in c.estimates:
        lines.append(
            f"{e.spec.section}_{e.spec.key} = {{ status = {json.dumps(e.verdict.status)}, "
            f"reason = {json.dumps(e.verdict.reason)} }}"
        )
    return "\n".join(lines) + "\n"


def constants_table(calibration: Calibration) -> str:
    """Per candidate constant: base, fitted value, interval, verdict and reason; the band."""
    pct = f"{CONFIDENCE:.0%}"
    out = [
        f"| constant | base | value | {pct} interval | status | why |",
        "|---|---|---|---|---|---|",
    ]
    for e in calibration.estimates:
        interval = f"[{e.interval[0]:.4g}, {e.interval[1]:.4g}]" if e.interval else "-"
        out.append(
            f"| {e.spec.name} | {e.base:.4g} | {e.value:.4g} | {interval} "
            f"| {e.verdict.status} | {e.verdict.reason} |"
        )
    med, mx = calibration.band
    out += [
        "",
        f"prediction band ({pct}, from the intervals): median +-{med:.1%}, max +-{mx:.1%}; "
        f"residual noise of the fit {calibration.noise:.1%}",
    ]
    return "\n".join(out)


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
