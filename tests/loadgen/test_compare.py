"""`memorywall bench compare` labels: what each sweep measured, in the table and the legends."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from memorywall.cli import main
from memorywall.loadgen import compare, plots


def level(users: int, **facts: object) -> dict:
    """A closed-loop level result with the keys compare and the plots read."""
    tpot_ms = 2.0 * (1 + users / 16)
    return {
        "label": "run",
        "level": f"c{users}",
        "request_rate": None,
        "max_concurrency": users,
        "completed": 8,
        "total_output_tokens": 8 * 64,
        "output_throughput": users * 1e3 / tpot_ms,
        "mean_ttft_ms": 3.0 * users,
        "mean_tpot_ms": tpot_ms,
        "mean_output_tok_s_per_user": 1e3 / tpot_ms,
        "predicted_ttft_ms": 2.9 * users,
        "predicted_tpot_ms": tpot_ms * 0.98,
        "predicted_e2el_ms": 2.9 * users + 63 * tpot_ms * 0.98,
        "devices": 1,
        "hardware": None,
        "model": None,
        "emulated": False,
        "target": "127.0.0.1:50051",
        **facts,
    }


def saved(folder: Path, **facts: object) -> Path:
    folder.mkdir(parents=True)
    levels = [level(u, **facts) for u in (1, 8, 32)]
    (folder / "summary.json").write_text(json.dumps(levels))
    return folder


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(["bench", "compare", *argv])
    return rc, out.getvalue(), err.getvalue()


def sweep_labels(stdout: str) -> list[str]:
    """The sweep column of the table, in order, once per sweep."""
    lines = [line for line in stdout.splitlines()[2:] if line and not line.startswith("wrote")]
    width = stdout.splitlines()[0].index("load")
    return list(dict.fromkeys(line[:width].strip() for line in lines))


@pytest.fixture
def legends(monkeypatch) -> dict[str, list[str]]:
    """Each plot's legend entries, by file name, captured as the plots are saved."""
    seen: dict[str, list[str]] = {}
    save = plots._save

    def capture(fig, path, title):
        seen[Path(path).name] = [
            t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().texts
        ]
        return save(fig, path, title)

    monkeypatch.setattr(plots, "_save", capture)
    return seen


def test_default_labels_say_what_each_sweep_measured(tmp_path, legends):
    wse = saved(tmp_path / "out" / "wse", hardware="wse-3", model="llama-3.1-8b", emulated=True)
    h100 = saved(
        tmp_path / "out" / "h100",
        hardware="h100-sxm",
        model="llama-3.1-8b",
        devices=2,
        emulated=True,
    )
    vllm = saved(tmp_path / "vllm", model="meta-llama/Llama-3.1-8B", target="http://10.0.0.5:8000")
    bare = saved(tmp_path / "mystery", target="")
    rc, stdout, err = run(str(wse), str(h100), str(vllm), str(bare), "--out", str(tmp_path / "c"))
    assert rc == 0, err
    expected = [
        "wse-3 x1 llama-3.1-8b",
        "h100-sxm x2 llama-3.1-8b",
        "meta-llama/Llama-3.1-8B @ 10.0.0.5:8000",
        "mystery",
    ]
    assert sweep_labels(stdout) == expected
    assert set(legends) == {
        "latency_vs_load.png",
        "per_user_vs_load.png",
        "throughput_vs_interactivity.png",
    }
    for name, entries in legends.items():
        for label in expected:
            assert f"{label}: measured" in entries, name
            assert f"{label}: core prediction" in entries, name
        assert "run: measured" not in entries


def test_label_option_overrides_and_must_match_the_paths(tmp_path, legends):
    a = saved(tmp_path / "a", hardware="wse-3", model="llama-3.1-8b", emulated=True)
    b = saved(tmp_path / "b", hardware="h100-sxm", model="llama-3.1-8b", emulated=True)
    rc, stdout, err = run(str(a), str(b), "--label", "wafer,gpu", "--out", str(tmp_path / "c"))
    assert rc == 0, err
    assert sweep_labels(stdout) == ["wafer", "gpu"]
    assert "wafer: measured" in legends["latency_vs_load.png"]
    rc, _, err = run(str(a), str(b), "--label", "only-one")
    assert rc == 2
    assert err == "memorywall: error: --label: 1 labels for 2 sweeps; give one per path\n"


def test_a_label_set_at_bench_time_is_kept_and_collisions_name_the_folder(tmp_path):
    named = saved(
        tmp_path / "n", hardware="wse-3", model="llama-3.1-8b", emulated=True, label="baseline"
    )
    one = saved(tmp_path / "first", hardware="wse-3", model="llama-3.1-8b", emulated=True)
    two = saved(tmp_path / "second", hardware="wse-3", model="llama-3.1-8b", emulated=True)
    rc, stdout, err = run(str(named), str(one), str(two / "summary.json"))
    assert rc == 0, err
    assert sweep_labels(stdout) == [
        "baseline",
        "wse-3 x1 llama-3.1-8b (first)",
        "wse-3 x1 llama-3.1-8b (second)",
    ]


def test_simulated_sweeps_are_marked_simulated(tmp_path, legends):
    sim = saved(tmp_path / "s", hardware="wse-3", model="llama-3.1-8b", simulated=True)
    rc, stdout, _ = run(str(sim), "--out", str(tmp_path / "c"))
    assert rc == 0
    assert sweep_labels(stdout) == ["wse-3 x1 llama-3.1-8b (simulated)"]
    assert "wse-3 x1 llama-3.1-8b (simulated): simulated" in legends["per_user_vs_load.png"]


def test_describe_falls_back_to_the_folder():
    results = [level(1, target="")]
    assert compare.describe(results, Path("/tmp/some-run")) == "some-run"
