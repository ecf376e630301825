"""The README's examples work as written."""

import ast
import contextlib
import io
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from memorywall import ready
from memorywall.cli import build_parser
from memorywall.cli.bench import compare_parser

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def _python_block(heading: str) -> str:
    section = README.split(heading, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def served_target(tmp_path):
    ready_file = tmp_path / "ready.json"
    cmd = [sys.executable, "-m", "memorywall", "serve", "--hardware", "wse-3"]
    cmd += ["--model", "llama-3.1-8b", "--port", "0", "--ready-file", str(ready_file)]
    proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        yield ready.wait_for(ready_file, proc, timeout_s=60)["grpc_target"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_client_example_runs_against_a_real_server(served_target):
    code = _python_block("## The client").replace("127.0.0.1:50051", served_target)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    # One line per message: (token ids...) (modelled times...) received_ns
    token_tuples = [
        ast.literal_eval(line.split(")")[0] + ")") for line in out.getvalue().splitlines()
    ]
    assert sum(len(ids) for ids in token_tuples) == 32


def test_core_example_runs():
    code = _python_block("In Python:")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    devices, tok_s, _ttft, _bound = out.getvalue().split()
    assert devices == "4"
    assert float(tok_s) == pytest.approx(450, rel=0.01)


def _sh_commands() -> list[list[str]]:
    """Every `memorywall ...` command in the README's sh blocks, as argv after the name."""
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", README, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part.split(" # ")[0].strip().rstrip("&"))
                if words and words[0].endswith("memorywall"):
                    commands.append(words[1:])
    return commands


def test_first_command_installs_and_runs_the_demo():
    first = re.search(r"```sh\n(.*?)```", README, flags=re.S).group(1)
    assert "pip install -e '.[dev,gateway]'" in first
    assert first.strip().endswith("memorywall demo")


def test_every_memorywall_command_in_the_readme_parses():
    commands = _sh_commands()
    assert ["demo"] in commands and len(commands) > 15
    for argv in commands:
        if argv[:2] == ["bench", "compare"]:
            compare_parser().parse_args(argv[2:])
        else:
            build_parser().parse_args(argv)  # raises on an unknown flag or bad value


def test_tritonclient_example_runs_against_a_real_server(served_target):
    code = _python_block("### KServe v2 / Triton").replace("127.0.0.1:50051", served_target)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("True {'name': 'text_input'")
    assert len(lines) == 1 + 16 and all(line.endswith(" None") for line in lines[1:])
