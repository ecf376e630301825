"""A fleet `[[worker]]` table is `memorywall serve`'s options: every one round-trips, by the
same name, and a bad key or value is a one-line error naming the worker and the key."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from memorywall.cli.serve import build_parser
from memorywall.errors import ConfigError
from memorywall.fleet import spec as fleet_spec
from memorywall.fleet import worker
from memorywall.fleet.runner import serve_command
from memorywall.fleet.spec import TlsSpec, WorkerSpec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WORKER = {"name": "a", "hardware": "wse-3", "model": "llama-3.1-8b"}
# A value other than the default for every serve option a worker may set, and any other
# keys it needs. A new serve option fails `test_every_serve_option_is_covered` until it
# has a line here (or is refused).
SAMPLES: dict[str, tuple[object, dict]] = {
    "hardware": ("h100-sxm", {}),
    "model": ("qwen3-32b", {}),
    "devices": (2, {}),
    "weight_precision": ("fp8", {}),
    "kv_precision": ("fp8", {}),
    "placement": ("stream", {}),
    "draft_tokens": (3, {}),
    "acceptance": (0.5, {}),
    "draft_model": ("llama-3.1-8b", {"draft_tokens": 2}),
    "ep": (2, {"hardware": "gb200-nvl72", "model": "gpt-oss-120b"}),
    "port": (5000, {}),
    "http_port": (0, {}),
    "no_grpc": (True, {"http_port": 0}),
    "grpc_services": ("memorywall,vllm", {}),
    "metrics_port": (0, {}),
    "dcgm_port": (0, {}),
    "dashboard": (True, {"http_port": 0}),
    "otlp_endpoint": ("http://127.0.0.1:4318/v1/traces", {}),
    "tokenizer": ("/models/tokenizer.json", {}),
    "max_num_seqs": (64, {}),
    "max_num_batched_tokens": (1024, {}),
    "no_prefix_caching": (True, {}),
    "load_format": ("dummy", {}),
    "seed": (7, {}),
    "grace": (1.5, {}),
    "max_messages_per_s": (1000, {}),
    "stream_interval": (4, {}),
    "api_servers": (2, {}),
    "log_level": ("DEBUG", {}),
    "faults": ("error:0.1,stall:0.2:1", {}),
    "fault_seed": (3, {}),
    "allow_fault_headers": (True, {}),
    "max_waiting": (10, {}),
    "retry_after": (2.5, {}),
    "max_request_bytes": (4096, {}),
    "role": ("prefill", {}),
    "kv_link": ("nvlink", {"role": "decode"}),
    "kv_layer_overlap": (True, {}),
    "pd_timeout": (5.0, {}),
    "enable_lora": (True, {}),
    "max_loras": (4, {"enable_lora": True}),
    "max_lora_rank": (64, {"enable_lora": True}),
    "lora_modules": (f"sql={EXAMPLES / 'lora' / 'sql'}", {"enable_lora": True}),
}


def _actions() -> list[argparse.Action]:
    return [a for a in build_parser()._actions if not isinstance(a, argparse._HelpAction)]


def _key(action: argparse.Action) -> str:
    return action.option_strings[-1].removeprefix("--").replace("-", "_")


def _direct(flag: str, value: object, action: argparse.Action) -> object:
    """What `memorywall serve` makes of the flag given by hand."""
    base = ["--hardware", "wse-3", "--model", "llama-3.1-8b"]
    given = [flag] if action.nargs == 0 else [flag, str(value)]
    return getattr(build_parser().parse_args([*base, *given]), action.dest)


def test_every_serve_option_is_covered():
    keys = {_key(a) for a in _actions()}
    assert keys == set(worker.serve_options())
    assert keys == set(SAMPLES) | set(worker.REFUSED)
    assert not set(SAMPLES) & set(worker.REFUSED)


@pytest.mark.parametrize("action", _actions(), ids=_key)
def test_every_serve_option_round_trips_through_a_worker(action, tmp_path):
    key = _key(action)
    table = {**WORKER, key: None}
    if key in worker.REFUSED:
        table[key] = True if action.nargs == 0 else "x"
        with pytest.raises(ConfigError, match=rf"^f\.toml: worker\[0\]\.{key}: set by the fleet"):
            fleet_spec._worker("f.toml", 0, table, tmp_path)
        return
    value, extra = SAMPLES[key]
    table = {**WORKER, **extra, key: value}
    w = fleet_spec._worker("f.toml", 0, table, tmp_path)
    cmd = serve_command(w, tmp_path / "a.ready.json")
    assert cmd[1:4] == ["-m", "memorywall", "serve"]
    args = build_parser().parse_args(cmd[4:])
    expected = _direct(action.option_strings[-1], value, action)
    assert expected != action.default  # the sample sets something
    assert getattr(args, action.dest) == expected
    # The fleet's own options are there too.
    assert (args.host, args.ready_file) == ("127.0.0.1", tmp_path / "a.ready.json")


def test_fleet_defaults_and_its_own_options(tmp_path):
    tls = TlsSpec(cert=tmp_path / "c.pem", key=tmp_path / "k.pem", client_ca=tmp_path / "ca.pem")
    w = WorkerSpec(**{**WORKER, "role": "prefill"})
    args = build_parser().parse_args(serve_command(w, tmp_path / "r.json", tls)[4:])
    assert args.port == 0  # any free port, unless the worker names one
    assert args.bootstrap_port == 0  # a prefill worker's: named in its ready file
    assert (args.tls_cert, args.tls_key, args.tls_client_ca) == (tls.cert, tls.key, tls.client_ca)
    # Untouched options keep serve's defaults.
    plain = build_parser().parse_args(["--hardware", "wse-3", "--model", "llama-3.1-8b"])
    assert (args.max_num_seqs, args.faults) == (plain.max_num_seqs, plain.faults)


def test_relative_paths_are_relative_to_the_spec(tmp_path):
    w = fleet_spec._worker("f.toml", 0, {**WORKER, "tokenizer": "tok/tokenizer.json"}, tmp_path)
    assert w.get("tokenizer") == str(tmp_path / "tok" / "tokenizer.json")


def test_a_spec_file_takes_serve_options(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text(
        '[[worker]]\nname = "a"\nhardware = "h100-sxm"\nmodel = "llama-3.1-8b"\n'
        "max_num_seqs = 32\nno_prefix_caching = true\nmax_waiting = 4\n"
        'weight_precision = "fp8"\n'
    )
    (w,) = fleet_spec.load_spec(path).workers
    args = build_parser().parse_args(serve_command(w, tmp_path / "r.json")[4:])
    assert (args.max_num_seqs, args.prefix_caching, args.max_waiting) == (32, False, 4)
    assert args.weight_precision == "fp8"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"max-num-seqs": 4}, "max-num-seqs: unknown field (a worker takes name and any "
         "memorywall serve option by its long name, '-' written '_'; did you mean max_num_seqs?)"),
        ({"prefix_caching": False}, "prefix_caching: unknown field"),
        ({"max_num_seqs": 0}, "max_num_seqs: must be >= 1, got 0"),
        ({"max_num_seqs": "4"}, "max_num_seqs: must be an integer, got '4'"),
        ({"max_num_seqs": [4]}, "max_num_seqs: must be a string or a number"),
        ({"acceptance": 1.5}, "acceptance: must be in [0, 1], got 1.5"),
        ({"acceptance": "0.5"}, "acceptance: must be a number, got '0.5'"),
        ({"no_prefix_caching": "yes"}, "no_prefix_caching: must be true or false"),
        ({"max_waiting": True}, "max_waiting: must be a string or a number"),
        ({"hardware": True}, "hardware: must be a string or a number"),
        ({"placement": "disk"}, "placement: invalid choice: 'disk'"),
        ({"log_level": "LOUD"}, "log_level: invalid choice: 'LOUD'"),
        ({"faults": "boom:0.1"}, "faults: fault 'boom:0.1': unknown kind 'boom'"),
        ({"draft_model": "gpt-9", "draft_tokens": 2}, "draft_model: unknown model 'gpt-9'"),
        ({"draft_model": "llama-3.1-8b"}, "--draft-model needs --draft-tokens"),
        ({"host": "0.0.0.0"}, "host: set by the fleet: the fleet binds every worker to 127.0.0.1"),
        ({"ready_file": "r.json"}, "ready_file: set by the fleet"),
        ({"bootstrap_port": 9000}, "bootstrap_port: set by the fleet"),
        ({"tls_cert": "c.pem"}, "tls_cert: set by the fleet: set [tls] cert"),
        ({"api_key": "k"}, "api_key: set by the fleet: set MEMORYWALL_API_KEY"),
        ({"hardware": "h100-sxm", "model": "llama-3.1-70b", "devices": 1},
         "llama-3.1-70b at bf16 needs at least"),
        # What serve checks after parsing, it checks here too.
        ({"no_grpc": True}, "nothing to serve: gRPC is off and no HTTP port is given"),
        ({"kv_link": "fast", "role": "decode"}, "kv_link: --kv-link: expected nvlink, nic"),
    ],
)  # fmt: skip
def test_bad_key_or_value_is_one_line_naming_worker_and_key(extra, message):
    with pytest.raises(ConfigError) as e:
        fleet_spec.parse_spec({"worker": [WORKER, {**WORKER, "name": "b", **extra}]}, "f.toml")
    text = str(e.value)
    assert text.startswith("f.toml: worker[1]") and "\n" not in text
    assert message in text


def test_gateway_needs_every_workers_grpc():
    with pytest.raises(ConfigError, match=r"^f\.toml: gateway: smg routes to gRPC, which a "):
        fleet_spec.parse_spec(
            {"worker": [{**WORKER, "no_grpc": True, "http_port": 0}], "gateway": {}}, "f.toml"
        )


def test_worker_spec_in_code_takes_serve_options_by_keyword():
    w = WorkerSpec("a", hardware="wse-3", model="llama-3.1-8b", max_num_seqs=8, faults=None)
    assert w.options == {"hardware": "wse-3", "model": "llama-3.1-8b", "max_num_seqs": 8}
    assert (w.port, w.http_port, w.role, w.faults, w.fault_seed) == (0, None, "both", None, 0)
    assert w.argv() == ["--port", "0", "--hardware", "wse-3", "--model", "llama-3.1-8b",
                        "--max-num-seqs", "8"]  # fmt: skip
    with pytest.raises(ConfigError, match="colour: not a memorywall serve option"):
        WorkerSpec("a", colour="red").argv()


def test_example_specs_parse(tmp_path):
    root = Path(__file__).resolve().parent.parent / "examples"
    for path in sorted(root.glob("fleet*.toml")):
        assert fleet_spec.load_spec(path).workers, path
