"""`memorywall simulate` on a disaggregated deployment: prefill and decode pools, one link.

With `--prefill-hardware`, the deployment that `--hardware`/`--model`/`--devices` name
becomes the decode pool (`--decode-workers` of it) and `--prefill-workers` workers of
`--prefill-hardware` x `--prefill-devices` prefill for it, the KV crossing `--kv-link`.
Each level runs on `server.pd.cosim.PdOfflineEngine`, released by the same rules as
an aggregated level (`memorywall.sim.simulate`), and writes the same result files. Transfers
at once share the link (a prefill worker's egress, a decode worker's ingress) as the
live workers book them, and a prefill worker holds a prompt's KV until it has landed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from memorywall.argtypes import positive_int
from memorywall.cli.pd_options import add_link_arguments
from memorywall.core import load_hardware, plan_deployment
from memorywall.core.deployment import Deployment
from memorywall.core.kv_transfer import parse_link
from memorywall.loadgen.bench import BenchConfig, Level, ServerFacts
from memorywall.server.engine.scheduler import EngineConfig
from memorywall.server.pd.cosim import PdOfflineEngine
from memorywall.server.pd.offline import PdFleet

# The bench runner's release rules, as an aggregated simulation applies them: one way.
from memorywall.sim.simulate import LevelRun, drive_level

__all__ = ["add_arguments", "fleet_from_args", "simulate_pd_level"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "disaggregated deployment (the deployment above becomes the decode pool)"
    )
    g.add_argument("--prefill-hardware", help="prefill pool's hardware: turns disaggregation on")
    g.add_argument(
        "--prefill-devices", type=positive_int, help="devices per prefill worker (default: fewest)"
    )
    g.add_argument("--prefill-workers", type=positive_int, default=1, help="prefill workers (x)")
    g.add_argument("--decode-workers", type=positive_int, default=1, help="decode workers (y)")
    add_link_arguments(
        g,
        link_help="the link between the pools: nvlink, nic (each side's external I/O) or GB/s",
        overlap_help="send layer i's KV while layer i+1 prefills",
    )


def fleet_from_args(
    args: argparse.Namespace, decode: Deployment, engine: EngineConfig
) -> PdFleet | None:
    """The split fleet the options name, or None without `--prefill-hardware`."""
    if args.prefill_hardware is None:
        return None
    prefill = plan_deployment(
        load_hardware(args.prefill_hardware),
        decode.model,
        devices=args.prefill_devices,
        weight_precision=decode.weight_precision,
        kv_precision=decode.kv_precision,
    )
    return PdFleet(
        prefill=prefill,
        prefill_workers=args.prefill_workers,
        decode=decode,
        decode_workers=args.decode_workers,
        link=parse_link(args.kv_link),
        layer_overlap=args.kv_layer_overlap,
        engine=engine,
    )


def simulate_pd_level(fleet: PdFleet, config: BenchConfig, level: Level) -> LevelRun:
    """One level of `config` on a fresh split fleet."""

    def build() -> tuple[PdOfflineEngine, ServerFacts, Callable[[], tuple]]:
        engine = PdOfflineEngine(fleet)
        # Named by the fleet; no one profile to predict from, so the prediction columns
        # stay empty.
        facts = ServerFacts(
            hardware=fleet.describe(),
            model=fleet.decode.model.name,
            devices=fleet.devices,
            emulated=True,
        )
        return engine, facts, engine.counters

    return drive_level(build, config, level)
