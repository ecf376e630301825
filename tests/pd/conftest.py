"""Deployments for the disaggregation tests: llama-3.1-8b prefilled on h100, decoded on wse-3."""

from __future__ import annotations

import pytest

from memorywall.core import Deployment, load_hardware, load_model, plan_deployment


@pytest.fixture(scope="session")
def h100() -> Deployment:
    return plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-8b"))


@pytest.fixture(scope="session")
def wse3() -> Deployment:
    return plan_deployment(load_hardware("wse-3"), load_model("llama-3.1-8b"))
