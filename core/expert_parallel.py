"""Expert parallelism (EP): a MoE layer's routed experts spread whole over the `ep` devices
of a stage's tensor-parallel group, inside one scale-up domain.

The layout modelled (Megatron's sequence-parallel MoE, DeepSeek's EP dispatch):
attention stays tensor parallel, its output reduce-scattered so that each of the `ep`
devices owns T/ep of the step's T tokens. Each device sends its tokens' k routed copies to
the devices holding those experts (the dispatch all-to-all) and gets the experts' outputs
back (the combine all-to-all). The two all-to-alls take the place of the all-reduce a
tensor-parallel MoE block pays; the attention's all-reduce stays.

Uniform routing: a token's copy lands on any device with probability 1/ep, so the share
(ep - 1)/ep of it leaves its device. Per device, per all-to-all:

    bytes = T / ep * k * hidden * ACTIVATION_BYTES * (ep - 1) / ep
    time  = link latency + bytes / link bandwidth (per direction)

Weights: each device holds n_experts / ep whole experts (capacity: the same bytes per
device as tensor-parallel experts); a decode step reads the experts its batch's tokens hit,
in expectation `distinct_experts(E, k, T) / ep` of them per device. Load imbalance (the
busiest device, not the mean) is not modelled.
"""

from __future__ import annotations

from dataclasses import dataclass

from memorywall.core.deployment import ACTIVATION_BYTES
from memorywall.core.hardware import Link
from memorywall.core.model import ModelShape
from memorywall.core.work import Number


def distinct_experts(n_experts: int, top_k: int, tokens: Number) -> Number:
    """E * (1 - (1 - k/E)^T): expected experts a layer touches when T tokens each pick k of E."""
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


@dataclass(frozen=True, kw_only=True)
class ExpertParallel:
    """The all-to-all and weight-read terms of one deployment's MoE layers under EP."""

    ep: int
    n_experts: int
    experts_per_token: int
    hidden_size: int
    n_moe_layers: int
    link: Link  # the scale-up link each device sends over

    @classmethod
    def of(cls, model: ModelShape, ep: int, link: Link) -> ExpertParallel:
        assert model.moe is not None, "check_expert_parallel refuses EP on a dense model"
        return cls(
            ep=ep,
            n_experts=model.moe.n_experts,
            experts_per_token=model.moe.experts_per_token,
            hidden_size=model.hidden_size,
            n_moe_layers=model.n_moe_layers,
            link=link,
        )

    @property
    def experts_per_device(self) -> int:
        return self.n_experts // self.ep

    def experts_read_per_device(self, tokens: Number) -> Number:
        """Expected distinct experts one device reads in a layer for a step of `tokens`."""
        return distinct_experts(self.n_experts, self.experts_per_token, tokens) / self.ep

    def all_to_all_bytes_per_device(self, tokens: Number) -> Number:
        """Bytes one device sends in one all-to-all (dispatch or combine) of one layer."""
        ep = self.ep
        return (tokens / ep * self.experts_per_token * self.hidden_size * ACTIVATION_BYTES) * (
            (ep - 1) / ep
        )

    def all_to_all_s(self, tokens: Number) -> Number:
        """Seconds of one all-to-all: the link's latency plus one device's bytes over it."""
        return self.link.latency_s + (
            self.all_to_all_bytes_per_device(tokens) / self.link.bandwidth_bytes_per_s
        )

    def comm_s(self, tokens: Number) -> Number:
        """Dispatch and combine of every MoE layer."""
        return 2 * self.n_moe_layers * self.all_to_all_s(tokens)

    def link_bytes(self, tokens: Number) -> Number:
        """Bytes on the scale-up links, all devices, every MoE layer's dispatch and combine."""
        return 2 * self.n_moe_layers * self.ep * self.all_to_all_bytes_per_device(tokens)
