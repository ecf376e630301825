"""`memorywall fleet`: several emulated workers from a TOML spec, optionally behind smg."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "fleet", help="run several emulated workers from a TOML spec, optionally behind smg"
    )
    p.add_argument("spec", type=Path, help="fleet .toml: [[worker]] tables, optional [gateway]")
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
    p.set_defaults(func=command)


def command(args: argparse.Namespace) -> int:
    # Imported here: only `fleet` starts processes.
    from memorywall.cli.usage import UsageError
    from memorywall.fleet.spec import load_spec

    if args.render_kubernetes is None:
        if args.image is not None or args.namespace is not None:
            raise UsageError("--image and --namespace go with --render-kubernetes")
        from memorywall.fleet.runner import run as run_fleet

        return run_fleet(load_spec(args.spec), args.log_dir, ready_file=args.ready_file)
    return render_kubernetes(args, load_spec(args.spec))


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
