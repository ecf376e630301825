"""The study page says only what its data says: a tiny simulated run, written out."""

from __future__ import annotations

import pytest

from benchmarks import study, study_report
from memorywall.core import load_hardware

USERS = (1, 4)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("docs") / "study"
    out.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(study, "PROMPT", 256)  # a run with other settings than the defaults
        config = {**study.config(), "users": list(USERS)}
        simulated = study.simulate_all(["llama-3.1-8b"], study.BACKENDS, USERS)
    data = {
        "config": config,
        "simulated": simulated,
        "spot_checks": [],
        "plans": {},
        "timings": {"simulation_s": 1.0, "live_s": 0.0, "plan_s": 0.0},
        "elapsed_s": 1.0,
        "date": "2026-01-01",
        "machine": "test",
        "failures": [],
    }
    study_report.write(data, out)
    return data, (out.parent / "study.md").read_text(), out


def test_simulated_levels_are_exact_and_not_suspect(written):
    data, _, _ = written
    rows = data["simulated"]
    assert len(rows) == len(study.BACKENDS) * len(USERS)
    for r in rows:
        assert r["simulated"] and r["suspect"] == [] and r["failed"] == 0
        assert r["total_input_tokens"] == 256 * r["completed"]
        assert r["modelled_energy_j_per_output_token"] > 0


def test_page_states_the_run_config_and_the_profiles_numbers(written):
    _, page, out = written
    assert "prompts of 256 tokens" in page  # from the config, not the module's default
    assert "closed-loop users 1, 4;" in page
    wafer = load_hardware("wse-3")
    io = min(wafer.stream.bandwidth_bytes_per_s, wafer.external_io.bandwidth_bytes_per_s)
    assert f"over {io / 1e9:,.0f} GB/s (the profile's I/O)" in page
    assert "| llama-3.1-70b |" not in page.split("## Reading")[0]  # only the run's models
    assert "Sanity check" in page and "passed." in page
    for png in ("per_user_vs_concurrency", "ttft_vs_concurrency", "energy_per_token"):
        assert (out / f"{png}.png").stat().st_size > 10_000
