"""`memorywall serve` options for disaggregated serving (prefill and decode on different workers).

Kept apart from `serve.py`: they build the server's `PdConfig`, and only `serve` uses them.
"""

from __future__ import annotations

import argparse
from typing import Any

from memorywall.argtypes import port, positive_float
from memorywall.core.deployment import Deployment, DeploymentNames
from memorywall.core.kv_transfer import parse_link


def add_arguments(p: argparse.ArgumentParser) -> None:
    from memorywall.server.pd.config import DEFAULT_BOOTSTRAP_PORT, PdConfig, Role

    g = p.add_argument_group("disaggregated serving (behind smg --pd-disaggregation)")
    g.add_argument(
        "--role",
        choices=[r.value for r in Role],
        default=Role.BOTH.value,
        help="prefill: run prompts and hand their KV off; decode: take the KV and decode; "
        "both: serve whole requests (the default)",
    )
    add_link_arguments(
        g,
        link_help="decode: the link the KV crosses from the prefill worker: nvlink (one "
        "scale-up domain), nic (each side's external I/O, the default) or a bandwidth in GB/s",
        overlap_help="decode: send layer i's KV while layer i+1 prefills (only what outlasts "
        "the prefill adds to TTFT)",
    )
    g.add_argument(
        "--bootstrap-port",
        type=port,
        default=DEFAULT_BOOTSTRAP_PORT,
        help="prefill: where decode workers meet it, on --host (0: any free port, named in "
        "the ready file; default %(default)s, as SGLang's)",
    )
    g.add_argument(
        "--pd-timeout",
        type=positive_float,
        default=PdConfig.partner_timeout_s,
        help="seconds a half waits for its partner before it ends DEADLINE_EXCEEDED",
    )


def add_link_arguments(
    g: argparse._ArgumentGroup, *, link_help: str, overlap_help: str | None = None
) -> None:
    """`--kv-link` (parsed by `core.kv_transfer.parse_link`) and, where the command models
    it, `--kv-layer-overlap`: one definition for serve, simulate and plan, each command
    saying in its help what the link joins there."""
    g.add_argument("--kv-link", default="nic", metavar="nvlink|nic|GBPS", help=link_help)
    if overlap_help is not None:
        g.add_argument("--kv-layer-overlap", action="store_true", help=overlap_help)


def server_options(
    args: argparse.Namespace, deployment: Deployment, names: DeploymentNames
) -> dict[str, Any]:
    """`ServerConfig` keyword arguments; a bad `--kv-link` is a one-line ConfigError."""
    from memorywall.server.pd.config import DeploymentRef, PdConfig, Role

    return {
        "disaggregation": PdConfig(
            role=Role(args.role),
            link=parse_link(args.kv_link),
            layer_overlap=args.kv_layer_overlap,
            bootstrap_port=args.bootstrap_port,
            partner_timeout_s=args.pd_timeout,
            # As given, so that a partner process rebuilds it from the same profile file.
            deployment=DeploymentRef.of(deployment, names),
        )
    }
