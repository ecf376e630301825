"""The article's routes: every built-in profile in one, and `memorywall plan`'s Pareto plot
colouring each backend with its route's shade (the study's families)."""

from __future__ import annotations

import matplotlib.colors as mcolors
import pytest

from memorywall.core import (
    Precision,
    builtin_hardware,
    load_hardware,
    load_model,
    plan_deployment,
    predict,
)
from memorywall.loadgen.slo import Slo
from memorywall.loadgen.workload import Fixed, SyntheticWorkload
from memorywall.plan import report
from memorywall.plan.planner import LoadKind, Query, Space, plan
from memorywall.plan.routes import ROUTES, route_colours, route_of


def test_every_route_profile_has_one_colour_family():
    colours = route_colours()
    assert set(colours) == set(builtin_hardware())  # a new profile must join a route
    families = {family for family, _ in ROUTES.values()}
    assert len(families) == len(ROUTES)
    for hw, (route, _) in colours.items():
        assert route_of(hw) == route and hw in ROUTES[route][1]
    assert route_of("my-own-profile") is None


def test_shades_differ_within_a_route():
    colours = route_colours()
    for _, names in ROUTES.values():
        assert len({colours[hw][1] for hw in names}) == len(names)


@pytest.fixture(scope="module")
def two_routes():
    model, h100 = load_model("llama-3.1-8b"), load_hardware("h100-sxm")
    fp8 = plan_deployment(h100, model, weight_precision=Precision.FP8)
    step = predict(fp8, batch=1, context=80).decode_step_s
    query = Query(
        model=model,
        workload=SyntheticWorkload(Fixed(64), Fixed(16)),
        slo=Slo(tpot_s=step * 1.1),
        load=LoadKind.USERS,
        num_prompts=8,
    )
    space = Space(
        hardware=(h100, load_hardware("wse-3")),
        precisions=(Precision.FP8,),
        max_devices=1,
        max_num_seqs=(1,),
    )
    return plan(query, space)


def test_plan_colours_come_from_the_route_map(two_routes, tmp_path, monkeypatch):
    routes = route_colours()
    colours = report.backend_colours(two_routes)
    assert colours == {hw: routes[hw][1] for hw in ("h100-sxm", "wse-3")}
    figures = []
    monkeypatch.setattr(report.plt, "close", figures.append)  # keep the figure to read back
    report.pareto_plot(two_routes, tmp_path / "pareto.png")
    (fig,) = figures
    labelled = {line.get_label(): line.get_color() for line in fig.axes[0].get_lines()}
    for hw in ("h100-sxm", "wse-3"):
        route, colour = routes[hw]
        assert mcolors.same_color(labelled[f"{hw} ({route}): pick"], colour), hw
