"""`memorywall fleet SPEC --render-kubernetes DIR`: the manifests parse, name real CLI flags
(each worker's args go through serve's own parser, smg's through `smg launch --help`), and
their probes point at endpoints a worker started with those args really answers."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from memorywall import ready
from memorywall.cli import main
from memorywall.errors import ConfigError
from memorywall.fleet import kubernetes, yamltext
from memorywall.fleet.runner import find_smg
from memorywall.fleet.spec import load_spec, parse_spec
from memorywall.fleet.worker import parse_argv

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "fleet.toml"


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("k8s")
    assert main(["fleet", str(EXAMPLE), "--render-kubernetes", str(out)]) == 0
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(out.iterdir())}


def of_kind(rendered: dict[str, dict], kind: str, component: str) -> list[dict]:
    return [
        m
        for m in rendered.values()
        if m["kind"] == kind and m["metadata"]["labels"][kubernetes.COMPONENT] == component
    ]


def test_kustomization_lists_every_manifest_once(rendered):
    k = rendered["kustomization.yaml"]
    assert k["kind"] == "Kustomization" and k["namespace"] == "memorywall"
    assert sorted(k["resources"]) == sorted(n for n in rendered if n != "kustomization.yaml")
    kinds = sorted(m["kind"] for n, m in rendered.items() if n != "kustomization.yaml")
    # Three workers (Deployment + Service each), the gateway's five objects.
    assert kinds == sorted(
        ["Deployment"] * 4 + ["Service"] * 4 + ["ServiceAccount", "Role", "RoleBinding"]
    )


def test_worker_args_go_through_serve_and_probes_name_its_grpc_port(rendered):
    workers = of_kind(rendered, "Deployment", "worker")
    assert len(workers) == 3
    spec = load_spec(EXAMPLE)
    for d, w in zip(workers, sorted(spec.workers, key=lambda w: w.name), strict=True):
        (c,) = d["spec"]["template"]["spec"]["containers"]
        assert c["args"][0] == "serve"
        args = parse_argv(c["args"][1:])  # serve's own parser: every flag real, every value valid
        assert (args.host, args.port) == ("0.0.0.0", kubernetes.GRPC_PORT)
        assert (args.hardware, args.model) == (w.hardware, w.model)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == args.port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"]["port"] == args.port
        if args.http_port is not None:
            assert ports["http"] == args.http_port == kubernetes.PORTS["http_port"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        assert all(labels[k] == v for k, v in d["spec"]["selector"]["matchLabels"].items())
    h100_b = next(d for d in workers if d["metadata"]["name"] == "fleet-h100-b")
    (c,) = h100_b["spec"]["template"]["spec"]["containers"]
    assert parse_argv(c["args"][1:]).max_num_seqs == 128  # the worker's own options carried


def test_services_select_their_pods_and_expose_every_container_port(rendered):
    deployments = {m["metadata"]["name"]: m for m in rendered.values() if m["kind"] == "Deployment"}
    for svc in (m for m in rendered.values() if m["kind"] == "Service"):
        pod = deployments[svc["metadata"]["name"]]["spec"]["template"]
        assert all(pod["metadata"]["labels"][k] == v for k, v in svc["spec"]["selector"].items())
        names = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in svc["spec"]["ports"]} == names


@pytest.mark.skipif(find_smg() is None, reason="smg not installed ([gateway] extra)")
def test_gateway_args_are_smg_flags_and_discovery_matches_the_worker_pods(rendered):
    (gw,) = of_kind(rendered, "Deployment", "gateway")
    pod = gw["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["smg"] and c["args"][0] == "launch"
    smg = find_smg()
    assert smg is not None
    help_text = subprocess.run(
        [*smg, "launch", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    for flag in (a for a in c["args"] if a.startswith("--")):
        assert re.search(rf"(^|[\s\[]){re.escape(flag)}([\s\]=]|$)", help_text, re.M), flag
    args = c["args"]
    selector = args[args.index("--selector") + 1 : args.index("--service-discovery-port")]
    for worker in of_kind(rendered, "Deployment", "worker"):
        labels = worker["spec"]["template"]["metadata"]["labels"]
        assert all(labels[k] == v for k, v in (s.split("=") for s in selector))
    assert int(args[args.index("--service-discovery-port") + 1]) == kubernetes.GRPC_PORT
    port = int(args[args.index("--port") + 1])
    assert c["ports"][0]["containerPort"] == port == 30000
    assert c["livenessProbe"]["httpGet"] == {"path": "/liveness", "port": port}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readiness", "port": port}
    # smg reads the namespace from the pod's own, and may watch pods there.
    assert "$(POD_NAMESPACE)" in args and c["env"][0]["name"] == "POD_NAMESPACE"
    (role,) = [m for m in rendered.values() if m["kind"] == "Role"]
    assert {"list", "watch"} <= set(role["rules"][0]["verbs"])
    assert pod["serviceAccountName"] == role["metadata"]["name"]


def test_a_worker_started_with_the_rendered_args_answers_the_probes(rendered, tmp_path):
    # The wafer worker's rendered args, on loopback and a free port: its gRPC health
    # service (the probes' endpoint) says SERVING, and its HTTP front answers /health.
    wse3 = next(
        m
        for m in of_kind(rendered, "Deployment", "worker")
        if m["metadata"]["name"] == "fleet-wse3"
    )
    args = list(wse3["spec"]["template"]["spec"]["containers"][0]["args"])
    for flag, value in (("--host", "127.0.0.1"), ("--port", "0"), ("--http-port", "0")):
        args[args.index(flag) + 1] = value
    ready_file = tmp_path / "ready.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "memorywall", *args, "--ready-file", str(ready_file)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        info = ready.wait_for(ready_file, proc, timeout_s=60)
        assert info is not None
        with grpc.insecure_channel(f"127.0.0.1:{info['grpc_port']}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=10
            )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        import urllib.request

        with urllib.request.urlopen(
            f"http://127.0.0.1:{info['http_port']}/health", timeout=10
        ) as r:
            assert r.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_startup_probe_allows_the_cores_weight_load_time():
    spec = parse_spec(
        {"worker": [{"name": "big", "hardware": "h100-sxm", "model": "llama-3.1-70b"}]}
    )
    (w,) = spec.workers
    load_s = kubernetes.startup_seconds(w)
    assert load_s > 0
    (d, _) = kubernetes.worker_manifests(w, "x-big", "x", "img")
    probe = d.body["spec"]["template"]["spec"]["containers"][0]["startupProbe"]
    assert probe["periodSeconds"] * probe["failureThreshold"] >= 2 * load_s
    dummy = parse_spec(
        {
            "worker": [
                {"name": "d", "hardware": "wse-3", "model": "llama-3.1-8b", "load_format": "dummy"}
            ]
        }
    )
    assert kubernetes.startup_seconds(dummy.workers[0]) == 0.0


WSE = {"name": "a", "hardware": "wse-3", "model": "llama-3.1-8b"}
PROFILE = ROOT / "core" / "profiles" / "wse-3.toml"  # a profile given by its path


def test_a_workers_node_becomes_its_pods_node_selector(tmp_path):
    spec = tmp_path / "pinned.toml"
    spec.write_text(
        '[[worker]]\nname = "a"\nhardware = "wse-3"\nmodel = "llama-3.1-8b"\nnode = "node_b"\n'
        '[[worker]]\nname = "b"\nhardware = "wse-3"\nmodel = "llama-3.1-8b"\n'
    )
    out = tmp_path / "k8s"
    assert main(["fleet", str(spec), "--render-kubernetes", str(out)]) == 0
    pods = {
        name: yaml.safe_load((out / f"pinned-{name}-deployment.yaml").read_text())["spec"][
            "template"
        ]["spec"]
        for name in ("a", "b")
    }
    assert pods["a"]["nodeSelector"] == {"memorywall.io/node": "node_b"}
    assert "nodeSelector" not in pods["b"]  # unpinned: the scheduler places it
    assert "--node" not in " ".join(pods["a"]["containers"][0]["args"])  # not a serve flag


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"worker": [WSE], "fault": [{"at_s": 1.0, "worker": "a", "action": "kill"}]}, "[[fault]]"),
        ({"worker": [{**WSE, "hardware": str(PROFILE)}]}, "names a local file"),
        ({"worker": [WSE, {**WSE, "name": "A"}]}, "share the name"),
        ({"worker": [{**WSE, "name": "a" * 70}]}, "not usable as a Kubernetes name"),
        ({"worker": [{**WSE, "node": "node b"}]}, "not usable as a Kubernetes label value"),
        ({"worker": [{**WSE, "node": "n" * 64}]}, "not usable as a Kubernetes label value"),
    ],
)
def test_refuses_what_it_cannot_render(data, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        kubernetes.render(parse_spec(data), "fleet")


def test_refuses_a_disaggregated_fleet_on_the_command_line(tmp_path, capsys):
    code = main(
        ["fleet", str(ROOT / "examples" / "fleet-pd.toml"), "--render-kubernetes", str(tmp_path)]
    )
    assert code == 2
    assert "disaggregated fleets" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_image_without_render_is_a_usage_error(capsys):
    assert main(["fleet", str(EXAMPLE), "--image", "x"]) == 2
    assert "--render-kubernetes" in capsys.readouterr().err


@pytest.mark.parametrize(
    "value",
    ["yes", "on", "0.0.0.0", "1", "", "$(POD_NAMESPACE)", "a: b", "- x", "#c", "null", "é"],
)
def test_yaml_strings_read_back_as_themselves(value):
    data = {
        "k": value,
        value: 1,
        "z": None,
        "l": [value, {"m": [value]}],
        "n": 3,
        "b": True,
        "e": [],
        "d": {},
    }
    assert yaml.safe_load(yamltext.dump(data)) == data


def test_containerfile_installs_the_package_with_the_gateway():
    text = (ROOT / "Containerfile").read_text()
    assert "pip install" in text and "'.[gateway]'" in text
    assert 'ENTRYPOINT ["memorywall"]' in text
    for folder in ("core", "server", "client", "loadgen", "protos", "memorywall"):
        assert f"COPY {folder} {folder}" in text
