"""Wiring a deployment from the core into an engine, and what the engine tells clients about it."""

from __future__ import annotations

from dataclasses import dataclass

from memorywall.core import Deployment, StepModel, predict
from memorywall.server.engine.lora import LoraSlots
from memorywall.server.engine.scheduler import EngineConfig, EngineCore, ModelLimits

PREDICTION_CONTEXT = 1024


@dataclass(frozen=True, kw_only=True)
class ModelCard:
    model: str
    context_window: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    hardware: str
    devices: int
    tensor_parallel: int
    pipeline_parallel: int
    weight_precision: str
    kv_precision: str
    placement: str
    deployment: str
    kv_capacity_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    predicted_tokens_per_s_per_user: float
    expert_parallel: int = 1  # devices a MoE layer's experts spread over; 1: none


def build_core(
    deployment: Deployment, config: EngineConfig, *, max_loras: int | None = None
) -> tuple[EngineCore, ModelCard]:
    """The engine core for `deployment`; `max_loras`: serve LoRA adapters, at most this
    many in a batch (`lora.LoraSlots`); None: LoRA off."""
    m = deployment.model
    spec = deployment.speculative
    limits = ModelLimits(
        kv_capacity_tokens=deployment.kv_capacity_tokens,
        max_context=m.max_context,
        vocab_size=m.vocab_size,
        eos_token_ids=frozenset(m.eos_token_ids),
        draft_tokens=spec.draft_tokens if spec else 0,
        acceptance_rate=spec.acceptance_rate if spec else 0.0,
    )
    lora = LoraSlots.for_deployment(deployment, max_loras) if max_loras is not None else None
    core = EngineCore(StepModel(deployment), limits, config, lora)
    context = min(PREDICTION_CONTEXT, m.max_context - 1)
    card = ModelCard(
        model=m.name,
        context_window=m.max_context,
        vocab_size=m.vocab_size,
        eos_token_ids=m.eos_token_ids,
        hardware=deployment.hardware.name,
        devices=deployment.devices,
        tensor_parallel=deployment.tensor_parallel,
        pipeline_parallel=deployment.pipeline_parallel,
        expert_parallel=deployment.expert_parallel,
        weight_precision=deployment.weight_precision.value,
        kv_precision=deployment.kv_precision.value,
        placement=deployment.placement.value,
        deployment=deployment.describe(),
        kv_capacity_tokens=core.kv.capacity_tokens,
        max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=config.max_num_batched_tokens,
        predicted_tokens_per_s_per_user=predict(deployment, context=context).tokens_per_s_per_user,
    )
    return core, card
