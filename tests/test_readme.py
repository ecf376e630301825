"""The README's examples work as written."""

import ast
import contextlib
import io
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
PORT_LINE = re.compile(r"on 127\.0\.0\.1:(\d+)")


def _python_block(heading: str) -> str:
    section = README.split(heading, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture
def served_target():
    cmd = [sys.executable, "-m", "memorywall", "serve", "--hardware", "wse-3"]
    cmd += ["--model", "llama-3.1-8b", "--port", "0"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if match := PORT_LINE.search(line):
                yield f"127.0.0.1:{match.group(1)}"
                break
        else:
            pytest.fail("server did not start")
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
