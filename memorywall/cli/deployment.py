"""The options that choose a deployment and the engine's batching, and what they build.

Shared by predict, serve, simulate and calibrate.
"""

from __future__ import annotations

import argparse

from memorywall.argtypes import fraction, positive_int
from memorywall.cli.usage import UsageError
from memorywall.core import Precision
from memorywall.core.deployment import Deployment, DeploymentNames
from memorywall.server.engine.scheduler import EngineConfig

# The defaults below are the config dataclasses' own, said once there.
_NAMES = DeploymentNames(hardware="", model="")
_ENGINE = EngineConfig()


def add_deployment_arguments(p: argparse.ArgumentParser) -> None:
    """The options that choose hardware, model and layout; shared by predict and serve."""
    p.add_argument("--hardware", required=True, help="built-in name or profile .toml path")
    p.add_argument("--model", required=True, help="built-in name or HF config.json path")
    p.add_argument("--devices", type=positive_int, help="device count (default: fewest that fit)")
    precisions = [x.value for x in Precision]
    p.add_argument("--weight-precision", default=_NAMES.weight_precision, choices=precisions)
    p.add_argument("--kv-precision", default=_NAMES.kv_precision, choices=precisions)
    p.add_argument(
        "--placement",
        default=_NAMES.placement,
        choices=["sram", "resident", "stream"],
        help="weights resident in device memory (sram = resident), or streamed over external I/O",
    )
    p.add_argument(
        "--draft-tokens", type=positive_int, help="speculative decoding: drafts per step"
    )
    p.add_argument(
        "--acceptance",
        type=fraction,
        default=_NAMES.acceptance,
        help="speculative acceptance rate",
    )
    p.add_argument("--draft-model", help="speculative draft model (default: free drafting)")
    p.add_argument(
        "--ep",
        type=positive_int,
        default=_NAMES.expert_parallel,
        help="expert parallelism for a MoE model: its experts spread over N devices of the "
        "scale-up domain, which are the tensor-parallel group (default 1: experts tensor "
        "parallel)",
    )


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine's batching options; shared by serve and simulate."""
    p.add_argument(
        "--max-num-seqs",
        type=positive_int,
        default=_ENGINE.max_num_seqs,
        help="running batch limit",
    )
    p.add_argument(
        "--max-num-batched-tokens",
        type=positive_int,
        default=_ENGINE.max_num_batched_tokens,
        help="token budget per step",
    )
    p.add_argument(
        "--no-prefix-caching",
        dest="prefix_caching",
        action="store_false",
        help="recompute every prompt in full (default: reuse cached KV of shared prefixes)",
    )


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        seed=args.seed,
        enable_prefix_caching=args.prefix_caching,
    )


def names_from_args(args: argparse.Namespace) -> DeploymentNames:
    """The deployment the options name, as given (profile and model names or paths)."""
    if args.draft_model and not args.draft_tokens:
        raise UsageError("--draft-model needs --draft-tokens")
    return DeploymentNames(
        hardware=args.hardware,
        model=args.model,
        devices=args.devices,
        weight_precision=args.weight_precision,
        kv_precision=args.kv_precision,
        placement=args.placement,
        draft_tokens=args.draft_tokens,
        acceptance=args.acceptance,
        draft_model=args.draft_model,
        expert_parallel=args.ep,
    )


def deployment_from_args(args: argparse.Namespace) -> Deployment:
    return names_from_args(args).build()
