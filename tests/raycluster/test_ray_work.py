"""`simulate --ray` and `plan --ray` on the two-node cluster: the files and the plan a
local run gives."""

from __future__ import annotations

import json
from pathlib import Path

from memorywall.cli import main

SIM = [
    "simulate", "--hardware", "wse-3", "--model", "llama-3.1-8b", "--input-len", "64",
    "--output-len", "16", "--concurrency", "1,4,16", "--num-prompts", "12",
]  # fmt: skip


def test_simulate_on_ray_writes_the_local_files(ray_cluster, tmp_path: Path) -> None:
    assert main([*SIM, "--out", str(tmp_path / "local")]) == 0
    assert main([*SIM, "--out", str(tmp_path / "ray"), "--ray", ray_cluster.address]) == 0
    names = sorted(p.name for p in (tmp_path / "local").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "ray").iterdir())
    names.remove("wall_time.json")  # host time: the one file that differs
    levels = {f"sim-{c}.{ext}" for c in ("c1", "c4", "c16") for ext in ("json", "requests.jsonl")}
    assert levels | {"summary.json"} <= set(names)
    for name in names:
        assert (tmp_path / "local" / name).read_bytes() == (tmp_path / "ray" / name).read_bytes()
    wall = json.loads((tmp_path / "ray" / "wall_time.json").read_text())
    assert [lv["level"] for lv in wall["levels"]] == ["c1", "c4", "c16"]


PLAN = [
    "plan", "--model", "llama-3.1-8b", "--hardware", "h100-sxm,wse-3", "--precisions",
    "bf16,fp8", "--max-devices", "1", "--max-num-seqs", "1,4", "--input-len", "64",
    "--output-len", "16", "--num-prompts", "8", "--slo", "ttft=2s,tpot=20ms", "--load",
    "users", "--json",
]  # fmt: skip


def test_plan_on_ray_ranks_as_the_sequential_search(ray_cluster, capsys) -> None:
    assert main(PLAN) == 0
    local = json.loads(capsys.readouterr().out)
    assert main([*PLAN, "--ray", ray_cluster.address]) == 0
    assert json.loads(capsys.readouterr().out) == local
    assert local["best"]["h100-sxm"] is not None and local["best"]["wse-3"] is not None


def test_no_cluster_at_the_address_is_one_line_exit_2(ray_cluster, capsys) -> None:
    # A port nothing listens on (the fixture's cluster is elsewhere).
    host, _ = ray_cluster.address.rsplit(":", 1)
    assert main([*PLAN, "--ray", f"{host}:1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot join the cluster" in err
