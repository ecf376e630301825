"""`memorywall serve` options for faults, admission, request limits, TLS, the API key and LoRA.

Kept apart from `serve.py`: they build the server's `GuardConfig`, limits and
security settings, and only `serve` uses them. The API key may come from the
environment (MEMORYWALL_API_KEY), so it need not show in `ps`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memorywall.argtypes import nonnegative_int, positive_float, positive_int
from memorywall.errors import ConfigError

if TYPE_CHECKING:
    from memorywall.core import ModelShape


def fault_spec(text: str):
    """argparse type for `--faults`: comma-separated KIND:RATE[:ARG] rules."""
    from memorywall.server.engine.faults import parse_spec

    try:
        return parse_spec(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    from memorywall.server.engine.guard import GuardConfig

    add_security_arguments(p)
    add_lora_arguments(p)
    g = p.add_argument_group("faults and admission")
    g.add_argument(
        "--faults",
        type=fault_spec,
        metavar="SPEC",
        help="inject faults: comma-separated KIND:RATE[:ARG], KIND one of error[:STATUS] "
        "(unavailable, resource_exhausted, internal, deadline_exceeded), abort[:TOKENS], "
        "stall[:SECONDS], slow[:FACTOR]; e.g. error:0.05,stall:0.1:2",
    )
    g.add_argument(
        "--fault-seed",
        type=nonnegative_int,
        default=GuardConfig.fault_seed,
        help="seed for each request's fate (drawn in arrival order; default 0)",
    )
    g.add_argument(
        "--allow-fault-headers",
        action="store_true",
        help="let a request ask for its own fault (header / metadata x-memorywall-fault: "
        "KIND:RATE[:ARG]); refused with 400 / INVALID_ARGUMENT otherwise",
    )
    g.add_argument(
        "--max-waiting",
        type=nonnegative_int,
        help="refuse requests (429 / RESOURCE_EXHAUSTED) while this many wait (default: no bound)",
    )
    g.add_argument(
        "--retry-after",
        type=positive_float,
        default=GuardConfig.retry_after_s,
        help="seconds a refused client is told to wait (Retry-After, grpc-retry-pushback-ms)",
    )
    g.add_argument(
        "--max-request-bytes",
        type=positive_int,
        help="largest request body (HTTP, 413 beyond) or message (gRPC, INVALID_ARGUMENT) "
        "(default 16 MiB)",
    )


API_KEY_ENV = "MEMORYWALL_API_KEY"


def add_security_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("TLS and API key (see the README's security section)")
    g.add_argument("--tls-cert", type=Path, help="serve TLS on every port: certificate chain (PEM)")
    g.add_argument("--tls-key", type=Path, help="the certificate's private key (PEM)")
    g.add_argument(
        "--tls-client-ca",
        type=Path,
        help="require client certificates signed by this CA (PEM; needs --tls-cert)",
    )
    g.add_argument(
        "--api-key",
        help=f"require this key: HTTP 'Authorization: Bearer KEY' on /v1/ routes, gRPC "
        f"'authorization' metadata (default: ${API_KEY_ENV}, else none)",
    )


def security_options(args: argparse.Namespace) -> dict[str, Any]:
    """`ServerConfig.tls` and `api_key`; raises ConfigError for a half-given TLS pair."""
    from memorywall.server.fronts.tls import TlsConfig

    out: dict[str, Any] = {"api_key": args.api_key or os.environ.get(API_KEY_ENV) or None}
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key")
    if args.tls_cert is not None:
        out["tls"] = TlsConfig(cert=args.tls_cert, key=args.tls_key, client_ca=args.tls_client_ca)
    return out


def server_options(args: argparse.Namespace) -> dict[str, Any]:
    """`ServerConfig` fields from the options above."""
    from memorywall.server.engine.guard import GuardConfig

    out: dict[str, Any] = {
        "guard": GuardConfig(
            max_waiting=args.max_waiting,
            retry_after_s=args.retry_after,
            faults=args.faults or (),
            fault_seed=args.fault_seed,
            allow_fault_headers=args.allow_fault_headers,
        )
    }
    if args.max_request_bytes is not None:
        out["max_request_bytes"] = args.max_request_bytes
    return out | security_options(args)


def add_lora_arguments(p: argparse.ArgumentParser, *, serving: bool = True) -> None:
    """vLLM's LoRA options; `serving` False (simulate): adapters are named up front, so
    `--lora-modules` alone turns LoRA on."""
    from memorywall.server.engine.lora import LORA_RANKS

    g = p.add_argument_group("LoRA adapters (vLLM's options)")
    if serving:
        g.add_argument(
            "--enable-lora",
            action="store_true",
            help="serve LoRA adapters: requests name one as their model; "
            "POST /v1/load_lora_adapter and /v1/unload_lora_adapter add and remove them",
        )
    g.add_argument(
        "--max-loras",
        type=positive_int,
        help="distinct adapters in one batch, and adapters held on the devices "
        "(least recently used evicted; default 1)",
    )
    g.add_argument(
        "--max-lora-rank",
        type=int,
        choices=LORA_RANKS,
        metavar="RANK",
        help=f"largest adapter rank accepted, one of {', '.join(map(str, LORA_RANKS))} "
        "(default 16)",
    )
    g.add_argument(
        "--lora-modules",
        nargs="+",
        type=lora_module,
        metavar="NAME=PATH",
        help="adapters served from the start: a name and a PEFT adapter folder "
        "(its adapter_config.json gives the rank and target modules)",
    )


def lora_module(text: str) -> tuple[str, str]:
    """argparse type for `--lora-modules`: name=path."""
    from memorywall.server.engine.lora import parse_module

    try:
        return parse_module(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def lora_config(args: argparse.Namespace, model: ModelShape, *, serving: bool = True):
    """The `LoraConfig` the options ask for, its adapters read (ConfigError for a bad
    folder), or None with LoRA off; UsageError for a LoRA option without --enable-lora."""
    from memorywall.cli.usage import UsageError
    from memorywall.server.engine.lora import LoraConfig, LoraRegistry

    given = [
        flag
        for flag, value in (
            ("--max-loras", args.max_loras),
            ("--max-lora-rank", args.max_lora_rank),
            ("--lora-modules", args.lora_modules),
        )
        if value is not None
    ]
    enabled = args.enable_lora if serving else args.lora_modules is not None
    if not enabled:
        if given:
            needs = "--enable-lora" if serving else "--lora-modules"
            raise UsageError(f"{given[0]}: needs {needs}")
        return None
    names = [name for name, _ in args.lora_modules or ()]
    if len(set(names)) != len(names):
        raise UsageError(f"--lora-modules: a name given twice ({', '.join(names)})")
    defaults = LoraConfig()
    config = LoraConfig(
        max_loras=args.max_loras or defaults.max_loras,
        max_lora_rank=args.max_lora_rank or defaults.max_lora_rank,
        modules=tuple(args.lora_modules or ()),
    )
    LoraRegistry(config, model, base="")  # reads every folder now: a bad one is exit 2
    return config
