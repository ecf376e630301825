"""`memorywall fleet SPEC --render-kubernetes DIR`: the fleet as Kustomize manifests.

No Kubernetes runs here, so the fleet is rendered, not run: per `[[worker]]` a Deployment
(one replica; scale it with `kubectl scale` or a Kustomize patch) whose container runs
`memorywall serve` with the worker's own options, bound to 0.0.0.0, and a ClusterIP
Service; with `[gateway]`, smg as a Deployment finding the workers by Kubernetes service
discovery (their pods' labels), its Service, and the ServiceAccount, Role and RoleBinding
that let it watch pods. `kustomization.yaml` lists them all and sets the namespace.

Ports. A local fleet takes any free port (0); pods have their own addresses, so every
worker serves gRPC on the same fixed port (smg discovers them all on one
`--service-discovery-port`) and a port given as 0 becomes that front's fixed default
(`PORTS`); a port given as a number is kept. Probes: startup, readiness and liveness are
gRPC health checks (`grpc.health.v1`, which `memorywall serve` answers SERVING once the
weights are loaded; the startup probe allows the core's weight-load time twice over);
smg's are `/liveness` and `/readiness` (ready once it has a healthy worker). No ready
files: Kubernetes waits on the probes. A worker's `node` (the Ray custom resource that pins
it under `fleet --ray`) becomes its pod's nodeSelector `memorywall.io/node: <node>`: label
the nodes alike and the same spec pins the same workers on either cluster.

What is not rendered is refused with the reason: TLS (certificates are cluster secrets),
a fault schedule (`[[fault]]` runs from the fleet runner; a worker's own `faults` option is
a serve option and goes through), disaggregated fleets, TensorRT-LLM workers behind the
gateway (smg needs a tokenizer folder the runner fetches), and options naming local files.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memorywall.errors import ConfigError
from memorywall.fleet import yamltext
from memorywall.fleet.spec import FleetSpec
from memorywall.fleet.worker import WorkerSpec, serve_options, to_argv

GRPC_PORT = 50051  # every worker's gRPC port in a pod (smg discovers them on it)
PORTS = {"http_port": 8000, "metrics_port": 9090, "dcgm_port": 9400}  # 0 becomes these
PORT_NAMES = {"port": "grpc", "http_port": "http", "metrics_port": "metrics", "dcgm_port": "dcgm"}
GATEWAY_PORT = 30000
DEFAULT_IMAGE = "memorywall:0.1.0"  # built from the repository's Containerfile
DEFAULT_NAMESPACE = "memorywall"
PART_OF = "app.kubernetes.io/part-of"
COMPONENT = "app.kubernetes.io/component"
NODE_LABEL = "memorywall.io/node"  # a worker's `node` selects nodes carrying this label
_DNS = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")


@dataclass(frozen=True)
class Manifest:
    """One file of the rendering: its name in the folder and its object."""

    filename: str
    body: dict[str, Any]


def dns_name(text: str, what: str) -> str:
    """`text` as a Kubernetes object name (RFC 1123 label): lower case, `_` and `.` as `-`."""
    name = re.sub(r"[_.]", "-", text.lower()).strip("-")
    if not _DNS.fullmatch(name):
        raise ConfigError(f"{what} {text!r}: not usable as a Kubernetes name ({name!r})")
    return name


def render(
    spec: FleetSpec,
    fleet: str,
    image: str = DEFAULT_IMAGE,
    namespace: str = DEFAULT_NAMESPACE,
) -> list[Manifest]:
    """Every manifest of the fleet named `fleet`, `kustomization.yaml` last."""
    fleet = dns_name(fleet, "fleet")
    namespace = dns_name(namespace, "namespace")
    _refuse_unrendered(spec)
    out: list[Manifest] = []
    names: dict[str, str] = {}
    for w in spec.workers:
        name = dns_name(f"{fleet}-{w.name}", "worker")
        if name in names:
            raise ConfigError(f"workers {names[name]!r} and {w.name!r} share the name {name!r}")
        names[name] = w.name
        out += worker_manifests(w, name, fleet, image)
    if spec.gateway is not None:
        out += gateway_manifests(spec, fleet, image)
    out.append(
        Manifest(
            "kustomization.yaml",
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "namespace": namespace,
                "resources": [m.filename for m in out],
            },
        )
    )
    return out


def _refuse_unrendered(spec: FleetSpec) -> None:
    if spec.tls is not None:
        raise ConfigError("[tls]: not rendered (mount the certificates as secrets yourself)")
    if spec.faults:
        raise ConfigError("[[fault]]: the fleet runner's schedule is not rendered")
    if spec.disaggregated:
        raise ConfigError("disaggregated fleets (role = prefill/decode) are not rendered")
    if spec.gateway is not None and spec.protocol == "trtllm":
        raise ConfigError(
            "TensorRT-LLM workers behind the gateway are not rendered (smg needs the "
            "tokenizer folder the fleet runner fetches from a worker)"
        )
    known = serve_options()
    for w in spec.workers:
        if w.node is not None and not _LABEL_VALUE.fullmatch(w.node):
            raise ConfigError(
                f"worker {w.name!r}.node: {w.node!r} is not usable as a Kubernetes label value "
                "(at most 63 letters, digits, '-', '_', '.', starting and ending alphanumeric)"
            )
        for key, value in w.options.items():
            if known[key].type is Path or (
                key in ("hardware", "model", "draft_model") and _is_path(str(value))
            ):
                raise ConfigError(
                    f"worker {w.name!r}.{key}: names a local file ({value}), which does not "
                    "travel into the image: use a built-in name or build it into the image"
                )


def _is_path(name: str) -> bool:
    """A profile or model given by path rather than built-in name."""
    return "/" in name or Path(name).suffix in (".toml", ".json")


def container_ports(w: WorkerSpec) -> dict[str, int]:
    """The worker's ports in its pod, by serve option: gRPC always `GRPC_PORT`; each other
    front as given, 0 its fixed default; fronts not asked for are absent."""
    ports = {"port": GRPC_PORT}
    for key, default in PORTS.items():
        value = w.get(key)
        if value is not None:
            ports[key] = int(value) or default
    return ports


def serve_args(w: WorkerSpec) -> list[str]:
    """`memorywall serve` argv of the worker in its pod."""
    options = {**w.options, **container_ports(w), "host": "0.0.0.0"}
    return ["serve", *to_argv(options)]


def startup_seconds(w: WorkerSpec) -> float:
    """The core's time to load the worker's weights (0 with `load_format = "dummy"`)."""
    from memorywall.cli.deployment import deployment_from_args
    from memorywall.fleet.worker import parse_argv

    args = parse_argv(w.argv())
    if getattr(args, "load_format", None) == "dummy":
        return 0.0
    return deployment_from_args(args).weight_load_s


def _labels(fleet: str, component: str, **more: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "memorywall", PART_OF: fleet, COMPONENT: component, **more}


def _grpc_probe(period: int, failures: int) -> dict[str, Any]:
    return {"grpc": {"port": GRPC_PORT}, "periodSeconds": period, "failureThreshold": failures}


def worker_manifests(w: WorkerSpec, name: str, fleet: str, image: str) -> list[Manifest]:
    """The worker's Deployment and Service."""
    labels = _labels(fleet, "worker", **{"memorywall.io/worker": name})
    ports = container_ports(w)
    port_list = [
        {"name": PORT_NAMES[k], "containerPort": v, "protocol": "TCP"} for k, v in ports.items()
    ]
    startup_failures = max(30, math.ceil(2 * startup_seconds(w)) + 10)  # at 1 s per try
    annotations = {"memorywall.io/hardware": str(w.hardware), "memorywall.io/model": w.model}
    scrape = ports.get("metrics_port") or ports.get("http_port")
    if scrape:
        annotations |= {"prometheus.io/scrape": "true", "prometheus.io/port": str(scrape)}
    container = {
        "name": "memorywall",
        "image": image,
        "args": serve_args(w),
        "ports": port_list,
        "startupProbe": _grpc_probe(1, startup_failures),
        "readinessProbe": _grpc_probe(5, 3),
        "livenessProbe": _grpc_probe(10, 3),
        "resources": {"requests": {"cpu": "1", "memory": "512Mi"}},
    }
    pod: dict[str, Any] = {"containers": [container]}
    if w.node is not None:
        pod["nodeSelector"] = {NODE_LABEL: w.node}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"memorywall.io/worker": name, PART_OF: fleet}},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": pod,
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "selector": {"memorywall.io/worker": name, PART_OF: fleet},
            "ports": [
                {"name": p["name"], "port": p["containerPort"], "targetPort": p["name"]}
                for p in port_list
            ],
        },
    }
    return [
        Manifest(f"{name}-deployment.yaml", deployment),
        Manifest(f"{name}-service.yaml", service),
    ]


def gateway_args(spec: FleetSpec, fleet: str) -> list[str]:
    """`smg launch` argv: discovery of this fleet's worker pods in the pod's own namespace."""
    from memorywall.fleet.runner import smg_backend

    assert spec.gateway is not None
    gw = spec.gateway
    return [
        "launch",
        "--host",
        "0.0.0.0",
        "--port",
        str(gw.port or GATEWAY_PORT),
        "--service-discovery",
        "--selector",
        f"{PART_OF}={fleet}",
        f"{COMPONENT}=worker",
        "--service-discovery-port",
        str(GRPC_PORT),
        "--service-discovery-namespace",
        "$(POD_NAMESPACE)",  # expanded by the kubelet from the env below
        "--policy",
        gw.policy,
        *smg_backend(spec.protocol),
        *gw.args,
    ]


def gateway_manifests(spec: FleetSpec, fleet: str, image: str) -> list[Manifest]:
    """smg's Deployment and Service, and the account that lets it watch pods."""
    assert spec.gateway is not None
    name = f"{fleet}-gateway"
    labels = _labels(fleet, "gateway")
    port = spec.gateway.port or GATEWAY_PORT
    http = {"port": port}
    container = {
        "name": "smg",
        "image": image,
        "command": ["smg"],
        "args": gateway_args(spec, fleet),
        "env": [
            {
                "name": "POD_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            }
        ],
        "ports": [{"name": "http", "containerPort": port, "protocol": "TCP"}],
        "livenessProbe": {"httpGet": {"path": "/liveness", **http}, "periodSeconds": 10},
        "readinessProbe": {"httpGet": {"path": "/readiness", **http}, "periodSeconds": 5},
    }
    meta = {"name": name, "labels": labels}
    return [
        Manifest(
            f"{name}-rbac.yaml",
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        ),
        Manifest(
            f"{name}-role.yaml",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "Role",
                "metadata": meta,
                "rules": [
                    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
                ],
            },
        ),
        Manifest(
            f"{name}-rolebinding.yaml",
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "RoleBinding",
                "metadata": meta,
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
                "subjects": [{"kind": "ServiceAccount", "name": name}],
            },
        ),
        Manifest(
            f"{name}-deployment.yaml",
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": meta,
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {COMPONENT: "gateway", PART_OF: fleet}},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": {"serviceAccountName": name, "containers": [container]},
                    },
                },
            },
        ),
        Manifest(
            f"{name}-service.yaml",
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": meta,
                "spec": {
                    "selector": {COMPONENT: "gateway", PART_OF: fleet},
                    "ports": [{"name": "http", "port": port, "targetPort": "http"}],
                },
            },
        ),
    ]


def write(manifests: list[Manifest], folder: Path) -> list[Path]:
    """Write each manifest as YAML into `folder` (made if missing); the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for m in manifests:
        path = folder / m.filename
        path.write_text(yamltext.dump(m.body))
        paths.append(path)
    return paths
