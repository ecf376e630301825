"""`memorywall plan`: options, and the run that prints the table and writes the files."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

from memorywall.argtypes import (
    nonnegative_int,
    number,
    number_list,
    positive_float,
    positive_int,
    power_watts,
)
from memorywall.cli.pd_options import add_link_arguments
from memorywall.cli.usage import UsageError
from memorywall.cluster.options import add_ray_argument
from memorywall.core import Placement, Precision, load_hardware, load_model
from memorywall.plan.pd import PdSpace
from memorywall.plan.space import Space

if TYPE_CHECKING:
    from memorywall.cluster.pools import Pool
    from memorywall.plan.budget import PowerBudget
    from memorywall.plan.planner import Query

DEFAULT_HARDWARE = "wse-3,h100-sxm,h200,b200"
PLAN_JSON, PARETO_PNG = "plan.json", "pareto.png"
LOADS = ("rate", "users")  # plan.LoadKind's values; the plan module loads only when run


# The search's defaults are the plan's own (`Space`, `PdSpace`), said once there.
_SPACE = Space(hardware=())


def _values(items: tuple) -> str:
    return ",".join(str(getattr(x, "value", x)) for x in items)


class PlanError(Exception):
    """A bad combination of plan options (the CLI prints it as one line, exit 2)."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="cheapest deployment per backend that holds a latency SLO (simulated search)",
    )
    add_arguments(p)
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    try:
        return run(args)
    except PlanError as e:
        raise UsageError(str(e)) from None


def _choices(kind: type[Enum], parse: Callable[[str], Enum] | None = None):
    """A parser for a comma-separated list of `kind`'s values."""

    def one(text: str) -> Enum:
        try:
            return parse(text) if parse else kind(text)
        except Exception:
            valid = ", ".join(str(k.value) for k in kind)
            raise argparse.ArgumentTypeError(f"unknown {text!r} (valid: {valid})") from None

    def parse_list(text: str) -> tuple:
        return tuple(one(t.strip()) for t in text.split(","))

    return parse_list


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="built-in name or HF config.json path")
    p.add_argument(
        "--hardware",
        default=DEFAULT_HARDWARE,
        help=f"profiles to search, comma-separated (default {DEFAULT_HARDWARE})",
    )
    p.add_argument("--slo", help="bounds held at p99, e.g. ttft=500ms,tpot=30ms (or e2el=)")
    p.add_argument(
        "--per-user-tok-s",
        type=positive_float,
        help="slowest 1%% of users still get this many tok/s: a p99 TPOT bound of 1/N s",
    )
    p.add_argument("--input-len", default="512", help="N | uniform:N:R | lognormal:N:SIGMA")
    p.add_argument("--output-len", default="128", help="N | uniform:N:R | lognormal:N:SIGMA")
    p.add_argument(
        "--workload",
        type=Path,
        help="shared-prefix:GROUPS:PREFIX_TOKENS, or a JSONL trace of lengths (no arrivals)",
    )
    p.add_argument(
        "--load",
        choices=LOADS,
        default=LOADS[0],
        help="raise open-loop Poisson arrivals (rate) or closed-loop users (default rate)",
    )
    p.add_argument("--num-prompts", type=positive_int, default=200, help="requests per load level")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed for lengths and arrivals")
    p.add_argument(
        "--burstiness", type=positive_float, default=1.0, help="gamma shape (1: Poisson)"
    )
    p.add_argument(
        "--target-rate",
        type=positive_float,
        help="requests/s the service must carry: rank by devices needed (replicas x devices)",
    )
    p.add_argument(
        "--precisions",
        type=_choices(Precision),
        default=_SPACE.precisions,
        help=f"weight precisions to search (default {_values(_SPACE.precisions)})",
    )
    p.add_argument(
        "--kv-precision",
        choices=[x.value for x in Precision],
        default=_SPACE.kv_precision.value,
        help="KV cache",
    )
    p.add_argument(
        "--placements",
        type=_choices(Placement, Placement.parse),
        default=_SPACE.placements,
        help="resident and/or stream (wafer weights over external I/O; default "
        f"{_values(_SPACE.placements)})",
    )
    p.add_argument(
        "--max-devices",
        type=positive_int,
        default=_SPACE.max_devices,
        help="largest deployment (default %(default)s)",
    )
    p.add_argument(
        "--max-num-seqs",
        type=number_list(int, low=1),
        default=_SPACE.max_num_seqs,
        help=f"engine batch limits to search (default {_values(_SPACE.max_num_seqs)})",
    )
    p.add_argument(
        "--max-num-batched-tokens", type=positive_int, default=_SPACE.max_num_batched_tokens
    )
    p.add_argument(
        "--ep",
        action="store_true",
        help="MoE models: also try each layout with its experts spread over the "
        "tensor-parallel group (expert parallelism)",
    )
    p.add_argument(
        "--tolerance",
        type=number(float, low=0.01, high=1.0),
        default=_SPACE.tolerance,
        help="bisect the highest held load to within this share (default %(default)s)",
    )
    g = p.add_argument_group("disaggregated fleets (prefill on GPUs, decode on wafers)")
    g.add_argument(
        "--pd",
        action="store_true",
        help="also search prefill on each GPU profile named with decode on each wafer "
        "profile (several times the search's time)",
    )
    g.add_argument(
        "--pd-prefill-workers",
        type=number_list(int, low=1),
        default=PdSpace.prefill_workers,
        help="prefill workers per split to search (x of xPyD; default "
        f"{_values(PdSpace.prefill_workers)})",
    )
    g.add_argument(
        "--pd-decode-workers",
        type=positive_int,
        default=PdSpace.decode_workers,
        help="decode workers (y; default %(default)s)",
    )
    add_link_arguments(
        g,
        link_help="the link between the pools: nic (each side's external I/O, the default) "
        "or a bandwidth in GB/s",
    )
    g = p.add_argument_group("power budget")
    g.add_argument(
        "--power-budget",
        type=power_watts,
        help="e.g. 250MW: per backend, the copies of its best deployment this power feeds "
        "and the users, tok/s and goodput they serve at the SLO",
    )
    g.add_argument(
        "--pue",
        type=number(float, low=1.0),
        default=1.0,
        help="facility watts per device watt charged against --power-budget (default 1: "
        "device TDP alone, no hosts, network or cooling)",
    )
    p.add_argument(
        "--jobs",
        type=positive_int,
        default=1,
        help="load searches at once, each in its own process (the same plan; default 1)",
    )
    add_ray_argument(p, "run the load searches as tasks, as many at once as it has CPUs,")
    p.add_argument("--top", type=positive_int, default=5, help="rows per backend in the table")
    p.add_argument("--json", action="store_true", help="print the JSON document, not the table")
    p.add_argument("--out", type=Path, help=f"write {PLAN_JSON} and {PARETO_PNG} here")


def query_and_space(args: argparse.Namespace) -> tuple[Query, Space]:
    """Raises `PlanError` (and the core's `MemorywallError`) for bad options."""
    from memorywall.loadgen.cli import BenchError, workload_from_args
    from memorywall.loadgen.slo import Slo, parse_slo
    from memorywall.loadgen.workload import TraceWorkload
    from memorywall.plan.planner import LoadKind, Query, Space

    try:
        if args.slo is not None and not args.slo.strip():
            parse_slo(args.slo)  # raises: empty SLO
        workload, slo = workload_from_args(_load(args))
    except (BenchError, ValueError) as e:
        raise PlanError(str(e)) from None
    if isinstance(workload, TraceWorkload) and workload.has_arrivals:
        raise PlanError("--workload: a trace with arrival times; plan sets its own arrivals")
    if args.per_user_tok_s is not None:
        if slo is not None and slo.tpot_s is not None:
            raise PlanError("give a TPOT bound once: --per-user-tok-s or tpot= in --slo")
        tpot = 1.0 / args.per_user_tok_s
        slo = Slo(tpot_s=tpot) if slo is None else dataclasses.replace(slo, tpot_s=tpot)
    if slo is None:
        raise PlanError("give an SLO: --slo ttft=...,tpot=... and/or --per-user-tok-s N")
    names = [h.strip() for h in args.hardware.split(",") if h.strip()]
    if not names:
        raise PlanError("--hardware: no profile named")
    query = Query(
        model=load_model(args.model),
        workload=workload,
        slo=slo,
        load=LoadKind(args.load),
        num_prompts=args.num_prompts,
        seed=args.seed,
        burstiness=args.burstiness,
        target_rate=args.target_rate,
    )
    space = Space(
        hardware=tuple(load_hardware(n) for n in names),
        precisions=args.precisions,
        kv_precision=Precision(args.kv_precision),
        placements=args.placements,
        max_devices=args.max_devices,
        max_num_seqs=tuple(sorted(set(args.max_num_seqs))),
        max_num_batched_tokens=args.max_num_batched_tokens,
        tolerance=args.tolerance,
        expert_parallel=args.ep,
    )
    return query, space


def splittable(space: Space) -> bool:
    """`space` names a GPU profile to prefill on and a wafer to decode on."""
    from memorywall.core.hardware import DeviceKind

    kinds = {h.kind for h in space.hardware}
    return DeviceKind.GPU in kinds and DeviceKind.WAFER in kinds


def pd_space(args: argparse.Namespace, space: Space) -> PdSpace | None:
    """The disaggregated fleets `--pd` asks for, or None; raises `PlanError` for `--pd`
    without a GPU and a wafer to split across (and the core's `ConfigError` for a bad
    `--kv-link`)."""
    from memorywall.core.kv_transfer import LinkKind, parse_link
    from memorywall.plan.planner import PdSpace

    if not args.pd:
        return None
    if not splittable(space):
        raise PlanError("--pd: --hardware must name a GPU profile (prefill) and a wafer (decode)")
    link = parse_link(args.kv_link)
    if link is LinkKind.NVLINK:
        raise PlanError("--kv-link: nvlink cannot join a GPU and a wafer; use nic or GB/s")
    return PdSpace(
        prefill_workers=tuple(sorted(set(args.pd_prefill_workers))),
        decode_workers=args.pd_decode_workers,
        link=link,
    )


def power_budget(args: argparse.Namespace) -> PowerBudget | None:
    """The budget `--power-budget` names, or None; raises `PlanError` for `--pue` alone."""
    from memorywall.plan.budget import PowerBudget

    if args.power_budget is None:
        if args.pue != 1.0:
            raise PlanError("--pue: needs --power-budget")
        return None
    return PowerBudget(watts=args.power_budget, pue=args.pue)


def _load(args: argparse.Namespace) -> argparse.Namespace:
    """The attributes `loadgen.cli.workload_from_args` reads; plan sends no warm-ups."""
    return argparse.Namespace(
        workload=args.workload,
        input_len=args.input_len,
        output_len=args.output_len,
        slo=args.slo,
        warmup=0,
    )


@contextlib.contextmanager
def search_pool(args: argparse.Namespace) -> Iterator[Pool | None]:
    """Where the load searches run: in this process (None), `--jobs` processes, or `--ray`."""
    if args.ray is not None and args.jobs > 1:
        raise PlanError("--ray and --jobs: give one (the cluster's CPUs set the width)")
    from memorywall.cluster.pools import process_pool, ray_pool

    if args.ray is not None:
        with ray_pool(args.ray) as pool:
            yield pool
    elif args.jobs > 1:
        with process_pool(args.jobs) as pool:
            yield pool
    else:
        yield None


def run(args: argparse.Namespace) -> int:
    from memorywall.loadgen.runner import progress_printer
    from memorywall.plan.planner import plan
    from memorywall.plan.report import as_json, pareto_plot, summary, table

    query, space = query_and_space(args)
    pd = pd_space(args, space)
    budget = power_budget(args)
    bar: Callable[[int], None] | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress_printer(total, f"plan {query.model.name}")
        bar(done)

    with search_pool(args) as pool:
        result = plan(query, space, progress, pd=pd, pool=pool)
    if bar is not None and sys.stderr.isatty():
        print(file=sys.stderr)
    doc = as_json(result, budget)
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(summary(result))
        print(table(result, args.top, budget))
        if pd is None and splittable(space):
            print("(--pd: also try prefill on the GPUs with decode on the wafers)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / PLAN_JSON).write_text(json.dumps(doc, indent=2))
        pareto_plot(result, args.out / PARETO_PNG, budget)
        if not args.json:
            print(f"wrote {args.out / PLAN_JSON} and {args.out / PARETO_PNG}")
    return 0
