"""The `memorywall` command: predict output (JSON and human), the listings, and one-line errors."""

from __future__ import annotations

import json
import re
from importlib import resources

import pytest

from memorywall.cli import main
from memorywall.core import builtin_hardware, builtin_models

BASE = ["predict", "--hardware", "h100-sxm", "--model", "llama-3.1-8b"]
ALWAYS_KEYS = {
    "decode_step_s",
    "tokens_per_s_per_user",
    "tokens_per_s_total",
    "devices",
    "bound",
    "energy_j_per_token",
    "kv_capacity_tokens",
}


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_json_keys(capsys):
    code, out, err = run(capsys, [*BASE, "--json"])
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert set(data) >= ALWAYS_KEYS
    assert "prefill_s" not in data and "ttft_s" not in data and "prompt" not in data
    assert data["devices"] == 1 and data["bound"] in {
        "memory",
        "compute",
        "latency",
        "interconnect",
    }
    assert data["tokens_per_s_total"] == pytest.approx(data["tokens_per_s_per_user"], rel=1e-12)
    assert data["tokens_per_s_per_user"] == pytest.approx(1 / data["decode_step_s"], rel=1e-12)
    assert data["kv_capacity_tokens"] == 426_784


def test_predict_json_with_prompt(capsys):
    code, out, _ = run(capsys, [*BASE, "--json", "--prompt", "512", "--batch", "4"])
    assert code == 0
    data = json.loads(out)
    assert ALWAYS_KEYS | {"prefill_s", "ttft_s", "prompt"} <= set(data)
    assert data["prompt"] == 512
    assert data["ttft_s"] == data["prefill_s"] > 0
    assert data["tokens_per_s_total"] == pytest.approx(4 * data["tokens_per_s_per_user"], rel=1e-12)


def test_predict_json_speculative(capsys):
    code, out, _ = run(capsys, [*BASE, "--json", "--draft-tokens", "3", "--acceptance", "0.5"])
    assert code == 0
    assert json.loads(out)["tokens_per_decode_step"] == pytest.approx(1.875, rel=1e-12)


def test_predict_human(capsys):
    code, out, err = run(capsys, BASE)
    assert (code, err) == (0, "")
    assert re.search(r"^bound\s+memory$", out, re.MULTILINE)
    assert "tok/s" in out
    assert "TTFT" not in out
    _, with_prompt, _ = run(capsys, [*BASE, "--prompt", "100"])
    assert "TTFT" in with_prompt and "prefill" in with_prompt


def test_predict_wafer_stream(capsys):
    code, out, _ = run(
        capsys,
        [
            "predict",
            "--hardware",
            "wse-3",
            "--model",
            "llama-3.1-8b",
            "--placement",
            "stream",
            "--json",
        ],
    )
    assert code == 0
    data = json.loads(out)
    assert (data["placement"], data["bound"]) == ("stream", "interconnect")


def test_hardware_lists_builtins(capsys):
    code, out, _ = run(capsys, ["hardware"])
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()[2:]]
    assert names == builtin_hardware()
    assert {"b200", "h100-sxm", "h200", "wse-3", "tpu-v7", "what-if-sow-hbm"} <= set(names)
    header = out.splitlines()[0].split()
    assert header[:2] == ["name", "kind"] and header[-1] == "source"
    kinds = {line.split()[0]: line.split()[1] for line in out.splitlines()[2:]}
    assert kinds["wse-3"] == "wafer" and kinds["tpu-v7"] == "asic"
    assert kinds["what-if-sow-hbm"] == "wafer,"  # "wafer, what-if"
    assert "wafer, what-if" in next(ln for ln in out.splitlines() if ln.startswith("what-if-sow"))


def test_models_lists_builtins(capsys):
    code, out, _ = run(capsys, ["models"])
    assert code == 0
    names = [line.split()[0] for line in out.splitlines()[2:]]
    assert names == builtin_models()
    assert len(names) == 8


def bad_profile(tmp_path) -> str:
    path = tmp_path / "broken.toml"
    path.write_text('name = "broken"\nkind = = "gpu"\n')
    return str(path)


ERRORS = [
    # (id, argv, substring of the message)
    (
        "unknown hardware",
        ["predict", "--hardware", "tpu-v9", "--model", "llama-3.1-8b"],
        "unknown hardware 'tpu-v9' (built in: b200, gb200-nvl72, groq-lpu, h100-sxm, h200",
    ),
    (
        "unknown model",
        ["predict", "--hardware", "h100-sxm", "--model", "llama-9"],
        "unknown model 'llama-9'",
    ),
    (
        "does not fit",
        ["predict", "--hardware", "h100-sxm", "--model", "llama-3.1-70b", "--devices", "1"],
        "needs at least 4 x h100-sxm",
    ),
    ("batch 0", [*BASE, "--batch", "0"], "argument --batch: must be >= 1, got 0"),
    ("batch abc", [*BASE, "--batch", "abc"], "argument --batch: expected an integer, got 'abc'"),
    ("context -1", [*BASE, "--context", "-1"], "argument --context: must be >= 0, got -1"),
    ("acceptance 2", [*BASE, "--draft-tokens", "2", "--acceptance", "2"], "must be in [0, 1]"),
    (
        "draft model alone",
        [*BASE, "--draft-model", "llama-3.1-8b"],
        "--draft-model needs --draft-tokens",
    ),
    ("stream on a gpu", [*BASE, "--placement", "stream"], "no external weight store"),
    ("bad precision", [*BASE, "--weight-precision", "int4"], "invalid choice: 'int4'"),
    (
        "context beyond the window",
        [*BASE, "--context", "131072"],
        "131073 tokens exceed llama-3.1-8b's context window of 131072",
    ),
    (
        "batch x context beyond KV capacity",
        [*BASE, "--batch", "4", "--context", "131000"],
        "batch 4 x context 131000 needs 524004 KV tokens",
    ),
    ("no command", [], "required"),
    ("missing --model", ["predict", "--hardware", "h100-sxm"], "--model"),
]


@pytest.mark.parametrize(("argv", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_are_one_line_exit_2(capsys, argv, message):
    code, out, err = run(capsys, argv)
    assert code == 2
    assert out == ""
    assert err.startswith("memorywall: error: ")
    assert err.count("\n") == 1 and err.endswith("\n")
    assert "Traceback" not in err
    assert message in err


def test_malformed_profile_path(capsys, tmp_path):
    path = bad_profile(tmp_path)
    code, out, err = run(capsys, ["predict", "--hardware", path, "--model", "llama-3.1-8b"])
    assert code == 2 and out == ""
    assert err.startswith("memorywall: error: ") and err.count("\n") == 1
    assert path in err and "not valid TOML" in err


def test_malformed_model_path(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{")
    code, _, err = run(capsys, ["predict", "--hardware", "h100-sxm", "--model", str(path)])
    assert code == 2
    assert err.startswith("memorywall: error: ") and err.count("\n") == 1
    assert "not a readable JSON file" in err


def h100_profile() -> str:
    return (resources.files("memorywall.core") / "profiles" / "h100-sxm.toml").read_text()


def test_scalar_compute_entry_is_a_one_line_error(capsys, tmp_path):
    path = tmp_path / "scalar.toml"
    path.write_text(
        re.sub(
            r"\[compute\.bf16\]\npeak_flops_per_s = [^\n]*",
            "[compute]\nbf16 = 989e12",
            h100_profile(),
        )
    )
    code, _, err = run(capsys, ["predict", "--hardware", str(path), "--model", "llama-3.1-8b"])
    assert code == 2 and err.startswith("memorywall: error: ")


def test_infinite_capacity_is_a_one_line_error(capsys, tmp_path):
    path = tmp_path / "inf.toml"
    path.write_text(h100_profile().replace("value = 80e9", "value = inf"))
    code, _, err = run(capsys, ["predict", "--hardware", str(path), "--model", "llama-3.1-8b"])
    assert code == 2 and err.startswith("memorywall: error: ")
