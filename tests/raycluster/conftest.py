"""The `ray_cluster` fixture: a two-node local Ray cluster (`raynodes`), one per session.
Without ray installed its tests skip, except under MEMORYWALL_CI=1 where they fail."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from raynodes import RayCluster, ray_command, start_cluster, stop_cluster


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[RayCluster]:
    ray = ray_command()
    if ray is None:
        if os.environ.get("MEMORYWALL_CI") == "1":
            pytest.fail("ray is not installed (CI installs memorywall[ray])")
        pytest.skip("ray is not installed (pip install 'memorywall[ray]')")
    cluster = start_cluster(ray)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
        shutil.rmtree(cluster.temp_dir, ignore_errors=True)
