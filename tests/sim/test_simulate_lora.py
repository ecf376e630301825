"""`memorywall simulate` with LoRA: a trace's `model` names an adapter of `--lora-modules`;
three adapters with --max-loras 1 run one after another, each first step paying the core's
load time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from memorywall.cli.app import main
from memorywall.core import load_hardware, load_model, plan_deployment
from memorywall.core.lora import LoraAdapter, LoraCost, adapter_params, target_modules
from memorywall.loadgen.records import read_requests
from memorywall.loadgen.workload import TraceWorkload

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "lora"
H100_8B = ["--hardware", "h100-sxm", "--model", "llama-3.1-8b"]
ADAPTERS = ["sql", "chat", "code"]  # r 16, 8, 64 (see examples/lora)
LORA = [
    "--lora-modules",
    *(f"{n}={EXAMPLES / n}" for n in ADAPTERS),
    "--max-lora-rank",
    "64",
]


def _trace(path: Path, models: list[str | None]) -> Path:
    with path.open("w") as f:
        for model in models:
            row = {"timestamp": 0, "input_length": 256, "output_length": 16}
            if model is not None:
                row["model"] = model
            f.write(json.dumps(row) + "\n")
    return path


def _records(tmp_path: Path, trace: Path, *extra: str) -> list[dict]:
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    args = ["simulate", *H100_8B, "--workload", str(trace), "--warmup", "0", "--no-plots"]
    assert main([*args, "--out", str(out), *extra]) == 0
    (rows,) = out.glob("*.requests.jsonl")
    return [r.as_dict() for r in read_requests(rows)]  # message times from the .tokens.npz


def _adapter(name: str) -> LoraAdapter:
    config = json.loads((EXAMPLES / name / "adapter_config.json").read_text())
    modules = target_modules(config["target_modules"])
    params = adapter_params(load_model("llama-3.1-8b"), config["r"], modules)
    return LoraAdapter(
        name=name, lora_id=0, rank=config["r"], target_modules=modules, params=params
    )


def test_trace_model_field_is_read(tmp_path):
    workload = TraceWorkload.from_jsonl(_trace(tmp_path / "t.jsonl", ["sql", None]))
    assert [r.model for r in workload.requests] == ["sql", None]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_length": 3, "output_length": 2, "model": 7}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: model: expected a non-empty string"):
        TraceWorkload.from_jsonl(bad)


def test_three_adapters_max_loras_one_run_one_after_another(tmp_path):
    trace = _trace(tmp_path / "t.jsonl", [*ADAPTERS, *ADAPTERS])
    one = _records(tmp_path, trace, *LORA, "--max-loras", "1")
    three = _records(tmp_path, trace, *LORA, "--max-loras", "3")
    base = _records(tmp_path, _trace(tmp_path / "base.jsonl", [None] * 2))  # one step's pair

    def span(rows: list[dict], i: int) -> tuple[int, int]:
        r = rows[i]
        return r["chunk_ns"][0], r["finished_ns"]

    # max-loras 1: sql's two requests, then chat's, then code's.
    for first, second in ((0, 1), (1, 2)):
        assert span(one, first)[1] <= span(one, second)[0]
        assert span(one, first + 3)[1] <= span(one, second + 3)[0]
    # max-loras 3: all in one batch, their first tokens at once.
    assert len({r["chunk_ns"][0] for r in three}) == 1
    # Each adapter's first step (two 256-token prefills) adds its load and its kernels to the
    # base model's: the core's load time within 5% (the kernels are the rest).
    d = plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-8b"))
    cost = LoraCost(d)
    first_step_ns = base[0]["chunk_ns"][0]
    for i, name in enumerate(ADAPTERS):
        a = _adapter(name)
        before = one[i - 1]["finished_ns"] if i else 0
        extra_s = (one[i]["chunk_ns"][0] - before - first_step_ns) / 1e9
        kernels_s = cost.step([(a, 512)]).time_s
        assert extra_s - kernels_s == pytest.approx(cost.load_s(a), rel=0.05)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--max-loras", "2"], "--max-loras: needs --lora-modules"),
        (["--lora-modules", "sql"], "expected name=path"),
        (["--lora-modules", f"sql={EXAMPLES / 'code'}"], "LoRA rank 64 is greater than"),
        (["--lora-modules", f"x={EXAMPLES}"], "No adapter found for"),
        ([*LORA, "--max-lora-rank", "12"], "--max-lora-rank"),
        ([*LORA, "--max-loras", "0"], "--max-loras"),
    ],
)
def test_bad_lora_options_exit_2(tmp_path, capsys, args, words):
    trace = _trace(tmp_path / "t.jsonl", ["sql"])
    argv = ["simulate", *H100_8B, "--workload", str(trace), "--warmup", "0", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and words in err[0]


def test_a_trace_naming_an_adapter_not_served_exits_2(tmp_path, capsys):
    trace = _trace(tmp_path / "t.jsonl", ["sql", "nope"])
    argv = ["simulate", *H100_8B, "--workload", str(trace), "--warmup", "0", *LORA]
    assert main(argv) == 2
    assert "asks for model 'nope'" in capsys.readouterr().err
