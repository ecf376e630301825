"""`--ray ADDRESS` without a cluster: the CLI starts without ray, bad addresses and
options are one-line errors (exit 2)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from memorywall.cli import main
from memorywall.cluster.options import ray_address


def test_the_cli_does_not_import_ray():
    code = (
        "import sys, contextlib, io\n"
        "from memorywall.cli import main\n"
        "for cmd in ([], ['simulate'], ['plan'], ['fleet']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main([*cmd, '--help'])\n"
        "print('ray' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("text", ["auto", "127.0.0.1:6379", "head:6379", "ray://head:10001"])
def test_good_addresses(text):
    assert ray_address(text) == text


@pytest.mark.parametrize(
    "command",
    [
        ["simulate", "--hardware", "wse-3", "--model", "llama-3.1-8b"],
        ["plan", "--model", "llama-3.1-8b", "--slo", "ttft=1s"],
        ["fleet", "spec.toml"],
    ],
)
@pytest.mark.parametrize("bad", ["", "nowhere", "host:port", "a b:1"])
def test_bad_address_is_one_line_exit_2(command, bad, capsys):
    assert main([*command, "--ray", bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--ray" in err and "HOST:PORT" in err


def test_simulate_ray_with_jobs_is_one_line_exit_2(capsys):
    argv = ["simulate", "--hardware", "wse-3", "--model", "llama-3.1-8b", "--jobs", "2"]
    assert main([*argv, "--ray", "auto"]) == 2
    assert "--ray and --jobs" in capsys.readouterr().err


def test_a_pinned_worker_needs_ray(tmp_path, capsys):
    spec = tmp_path / "fleet.toml"
    spec.write_text('[[worker]]\nname = "a"\nhardware = "wse-3"\nmodel = "llama-3.1-8b"\n'
                    'node = "node_b"\n')  # fmt: skip
    assert main(["fleet", str(spec)]) == 2
    assert "a: node = places a worker on a Ray cluster: add --ray" in capsys.readouterr().err


def test_a_node_must_be_a_name(tmp_path, capsys):
    spec = tmp_path / "fleet.toml"
    spec.write_text(
        '[[worker]]\nname = "a"\nhardware = "wse-3"\nmodel = "llama-3.1-8b"\nnode = 3\n'
    )
    assert main(["fleet", str(spec), "--ray", "auto"]) == 2
    assert "worker[0].node: must be a non-empty string" in capsys.readouterr().err
