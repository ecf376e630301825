"""`memorywall calibrate RESULTS... --hardware BASE --model MODEL --out my-gpu.toml`."""

from __future__ import annotations

import argparse
from dataclasses import replace
from importlib import resources
from pathlib import Path

from memorywall.argtypes import nonnegative_int, positive_int
from memorywall.calibrate.fit import (
    MIN_FIT,
    RESAMPLES,
    CalibrateError,
    calibrate,
    constants_table,
    error_table,
    profile_toml,
)
from memorywall.cli.deployment import (
    add_deployment_arguments,
    add_engine_arguments,
    deployment_from_args,
    engine_config_from_args,
    names_from_args,
)
from memorywall.cli.usage import UsageError
from memorywall.core import Deployment
from memorywall.server.engine.scheduler import EngineConfig

__all__ = ["CalibrateError", "add_arguments", "command", "register", "run"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="fit a hardware profile's efficiencies to your own runs (step times, bench results)",
    )
    add_deployment_arguments(p)
    add_engine_arguments(p)
    add_arguments(p)
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    try:
        return run(args, deployment_from_args(args), engine_config_from_args(args))
    except CalibrateError as e:
        raise UsageError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "results",
        nargs="+",
        help="step-time CSVs (batch,context,new_tokens,seconds), bench result JSON files and "
        "vLLM /metrics scrapes (.prom, with a '# memorywall load: concurrency=N' line); "
        "MODEL=FILE: measured on another model (built-in name or config.json) on the same "
        "hardware, so that two model shapes separate per-step from per-layer floors",
    )
    p.add_argument("--out", type=Path, required=True, help="the calibrated profile (.toml)")
    p.add_argument(
        "--seed", type=nonnegative_int, default=0, help="seed of the replays and the bootstrap"
    )
    p.add_argument(
        "--bootstrap",
        type=positive_int,
        default=RESAMPLES,
        help=f"bootstrap resamples for the constants' intervals (default {RESAMPLES})",
    )


def base_profile_text(hardware: str) -> str:
    builtin = resources.files("memorywall.core") / "profiles" / f"{hardware}.toml"
    return builtin.read_text() if builtin.is_file() else Path(hardware).read_text()


def split_result(text: str) -> tuple[str | None, Path]:
    """`FILE` or `MODEL=FILE` (a path that exists as given is always a file)."""
    model, eq, path = text.partition("=")
    if not eq or Path(text).exists():
        return None, Path(text)
    if not model or not path:
        raise CalibrateError(f"{text}: expected FILE or MODEL=FILE")
    return model, Path(path)


def run(args: argparse.Namespace, deployment: Deployment, engine_config: EngineConfig) -> int:
    if args.out.suffix != ".toml":
        raise CalibrateError(f"--out: expected a .toml path, got {args.out}")
    paths: list[Path] = []
    other_shapes: dict[Path, Deployment] = {}
    built: dict[str, Deployment] = {}
    for text in args.results:
        model, path = split_result(text)
        paths.append(path)
        if model is not None and model != args.model:
            if model not in built:
                built[model] = replace(names_from_args(args), model=model).build()
            other_shapes[path] = built[model]
    result = calibrate(
        paths,
        deployment,
        engine_config,
        resamples=args.bootstrap,
        seed=args.seed,
        other_shapes=other_shapes,
    )
    text = profile_toml(base_profile_text(args.hardware), result, args.out.stem)
    print(error_table(result))
    if not any(r.observation.held_out for r in result.rows):
        print(f"\nnothing held out: fewer than {MIN_FIT + 2} observations to fit and check")
    print()
    print(constants_table(result))
    args.out.write_text(text)
    print(f"wrote {args.out} (memorywall serve --hardware {args.out})")
    return 0
