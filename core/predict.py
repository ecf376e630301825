"""Single-request and steady-batch predictions: what `memorywall predict` reports."""

from __future__ import annotations

from dataclasses import dataclass

from memorywall.core.cost import StepCost, StepModel
from memorywall.core.deployment import Deployment
from memorywall.core.work import Batch, PrefillChunk
from memorywall.errors import CapacityError, ConfigError


@dataclass(frozen=True, kw_only=True)
class Prediction:
    """A decode step of `batch` sequences over `context` cached tokens, and an optional prefill."""

    deployment: Deployment
    batch: int
    context: int
    prompt: int | None
    decode: StepCost
    prefill: StepCost | None
    tokens_per_decode_step: float

    @property
    def decode_step_s(self) -> float:
        return self.decode.time_s

    @property
    def tokens_per_s_per_user(self) -> float:
        return self.tokens_per_decode_step / self.decode.time_s

    @property
    def tokens_per_s_total(self) -> float:
        return self.batch * self.tokens_per_s_per_user

    @property
    def energy_j_per_token(self) -> float:
        return self.decode.energy_j / (self.batch * self.tokens_per_decode_step)

    @property
    def prefill_s(self) -> float | None:
        return self.prefill.time_s if self.prefill else None

    @property
    def ttft_s(self) -> float | None:
        """The first token is sampled at the end of the prefill step, as in vLLM."""
        return self.prefill_s

    def as_dict(self) -> dict[str, object]:
        d = self.deployment
        out: dict[str, object] = {
            "hardware": d.hardware.name,
            "model": d.model.name,
            "devices": d.devices,
            "tensor_parallel": d.tensor_parallel,
            "pipeline_parallel": d.pipeline_parallel,
            "placement": d.placement.value,
            "weight_precision": d.weight_precision.value,
            "kv_precision": d.kv_precision.value,
            "batch": self.batch,
            "context": self.context,
            "decode_step_s": self.decode_step_s,
            "tokens_per_decode_step": self.tokens_per_decode_step,
            "tokens_per_s_per_user": self.tokens_per_s_per_user,
            "tokens_per_s_total": self.tokens_per_s_total,
            "bound": self.decode.bound.value,
            "breakdown_s": {
                "memory": self.decode.memory_s,
                "stream": self.decode.stream_s,
                "compute": self.decode.compute_s,
                "latency": self.decode.latency_s,
                "comm": self.decode.comm_s,
            },
            "energy_j_per_token": self.energy_j_per_token,
            "weight_bytes": d.weight_bytes,
            "kv_capacity_tokens": d.kv_capacity_tokens,
        }
        if self.prompt is not None:
            out |= {"prompt": self.prompt, "prefill_s": self.prefill_s, "ttft_s": self.ttft_s}
        return out


def predict(
    deployment: Deployment, *, batch: int = 1, context: int = 1024, prompt: int | None = None
) -> Prediction:
    """Predict a decode step (and the prefill of `prompt` tokens, if given)."""
    if batch < 1:
        raise ConfigError(f"batch: must be >= 1, got {batch}")
    if context < 0:
        raise ConfigError(f"context: must be >= 0, got {context}")
    if prompt is not None and prompt < 1:
        raise ConfigError(f"prompt: must be >= 1, got {prompt}")
    model = deployment.model
    longest = max(context + 1, prompt or 0)
    if longest > model.max_context:
        raise ConfigError(
            f"context: {longest} tokens exceed {model.name}'s context window of {model.max_context}"
        )
    needed = batch * (context + 1)
    if needed > deployment.kv_capacity_tokens:
        raise CapacityError(
            f"batch {batch} x context {context} needs {needed} KV tokens; "
            f"{deployment.describe()} holds {deployment.kv_capacity_tokens}"
        )
    sm = StepModel(deployment)
    decode = sm.step_cost(Batch(decode_contexts=(context,) * batch))
    prefill = sm.step_cost(Batch(prefill=(PrefillChunk(prompt),))) if prompt else None
    return Prediction(
        deployment=deployment,
        batch=batch,
        context=context,
        prompt=prompt,
        decode=decode,
        prefill=prefill,
        tokens_per_decode_step=sm.tokens_per_decode_step,
    )
