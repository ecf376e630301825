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
        # The power-budget plan on a wafer, a GPU and an ASIC, searched tiny.
        power = study.power_plan(
            out,
            model="llama-3.1-8b",
            backends=("wse-3", "h100-sxm", "tpu-v7"),
            space={"max_devices": 1, "max_num_seqs": (4,), "tolerance": 0.5},
            prompts=8,
        )
    data = {
        "config": config,
        "simulated": simulated,
        "spot_checks": [],
        "plans": {},
        "power_budget": power,
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


def test_claims_table_has_every_claim_with_a_figure_command_and_verdict(written):
    data, page, out = written
    section = page.split("## The article's claims, checked")[1].split("\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + 9  # header and one row per claim of the issue
    for words in ("21 PB/s", "1.5-5 times", "first-token", "0.15 pJ/bit", "150 GB/s",
                  "SRAM scaling", "optical", "NVL72", "250 MW"):  # fmt: skip
        assert sum(words in r for r in rows) == 1, words
    for r in rows[1:]:
        cells = [c.strip() for c in r.strip("|").split(" | ")]
        assert len(cells) == 6 and cells[3].startswith("`") and cells[5]
        assert any(v in cells[5] for v in ("holds", "does not hold", "not testable"))
    # The 1.5-5x claim answered for both B200 stacks.
    assert "over B200 as fitted" in page and "over B200 compiled fp8" in page
    # The power row from this run's plan: wafer, GPU and ASIC, each with copies and users.
    power = rows[-1]
    budget = data["power_budget"]["power_budget"]
    assert budget["watts"] == 250e6 and budget["pue"] == 1.0
    for hw in ("wse-3", "h100-sxm", "tpu-v7"):
        a = budget["backends"][hw]["answer"]
        assert a is not None and a["power_w"] <= 250e6, hw
        assert f"{hw}: {a['deployments']:,} x (" in power
    assert (out / "power_budget.png").stat().st_size > 10_000
    assert (out / "routes.png").stat().st_size > 10_000  # every route's profiles
