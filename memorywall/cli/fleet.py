"""`memorywall fleet`: several emulated workers from a TOML spec, optionally behind smg."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from memorywall.argtypes import positive_float
from memorywall.cli.usage import UsageError
from memorywall.cluster.options import add_ray_argument

if TYPE_CHECKING:
    from memorywall.fleet.runner import FleetReady
    from memorywall.fleet.spec import TlsSpec

SCRAPE_INTERVAL_S = 5.0  # Prometheus's own default is 1 min; the dashboard refreshes every 5 s


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fleet", help="run several emulated workers from a TOML spec, optionally behind smg"
    )
    p.add_argument(
        "spec", type=Path, nargs="?", help="fleet .toml: [[worker]] tables, optional [gateway]"
    )
    p.add_argument(
        "--log-dir", type=Path, help="write <name>.log per process here (default: a temp dir)"
    )
    p.add_argument(
        "--ready-file",
        type=Path,
        help="once every worker (and the gateway) answers, write a JSON file here: each "
        "worker's addresses and devices, the gateway's URL; removed on exit",
    )
    k8s = p.add_argument_group("Kubernetes (rendered, not run)")
    k8s.add_argument(
        "--render-kubernetes",
        type=Path,
        metavar="DIR",
        help="write the fleet as Kustomize manifests into DIR (a Deployment and Service per "
        "worker, smg with Kubernetes service discovery) and exit; docs/scale.md",
    )
    k8s.add_argument(
        "--image",
        default=None,
        help="container image of the rendered pods (default memorywall:0.1.0, built from "
        "the Containerfile)",
    )
    k8s.add_argument(
        "--namespace", default=None, help="namespace of the rendered objects (default memorywall)"
    )
    prom = p.add_argument_group("Prometheus")
    prom.add_argument(
        "--prometheus-config",
        type=Path,
        metavar="FILE",
        help="once the fleet is up, write a Prometheus scrape config (YAML) here: the "
        "workers' /metrics, their DCGM ports and the gateway's metrics, labelled worker "
        "and hardware (kept on exit); with --from-ready, write it and exit",
    )
    prom.add_argument(
        "--from-ready",
        type=Path,
        metavar="READY",
        help="with --prometheus-config and no spec: take the workers from this ready file "
        "(a running fleet's --ready-file, or one `serve --ready-file`)",
    )
    prom.add_argument(
        "--scrape-interval",
        type=positive_float,
        metavar="SECONDS",
        help=f"with --prometheus-config: its scrape interval (default: {SCRAPE_INTERVAL_S:g})",
    )
    add_ray_argument(p, "run each worker as an actor (spread, or on its node =)")
    p.set_defaults(func=command)


def _check(args: argparse.Namespace) -> None:
    """The combinations: a spec to run or render, or --from-ready to write a config."""
    if args.render_kubernetes is None and (args.image is not None or args.namespace is not None):
        raise UsageError("--image and --namespace go with --render-kubernetes")
    if args.render_kubernetes is not None and (args.prometheus_config or args.from_ready):
        raise UsageError(
            "--render-kubernetes: not with --prometheus-config or --from-ready (rendered "
            "pods are found by Kubernetes service discovery, not a ready file)"
        )
    if args.scrape_interval is not None and args.prometheus_config is None:
        raise UsageError("--scrape-interval: only with --prometheus-config")
    if args.prometheus_config is not None and not args.prometheus_config.parent.is_dir():
        # Checked before a fleet starts, rather than when it is up and the file is due.
        raise UsageError(
            f"--prometheus-config: no such folder {str(args.prometheus_config.parent)!r}"
        )
    if args.from_ready is not None:
        if args.spec is not None:
            raise UsageError("--from-ready: give a fleet spec or --from-ready, not both")
        if args.prometheus_config is None:
            raise UsageError("--from-ready: needs --prometheus-config FILE (what to write)")
    elif args.spec is None:
        raise UsageError(
            "give a fleet spec (.toml), or --from-ready READY --prometheus-config FILE"
        )


def command(args: argparse.Namespace) -> int:
    # Imported here: only `fleet` starts processes.
    from memorywall.fleet.spec import load_spec

    _check(args)
    if args.ray is not None and (args.render_kubernetes or args.from_ready):
        raise UsageError("--ray: runs a fleet; not with --render-kubernetes or --from-ready")
    if args.render_kubernetes is not None:
        return render_kubernetes(args, load_spec(args.spec))
    if args.from_ready is not None:
        return _config_from_ready(args)
    from memorywall.fleet.runner import run as run_fleet

    spec = load_spec(args.spec)
    on_ready = None
    if args.prometheus_config is not None:
        if not any(
            w.get("http_port") is not None or w.get("metrics_port") is not None
            for w in spec.workers
        ):
            raise UsageError(
                "--prometheus-config: no worker serves metrics: give one http_port or "
                "metrics_port in the spec"
            )
        on_ready = _config_writer(args, spec.tls)
    if args.ray is not None:
        from memorywall.cluster.fleet import run as run_on_ray

        return run_on_ray(
            spec, args.log_dir, args.ray, ready_file=args.ready_file, on_ready=on_ready
        )
    if pinned := [w.name for w in spec.workers if w.node is not None]:
        raise UsageError(f"{', '.join(pinned)}: node = places a worker on a Ray cluster: add --ray")
    return run_fleet(spec, args.log_dir, ready_file=args.ready_file, on_ready=on_ready)


def render_kubernetes(args: argparse.Namespace, spec) -> int:
    from memorywall.fleet import kubernetes

    manifests = kubernetes.render(
        spec,
        args.spec.stem,
        image=args.image or kubernetes.DEFAULT_IMAGE,
        namespace=args.namespace or kubernetes.DEFAULT_NAMESPACE,
    )
    paths = kubernetes.write(manifests, args.render_kubernetes)
    print(
        f"wrote {len(paths)} manifests to {args.render_kubernetes}/ "
        f"(kubectl apply -k {args.render_kubernetes})"
    )
    return 0


def _interval_s(args: argparse.Namespace) -> float:
    return args.scrape_interval or SCRAPE_INTERVAL_S


def _config_from_ready(args: argparse.Namespace) -> int:
    """`--from-ready READY --prometheus-config FILE`: write the config and exit."""
    from memorywall.fleet import prometheus

    scrape = prometheus.from_ready_file(args.from_ready)
    target = args.prometheus_config
    prometheus.write(target, scrape, interval_s=_interval_s(args), source=str(args.from_ready))
    print(f"prometheus config: {target} ({len(scrape.workers)} workers)")
    return 0


def _config_writer(args: argparse.Namespace, tls: TlsSpec | None) -> Callable[[FleetReady], None]:
    """What the fleet calls once it is up: write the scrape config for its workers."""
    from memorywall.fleet import prometheus

    target, interval_s, source = args.prometheus_config, _interval_s(args), str(args.spec)

    def write(ready: FleetReady) -> None:
        gateway = ready.gateway.metrics_url if ready.gateway is not None else None
        ca_file = tls.roots if tls is not None else None
        scrape = prometheus.Scrape(ready.workers, gateway, ca_file)
        prometheus.write(target, scrape, interval_s=interval_s, source=source)
        print(f"prometheus config: {target}", flush=True)

    return write
