"""LoRA in the engine: adapter folders, the registry, and the batch rule on a virtual clock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memorywall.core import StepModel, load_hardware, load_model, plan_deployment
from memorywall.core.lora import LoraCost
from memorywall.core.work import Batch, PrefillChunk
from memorywall.errors import ConfigError
from memorywall.server.engine.build import build_core
from memorywall.server.engine.kv import hash_root
from memorywall.server.engine.lora import (
    LoraConfig,
    LoraError,
    LoraRegistry,
    parse_module,
    read_adapter,
)
from memorywall.server.engine.offline import OfflineEngine
from memorywall.server.engine.scheduler import EngineConfig, Request

MODEL = load_model("llama-3.1-8b")
DEPLOYMENT = plan_deployment(load_hardware("h100-sxm"), MODEL)


def write_adapter(folder: Path, rank: int = 16, modules: object = ("q_proj", "v_proj")) -> str:
    """A PEFT adapter folder as `peft` saves one (the weights file is not read)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 32, "target_modules": modules}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


def test_read_adapter_and_errors(tmp_path):
    a = read_adapter("sql", write_adapter(tmp_path / "sql"), MODEL, 16, lora_id=1)
    assert (a.rank, a.target_modules) == (16, ("q_proj", "v_proj"))
    assert a.params == 16 * (8192 + 5120) * 32
    with pytest.raises(LoraError, match="No adapter found for"):
        read_adapter("x", str(tmp_path / "missing"), MODEL, 16, 2)
    with pytest.raises(LoraError, match=r"LoRA rank 32 is greater than max_lora_rank 16\."):
        read_adapter("x", write_adapter(tmp_path / "big", rank=32), MODEL, 16, 2)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{")
    with pytest.raises(LoraError, match="not valid JSON"):
        read_adapter("x", str(tmp_path / "bad"), MODEL, 16, 2)
    with pytest.raises(LoraError, match="embed_tokens not modelled"):
        read_adapter("x", write_adapter(tmp_path / "e", modules=["embed_tokens"]), MODEL, 16, 2)


def test_registry_load_unload(tmp_path):
    path = write_adapter(tmp_path / "a")
    registry = LoraRegistry(LoraConfig(modules=(("a", path),)), MODEL, "llama-3.1-8b")
    assert registry.get("a") is not None
    with pytest.raises(LoraError, match=r"The lora adapter 'a' has already been loaded\."):
        registry.load("a", path)
    with pytest.raises(LoraError, match="already been loaded"):
        registry.load("llama-3.1-8b", path)  # the base model's name
    first = registry.get("a")
    registry.unload("a")
    assert registry.get("a") is None
    with pytest.raises(LoraError, match=r"The lora adapter 'a' cannot be found\."):
        registry.unload("a")
    again = registry.load("a", path)
    assert first is not None and again.lora_id != first.lora_id  # loaded onto devices anew


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="max_lora_rank: expected one of"):
        LoraConfig(max_lora_rank=12)
    with pytest.raises(ConfigError, match="max_loras: must be >= 1"):
        LoraConfig(max_loras=0)
    with pytest.raises(ConfigError, match="expected name=path"):
        parse_module("nopath")
    assert parse_module("a=/x=y") == ("a", "/x=y")
    with pytest.raises(ConfigError, match="--lora-modules: Loading lora b failed"):
        LoraRegistry(LoraConfig(modules=(("b", str(tmp_path)),)), MODEL, "base")


def _three_adapters(tmp_path, max_loras: int):
    modules = tuple((n, write_adapter(tmp_path / n, rank=8 * (i + 1))) for i, n in enumerate("abc"))
    registry = LoraRegistry(
        LoraConfig(max_loras=3, max_lora_rank=32, modules=modules), MODEL, "base"
    )
    core, _ = build_core(DEPLOYMENT, EngineConfig(), max_loras=max_loras)
    engine = OfflineEngine(core)
    for i in range(6):  # a, b, c, a, b, c: all at once
        adapter = registry.get("abc"[i % 3])
        request = Request(
            request_id=str(i),
            prompt_ids=tuple(range(100 * i + 1, 100 * i + 65)),  # no prefix shared
            max_tokens=8,
            ignore_eos=True,
            lora=adapter,
        )
        engine.submit(request, 0.0)
    engine.run()
    return registry, core, engine


def test_max_loras_one_runs_adapters_one_after_another(tmp_path):
    registry, core, engine = _three_adapters(tmp_path, max_loras=1)
    t = engine.timelines
    spans = {}
    for name, ids in (("a", "03"), ("b", "14"), ("c", "25")):
        firsts = [t[i].first_scheduled_s for i in ids]
        lasts = [t[i].last_token_s for i in ids]
        assert firsts[0] == firsts[1]  # an adapter's requests batch together
        spans[name] = (min(firsts), max(lasts))
    # Each adapter starts once the previous one's requests have all finished.
    assert spans["a"][1] <= spans["b"][0] and spans["b"][1] <= spans["c"][0]
    assert core.lora.loads == 3
    # The first step of b pays b's load: the core's figure, bit for bit.
    b = registry.get("b")
    cost = LoraCost(DEPLOYMENT)
    prefill = StepModel(DEPLOYMENT).step_cost(
        Batch(prefill=[PrefillChunk(64, 0), PrefillChunk(64, 0)])
    )
    kernels = cost.step([(b, 128)]).time_s
    first_b_step = t["1"].group_times_s[0] - t["1"].first_scheduled_s
    assert first_b_step == pytest.approx(prefill.time_s + cost.load_s(b) + kernels, rel=1e-9)
    assert core.lora.load_s == pytest.approx(sum(cost.load_s(registry.get(n)) for n in "abc"))


def test_max_loras_three_batches_them_together(tmp_path):
    _, core, engine = _three_adapters(tmp_path, max_loras=3)
    firsts = {t.first_scheduled_s for t in engine.timelines.values()}
    assert firsts == {0.0}
    assert core.lora.loads == 3


def test_base_requests_pass_a_full_batch(tmp_path):
    """A base-model request never waits for an adapter slot; FCFS otherwise."""
    registry = LoraRegistry(
        LoraConfig(
            modules=(("a", write_adapter(tmp_path / "a")), ("b", write_adapter(tmp_path / "b")))
        ),
        MODEL,
        "base",
    )
    core, _ = build_core(DEPLOYMENT, EngineConfig(), max_loras=1)
    engine = OfflineEngine(core)
    for i, name in enumerate(["a", "b", None, "a"]):
        lora = registry.get(name) if name else None
        request = Request(request_id=str(i), prompt_ids=(1, 2, i), max_tokens=4, lora=lora)
        engine.submit(request, 0.0)
    engine.run()
    t = engine.timelines
    assert t["0"].first_scheduled_s == t["2"].first_scheduled_s == t["3"].first_scheduled_s == 0.0
    assert t["1"].first_scheduled_s >= max(t[i].last_token_s for i in "023")


def test_no_adapter_costs_nothing_extra():
    """LoRA on but no adapter requested: the same steps as LoRA off."""
    runs = []
    for max_loras in (None, 2):
        core, _ = build_core(DEPLOYMENT, EngineConfig(), max_loras=max_loras)
        engine = OfflineEngine(core)
        for i in range(4):
            engine.submit(Request(request_id=str(i), prompt_ids=(5,) * 40, max_tokens=30), i * 1e-3)
        engine.run()
        runs.append({k: v.group_times_s for k, v in engine.timelines.items()})
    assert runs[0] == runs[1]


def test_adapters_do_not_share_prefix_cache_blocks(tmp_path):
    """vLLM keys cached blocks by adapter: one prompt under the base model, then under an
    adapter, then under the adapter again hits 0, 0, then all but the last token."""
    registry = LoraRegistry(
        LoraConfig(modules=(("a", write_adapter(tmp_path / "a")),)), MODEL, "base"
    )
    core, _ = build_core(DEPLOYMENT, EngineConfig(), max_loras=1)
    engine = OfflineEngine(core)
    prompt = tuple(range(1, 65))  # four 16-token blocks
    for i, lora in enumerate([None, registry.get("a"), registry.get("a")]):
        request = Request(request_id=str(i), prompt_ids=prompt, max_tokens=2, lora=lora)
        engine.submit(request, i * 1.0)  # each after the last has finished
    engine.run()
    assert [engine.timelines[str(i)].cached_tokens for i in range(3)] == [0, 0, 48]


def test_lora_requests_info_labels_running_and_waiting(tmp_path):
    from prometheus_client import CollectorRegistry, generate_latest

    from memorywall.server.engine.api import lora_state
    from memorywall.server.fronts.openai_lora import LoraInfoMetrics

    registry = LoraRegistry(
        LoraConfig(
            modules=(("a", write_adapter(tmp_path / "a")), ("b", write_adapter(tmp_path / "b")))
        ),
        MODEL,
        "base",
    )
    core, _ = build_core(DEPLOYMENT, EngineConfig(), max_loras=1)
    for i, name in enumerate("aab"):
        core.add(
            Request(request_id=str(i), prompt_ids=(1, 2, i), max_tokens=4, lora=registry.get(name)),
            0.0,
        )
    core.schedule(0.0)  # a's two requests run; b's waits for the slot
    assert lora_state(core) == (["a"], ["b"])
    prometheus = CollectorRegistry()
    prometheus.register(LoraInfoMetrics(1, lambda: lora_state(core)))
    text = generate_latest(prometheus).decode()
    line = next(x for x in text.splitlines() if x.startswith("vllm:lora_requests_info{"))
    assert 'max_lora="1"' in line
    assert 'running_lora_adapters="a"' in line and 'waiting_lora_adapters="b"' in line
    assert float(line.rsplit(" ", 1)[1]) > 1.7e9  # vLLM's value: the time of the scrape


def test_an_adapters_block_hashes_are_the_same_in_every_process():
    """Python salts str hashes per process; an adapter's root (and so its blocks' hashes and
    KV events) must not depend on it."""
    code = "from memorywall.server.engine.kv import hash_root; print(hash_root('sql'))"
    roots = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert roots == {str(hash_root("sql"))}
    assert hash_root("sql") != hash_root("chat") != hash_root(None)
