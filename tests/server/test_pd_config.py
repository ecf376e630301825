"""What a disaggregated partner learns of a worker's deployment: its names, as given, with
the devices, tensor/pipeline split and speculative decoding it got."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from memorywall.core.deployment import DeploymentNames
from memorywall.errors import DisaggregationError
from memorywall.server.pd.config import DeploymentRef


def test_ref_rebuilds_the_same_deployment_across_the_wire():
    names = DeploymentNames(
        hardware="h100-sxm",
        model="llama-3.1-70b",
        devices=8,
        draft_tokens=2,
        acceptance=0.8,
        draft_model="llama-3.1-8b",
        tensor_parallel=2,
    )
    d = names.build()
    ref = DeploymentRef.of(d, names)
    # What the bootstrap server sends: the ref inside a JSON message (`asdict` of Prefilled).
    back = DeploymentRef.from_dict(json.loads(json.dumps(asdict(ref))))
    assert back == ref and hash(back) == hash(ref)
    rebuilt = back.build()
    assert rebuilt == d
    assert (rebuilt.tensor_parallel, rebuilt.pipeline_parallel) == (2, 4)
    assert rebuilt.speculative is not None and rebuilt.speculative.draft_tokens == 2


def test_ref_of_a_deployment_alone_uses_its_names_and_gets_its_devices():
    d = DeploymentNames(hardware="wse-3", model="llama-3.1-70b").build()
    ref = DeploymentRef.of(d)
    assert (ref.hardware, ref.model, ref.devices, ref.tensor_parallel) == (
        "wse-3",
        "llama-3.1-70b",
        d.devices,
        1,
    )
    assert ref.build() == d


@pytest.mark.parametrize("data", [{"model": "m"}, [1], {"hardware": "h", "colour": 1}])
def test_a_bad_ref_is_a_disaggregation_error(data):
    with pytest.raises(DisaggregationError, match="bad deployment from the prefill worker"):
        DeploymentRef.from_dict(data)
