"""The ready file's model card names expert parallelism: what `--ep` spread a MoE model's
experts over, beside tensor and pipeline parallelism."""

from __future__ import annotations

import json

from memorywall.core import load_hardware, load_model
from memorywall.core.deployment import plan_deployment
from memorywall.ready import ServerReady
from memorywall.server.app import card_ready
from memorywall.server.engine.build import build_core
from memorywall.server.engine.scheduler import EngineConfig


def _ready(**deployment: object) -> ServerReady:
    d = plan_deployment(load_hardware("gb200-nvl72"), load_model("gpt-oss-120b"), **deployment)
    _, card = build_core(d, EngineConfig(max_num_seqs=4, max_num_batched_tokens=256))
    return card_ready(
        card, pid=1, host="127.0.0.1", tls=False, grpc_port=1, http_port=None, metrics_port=None
    )


def test_expert_parallel_is_on_the_card_and_in_the_file():
    ready = _ready(expert_parallel=8)
    assert (ready.expert_parallel, ready.tensor_parallel, ready.devices) == (8, 8, 8)
    assert "EP8" in ready.deployment
    doc = json.loads(json.dumps(ready.as_dict()))
    assert doc["expert_parallel"] == 8
    assert ServerReady.from_dict(doc) == ready


def test_without_expert_parallel_the_card_says_one():
    ready = _ready(devices=8)
    assert ready.expert_parallel == 1 and ready.tensor_parallel == 8
    assert "EP" not in ready.deployment


def test_a_ready_file_written_before_the_field_still_reads():
    doc = _ready(expert_parallel=8).as_dict()
    del doc["expert_parallel"]
    assert ServerReady.from_dict(doc).expert_parallel == 1
