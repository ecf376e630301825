"""Deployments the tests share, from the performance core: llama-3.1-8b on one wafer and on
one GPU (the serving engine's, and a disaggregated split's two pools)."""

from __future__ import annotations

import pytest

from memorywall.core import Deployment, load_hardware, load_model, plan_deployment


@pytest.fixture(scope="session")
def wse3_8b() -> Deployment:
    """llama-3.1-8b on one wse-3: ~0.56 ms decode steps, ~179k tokens of KV."""
    return plan_deployment(load_hardware("wse-3"), load_model("llama-3.1-8b"))


@pytest.fixture(scope="session")
def h100_8b() -> Deployment:
    """llama-3.1-8b on one h100-sxm: ~7.6 ms decode steps."""
    return plan_deployment(load_hardware("h100-sxm"), load_model("llama-3.1-8b"))
