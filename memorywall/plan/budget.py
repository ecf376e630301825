"""`plan --power-budget`: how many copies of each backend's deployment a power budget feeds,
and the users, tokens/s and goodput at the SLO they then serve.

Power per deployment is its devices' rated power (profile TDP x devices, both pools of a
disaggregated split) times `pue`. With the default PUE of 1 the budget is device power
alone: no host CPUs, networking, storage or cooling. A data centre's contract covers all of
those; `--pue 1.3` (say) charges them as a share of device power.

Per backend the answer is the held candidate whose copies serve the most goodput within the
budget (whole copies: floor(budget / deployment power) of them), which need not be the
candidate the table ranks first (most goodput per device). Copies serve independent users:
the fleet's figures are one copy's at its highest held load, times the copies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from memorywall.errors import ConfigError
from memorywall.plan.planner import Evaluation, LoadKind, PlanResult


@dataclass(frozen=True, kw_only=True)
class PowerBudget:
    watts: float
    pue: float = 1.0  # facility watts per device watt; 1: the budget is device power alone

    def __post_init__(self) -> None:
        if not (math.isfinite(self.watts) and self.watts > 0):
            raise ConfigError(f"power budget: must be a finite power > 0 W, got {self.watts}")
        if not (math.isfinite(self.pue) and self.pue >= 1.0):
            raise ConfigError(f"pue: must be >= 1, got {self.pue}")

    def deployment_w(self, ev: Evaluation) -> float:
        """Power one copy of the candidate draws against the budget."""
        return ev.candidate.power_w * self.pue

    def copies(self, ev: Evaluation) -> int:
        """Whole copies of the candidate the budget feeds."""
        return math.floor(self.watts / self.deployment_w(ev) + 1e-9)


@dataclass(frozen=True, kw_only=True)
class BudgetAnswer:
    """A backend's fleet within the budget."""

    backend: str
    evaluation: Evaluation
    deployment_w: float
    deployments: int
    devices: int
    users: float  # closed loop: the users held; open loop: in flight (rate x mean E2E)
    requests_s: float
    tok_s: float  # output tokens/s, every request
    goodput_tok_s: float  # output tokens/s of the requests that met every bound

    @property
    def power_w(self) -> float:
        return self.deployments * self.deployment_w


def _users(load: LoadKind, ev: Evaluation) -> float:
    """Concurrent users one copy serves at its highest held load (Little's law open loop)."""
    t = ev.pick
    if load is LoadKind.USERS:
        return t.load
    rate, e2e_ms = t.result.get("request_throughput"), t.result.get("mean_e2el_ms")
    return (rate or 0.0) * (e2e_ms or 0.0) / 1e3


def answer(result: PlanResult, budget: PowerBudget, backend: str) -> BudgetAnswer | None:
    """The held candidate on `backend` serving the most goodput within `budget`; None when
    none holds the SLO or one copy already exceeds the budget."""
    best: tuple[float, int, Evaluation] | None = None
    for ev in result.ranked(backend):
        n = budget.copies(ev)
        if n < 1:
            continue
        total = n * ev.pick.goodput_tok_s
        if best is None or total > best[0]:
            best = (total, n, ev)
    if best is None:
        return None
    total, n, ev = best
    r = ev.pick.result
    return BudgetAnswer(
        backend=backend,
        evaluation=ev,
        deployment_w=budget.deployment_w(ev),
        deployments=n,
        devices=n * ev.candidate.devices,
        users=n * _users(result.query.load, ev),
        requests_s=n * (r.get("request_throughput") or 0.0),
        tok_s=n * (r.get("output_throughput") or 0.0),
        goodput_tok_s=total,
    )


def answers(result: PlanResult, budget: PowerBudget) -> dict[str, BudgetAnswer | None]:
    return {b: answer(result, budget, b) for b in result.backends()}


def why_none(result: PlanResult, budget: PowerBudget, backend: str) -> str:
    held = result.ranked(backend)
    if not held:
        return "no candidate holds the SLO"
    least = min(budget.deployment_w(ev) for ev in held)
    return f"one copy draws {least / 1e3:,.1f} kW, over the budget"
