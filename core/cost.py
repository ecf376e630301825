"""Step cost: the time, bound, bytes, FLOPs and energy of one engine step on a deployment.

A step is a sequence of kernels; each kernel is as slow as the slower of its
memory traffic and its compute, plus the share of the faster one it fails to
hide (`overlap`). Kernels run one after another, so their times add:

    gpu    = fixed (per layer, plus a reduction pass per split-K GEMM)
             + sum over weight GEMMs of combine(weight bytes, wave-quantised FLOPs)
             + combine(decode KV bytes at the bandwidth its streams reach, decode FLOPs)
             + combine(the chunks' KV bytes, the chunks' attention FLOPs)
             + activation bytes (norms, rotary, activation function, residuals)
             + interconnect
    time   = max(gpu, n_layers x launch_per_layer)  for steps the stack launches op by op
             (the profile's `ExecutionMode`); gpu for steps replayed from graphs

A step that mixes decoding sequences with prefill chunks reads the weights once
for all its tokens: its GEMMs run on the step's total token count (tiles and
waves included), while decode attention and each chunk's attention are their
own kernels over their own KV.

Each term is a small formula below or in `gemm.py`; `StepModel` composes them
once for the engine (scalars, microseconds a call) and for numpy sweeps (arrays).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum

import numpy as np

from memorywall.core.deployment import ACTIVATION_BYTES, Deployment, Placement
from memorywall.core.expert_parallel import ExpertParallel, distinct_experts
from memorywall.core.gemm import Gemm, Tiling, gemm_compute_s, split_k_gemms, weight_gemms
from memorywall.core.hardware import ExecutionMode
from memorywall.core.work import Batch, Number, Work

_PJ = 1e-12
_BITS = 8.0


class Bound(Enum):
    """The term a step's time is mostly made of."""

    MEMORY = "memory"
    COMPUTE = "compute"
    LATENCY = "latency"
    INTERCONNECT = "interconnect"


_BOUNDS = (Bound.MEMORY, Bound.COMPUTE, Bound.LATENCY, Bound.INTERCONNECT)
_GEMM_MEMO = 4096  # (tokens, logits) pairs remembered; cleared when full


@dataclass(frozen=True, slots=True)
class StepCost:
    """One step, broken down. Seconds, bytes, FLOPs and joules; totals over all devices."""

    time_s: float
    bound: Bound
    memory_s: float  # resident-memory traffic (weights in SRAM/HBM, KV cache)
    stream_s: float  # weights streamed from external memory over the I/O link
    compute_s: float
    latency_s: float  # per-step and per-layer floors
    comm_s: float  # tensor-parallel all-reduces and pipeline hops
    weight_bytes: float
    kv_bytes: float
    link_bytes: float
    flops: float
    attention_flops: float
    energy_j: float
    tokens: float


@dataclass(frozen=True, slots=True)
class SweepCost:
    """`StepCost` fields as arrays over a grid; `bound` holds indices into `Bound`."""

    time_s: np.ndarray
    bound: np.ndarray
    memory_s: np.ndarray
    stream_s: np.ndarray
    compute_s: np.ndarray
    latency_s: np.ndarray
    comm_s: np.ndarray
    energy_j: np.ndarray
    tokens: np.ndarray

    def bound_names(self) -> np.ndarray:
        return np.array([b.value for b in _BOUNDS])[self.bound]


def allreduce_bytes_per_device(tp: int, values: Number) -> Number:
    """Ring all-reduce: each device sends 2 (tp-1)/tp of the buffer."""
    return 2.0 * (tp - 1) / tp * values * ACTIVATION_BYTES


def combine_s(
    latency_s: Number, memory_s: Number, compute_s: Number, overlap: float, comm_s: Number
) -> Number:
    """latency + max(memory, compute) + overlap * min(memory, compute) + comm.

    Memory and compute overlap imperfectly in real kernels; `overlap` is the
    fitted share of the shorter one that still shows.
    """
    busy: Number
    hidden: Number
    if isinstance(memory_s, float) and isinstance(compute_s, float):
        busy, hidden = max(memory_s, compute_s), min(memory_s, compute_s)
    else:
        busy, hidden = np.maximum(memory_s, compute_s), np.minimum(memory_s, compute_s)
    return latency_s + busy + overlap * hidden + comm_s


def link_time_s(bytes_: Number, bandwidth_bytes_per_s: float, latency_s: float) -> Number:
    """Latency plus size over bandwidth."""
    return latency_s + bytes_ / bandwidth_bytes_per_s


class StepModel:
    """Step costs for one deployment; constants are folded in once, at construction."""

    def __init__(self, deployment: Deployment) -> None:
        d = deployment
        self.deployment = d
        hw, m = d.hardware, d.model
        eff, lat = hw.efficiency, hw.latency
        spec = d.speculative
        self.queries_per_decode = spec.draft_tokens + 1 if spec else 1
        self.tokens_per_decode_step = spec.expected_tokens_per_step if spec else 1.0
        self._draft = (
            StepModel(_draft_deployment(d)) if spec and spec.draft_model is not None else None
        )
        self._draft_steps = spec.draft_tokens if spec else 0

        wb = d.weight_precision.bytes_per_value
        kvb = d.kv_precision.bytes_per_value
        self._tp, self._pp = d.tensor_parallel, d.pipeline_parallel
        self._kv_shards = d.kv_shards
        self._always_bytes = m.always_read_params() * wb
        self._expert_bytes = m.expert_params() * wb
        self._n_moe = m.n_moe_layers
        self._moe = m.moe
        # Expert parallelism: the MoE block's all-reduce becomes dispatch and combine.
        self._ep = (
            ExpertParallel.of(m, d.expert_parallel, hw.scale_up) if d.expert_parallel > 1 else None
        )
        self._kv_layer_bytes = m.kv_values_per_token_per_layer() * kvb
        self._n_full, self._n_window, self._n_layers = (
            m.n_full_layers,
            m.n_window_layers,
            m.n_layers,
        )
        self._hidden = m.hidden_size
        lm_head = m.vocab_size * m.hidden_size
        self._body_flops_per_token = 2.0 * (m.active_params_per_token() - lm_head)
        self._head_flops_per_logit = 2.0 * lm_head
        self._attn_flops_per_pair = float(m.attention_flops_per_pair())

        res = hw.resident
        self._weight_bw = res.bandwidth_bytes_per_s * eff.weight_read
        self._kv_bw = res.bandwidth_bytes_per_s * eff.kv_read
        self._streamed = d.placement is Placement.STREAM
        if self._streamed:
            store = hw.stream
            assert store is not None, "plan_deployment refuses STREAM without a weight store"
            self._stream_bw = min(store.bandwidth_bytes_per_s, hw.external_io.bandwidth_bytes_per_s)
            self._stream_pj = store.energy_pj_per_bit + hw.external_io.energy_pj_per_bit
        gemm_bw = self._stream_bw if self._streamed else self._weight_bw
        peak = hw.compute_peak(d.weight_precision)
        self._linear_flops_per_s = peak * eff.compute
        self._attn_flops_per_s = peak * eff.attention
        self._overlap = eff.overlap

        # Weight GEMMs: (gemm, seconds to read its weights on one device).
        self._gemms = tuple((g, g.params * wb / gemm_bw) for g in weight_gemms(m, self._tp))
        self._tiling = (
            Tiling(units=par.units, tile_m=par.gemm_tile_m, tile_n=par.gemm_tile_n)
            if (par := hw.parallelism) is not None
            else None
        )
        self._unit_flops_per_s = self._linear_flops_per_s / par.units if par else 0.0
        self._expert_flops_per_token = (
            2.0 * m.expert_params() * (m.moe.experts_per_token if m.moe else 0)
        )
        # Decode attention streams per sequence on one device (KV heads, or MLA's query heads).
        self._streams_per_seq = max(1, (m.n_heads if m.mla else m.n_kv_heads) // self._tp)
        self._kv_stream_bw = hw.kernels.kv_stream_bytes_per_s
        self._split_k_s = hw.kernels.split_k_s
        # Non-GEMM kernels: activation bytes per token, plus the norm weights, at streaming speed.
        self._act_bytes_per_token = (
            hw.kernels.activation_bytes_per_hidden * m.hidden_size * m.n_layers
        )
        gemm_params = sum(g.params for g, _ in self._gemms) * self._tp
        self._small_weight_bytes = max(0.0, m.always_read_params() - gemm_params) * wb
        self._act_bw = res.bandwidth_bytes_per_s * eff.weight_read

        self._latency_s = lat.per_step_s + m.n_layers * (
            lat.per_layer_s + m.hidden_size * lat.per_layer_per_hidden_s
        )
        self._launch_s = m.n_layers * lat.launch_per_layer_s
        self._execution = hw.execution
        self._scale_up = hw.scale_up
        self._io = hw.external_io
        self._resident_pj = res.energy_pj_per_bit
        self._static_w = hw.static_w * d.devices
        self._gemm_memo: dict[tuple[float, float], tuple[Number, ...]] = {}

    def step_cost(self, batch: Batch) -> StepCost:
        """Cost of one engine step (the engine's hot path)."""
        return self.cost(Work.of_batch(batch, self.deployment.model, self.queries_per_decode))

    def decode_run(self, contexts: list[int], steps: int) -> tuple[np.ndarray, np.ndarray]:
        """Time (s) and energy (J) of each of `steps` decode steps in a row over sequences
        with cached `contexts`, each step's one token longer (no speculation): equal, bit
        for bit, to `step_cost` of each step's batch. The offline engine's fast path.
        """
        if self.queries_per_decode != 1:
            raise ValueError("decode_run: with speculation a step's tokens vary")
        t = self._terms(Work.decode_run(contexts, steps, self.deployment.model))
        shape = (steps,)
        return np.broadcast_to(t["time_s"], shape), np.broadcast_to(t["energy_j"], shape)

    def bytes_by_tier(self, cost: StepCost) -> dict[str, float]:
        """Bytes a step moves through each memory tier and link, by the profile's names."""
        hw = self.deployment.hardware
        resident = cost.kv_bytes + (0.0 if self._streamed else cost.weight_bytes)
        tiers = {hw.resident.name: resident}
        if self._streamed:
            assert hw.stream is not None, "plan_deployment refuses STREAM without a weight store"
            tiers[hw.stream.name] = cost.weight_bytes
        tiers["links"] = cost.link_bytes
        return tiers

    def cost(self, work: Work) -> StepCost:
        t = self._terms(work)
        parts = (t["memory_s"], t["compute_s"], t["latency_s"], t["stream_s"] + t["comm_s"])
        bound = _BOUNDS[max(range(4), key=parts.__getitem__)]
        return StepCost(bound=bound, **{k: float(v) for k, v in t.items()})

    def decode_sweep(self, batch: np.ndarray, context: np.ndarray) -> SweepCost:
        """Decode steps for every (batch, context) pair of two broadcastable arrays."""
        work = Work.uniform_decode(batch, context, self.deployment.model, self.queries_per_decode)
        terms = self._terms(work)
        t = {k: np.broadcast_to(v, np.shape(terms["time_s"])) for k, v in terms.items()}
        parts = np.stack(
            [t["memory_s"], t["compute_s"], t["latency_s"], t["stream_s"] + t["comm_s"]]
        )
        keep = (
            "time_s",
            "memory_s",
            "stream_s",
            "compute_s",
            "latency_s",
            "comm_s",
            "energy_j",
            "tokens",
        )
        return SweepCost(bound=parts.argmax(axis=0), **{k: t[k] for k in keep})

    def _terms(self, w: Work) -> dict[str, Number]:
        tp = self._tp
        weight_bytes: Number = self._always_bytes
        expert_mem_s: Number = 0.0 * w.tokens
        expert_comp_s: Number = 0.0 * w.tokens
        if self._moe is not None:
            experts = distinct_experts(self._moe.n_experts, self._moe.experts_per_token, w.tokens)
            routed_bytes = self._n_moe * experts * self._expert_bytes
            weight_bytes = weight_bytes + routed_bytes
            expert_bw = self._stream_bw if self._streamed else self._weight_bw
            if self._ep is None:
                expert_mem_s = routed_bytes / tp / expert_bw
            else:  # whole experts: those the tokens hit among the device's own
                per_device = self._ep.experts_read_per_device(w.tokens)
                expert_mem_s = self._n_moe * per_device * self._expert_bytes / expert_bw
            expert_comp_s = (
                self._n_moe
                * self._expert_flops_per_token
                * w.tokens
                / tp
                / self._linear_flops_per_s
            )

        gemm_mem_s, gemm_comp_s, gemm_s, split_s = self._dense_gemms(w.tokens, w.logits)
        gemm_mem_s = gemm_mem_s + expert_mem_s
        gemm_comp_s = gemm_comp_s + expert_comp_s
        gemm_s = gemm_s + combine_s(0.0, expert_mem_s, expert_comp_s, self._overlap, 0.0)

        layer_kv = self._kv_layer_bytes
        decode_kv = layer_kv * (
            self._n_full * w.decode_read_full + self._n_window * w.decode_read_window
        )
        kv_read = layer_kv * (self._n_full * w.kv_read_full + self._n_window * w.kv_read_window)
        kv_bytes = kv_read + layer_kv * self._n_layers * w.tokens
        decode_written = layer_kv * self._n_layers * self.queries_per_decode * w.decode_seqs
        attn_flops = self._attn_flops_per_pair * (
            self._n_full * w.pairs_full + self._n_window * w.pairs_window
        )
        decode_flops = self._attn_flops_per_pair * (
            self._n_full * w.decode_pairs_full + self._n_window * w.decode_pairs_window
        )
        # Decode attention and the chunks' attention are separate kernels, each over its own
        # KV: the decode streams' reads do not hide behind a chunk's attention compute.
        decode_kv_s = (
            decode_kv / self._decode_kv_bw(w.decode_seqs) + decode_written / self._kv_bw
        ) / self._kv_shards
        chunk_kv_s = (kv_bytes - decode_kv - decode_written) / self._kv_shards / self._kv_bw
        kv_s = decode_kv_s + chunk_kv_s
        decode_comp_s = decode_flops / tp / self._attn_flops_per_s
        chunk_comp_s = (attn_flops - decode_flops) / tp / self._attn_flops_per_s
        attn_comp_s = decode_comp_s + chunk_comp_s
        attn_s = combine_s(0.0, decode_kv_s, decode_comp_s, self._overlap, 0.0) + combine_s(
            0.0, chunk_kv_s, chunk_comp_s, self._overlap, 0.0
        )

        small_bw = self._stream_bw if self._streamed else self._act_bw
        small_s = self._small_weight_bytes / tp / small_bw  # norm weights
        act_s = self._act_bytes_per_token * w.tokens / self._act_bw + small_s

        hidden_values = w.tokens * self._hidden
        comm_s = 0.0 * hidden_values
        link_bytes = 0.0 * hidden_values
        if tp > 1:
            per_device = allreduce_bytes_per_device(tp, hidden_values)
            # Two all-reduces a layer (attention, MLP); under EP a MoE layer's second is
            # its dispatch and combine all-to-alls instead.
            reduces = 2 * self._n_layers - (self._n_moe if self._ep is not None else 0)
            comm_s = comm_s + reduces * link_time_s(
                per_device, self._scale_up.bandwidth_bytes_per_s, self._scale_up.latency_s
            )
            scale_up_bytes = reduces * per_device * tp
            link_bytes = link_bytes + scale_up_bytes
            if self._ep is not None:
                comm_s = comm_s + self._ep.comm_s(w.tokens)
                link_bytes = link_bytes + self._ep.link_bytes(w.tokens)
        if self._pp > 1:
            hop_bytes = hidden_values * ACTIVATION_BYTES
            comm_s = comm_s + (self._pp - 1) * link_time_s(
                hop_bytes, self._io.bandwidth_bytes_per_s, self._io.latency_s
            )
            link_bytes = link_bytes + (self._pp - 1) * hop_bytes

        busy_s = gemm_s + attn_s + act_s + comm_s
        gpu_s = self._latency_s + split_s + busy_s
        time_s = self._launch_floor(gpu_s, w)

        latency_s = time_s - busy_s
        linear_flops = self._body_flops_per_token * w.tokens + self._head_flops_per_logit * w.logits
        energy_j = self._energy_j(weight_bytes, kv_bytes, link_bytes, time_s, tp)
        if self._draft is not None:
            draft = self._draft._terms(_draft_work(w))
            steps = self._draft_steps * (w.decode_seqs > 0)  # nothing to draft in a prefill step
            time_s = time_s + steps * draft["time_s"]
            energy_j = energy_j + steps * draft["energy_j"]

        if self._streamed:
            memory_s, stream_s = kv_s + act_s - small_s, gemm_mem_s + small_s
        else:
            memory_s, stream_s = gemm_mem_s + kv_s + act_s, 0.0 * kv_s
        return {
            "time_s": time_s,
            "memory_s": memory_s,
            "stream_s": stream_s,
            "compute_s": gemm_comp_s + attn_comp_s,
            "latency_s": latency_s,
            "comm_s": comm_s,
            "weight_bytes": weight_bytes + 0.0 * time_s,
            "kv_bytes": kv_bytes,
            "link_bytes": link_bytes,
            "flops": linear_flops + attn_flops,
            "attention_flops": attn_flops,
            "energy_j": energy_j,
            "tokens": w.tokens,
        }

    def _launch_floor(self, gpu_s: Number, w: Work) -> Number:
        """max(gpu, n_layers x launch_per_layer) for the steps the execution mode launches op
        by op (`ExecutionMode.launches_eagerly`); gpu for steps replayed from graphs."""
        if self._execution is ExecutionMode.GRAPHS or not self._launch_s:
            return gpu_s
        has_prefill = w.tokens > self.queries_per_decode * w.decode_seqs
        if isinstance(has_prefill, bool | np.bool_):
            if not self._execution.launches_eagerly(bool(has_prefill)):
                return gpu_s
            if isinstance(gpu_s, float):
                return max(gpu_s, self._launch_s)
            return np.maximum(gpu_s, self._launch_s)  # a decode run or sweep, all eager
        if self._execution is ExecutionMode.EAGER:
            return np.maximum(gpu_s, self._launch_s)
        return np.where(has_prefill, np.maximum(gpu_s, self._launch_s), gpu_s)

    def _dense_gemms(self, tokens: Number, logits: Number) -> tuple[Number, ...]:
        """The dense GEMMs' memory, compute and combined seconds, and split-K reduction
        seconds. They depend on the step's token and logit counts alone, which repeat from
        step to step: a step's are remembered (the engine's hot path), not recomputed."""
        # Exactly float (not numpy's float64): arrays and numpy scalars are not remembered.
        key = (tokens, logits) if type(tokens) is float and type(logits) is float else None
        if key is not None and (hit := self._gemm_memo.get(key)) is not None:
            return hit
        gemm_mem_s, gemm_comp_s, gemm_s = 0.0, 0.0 * tokens, 0.0 * tokens
        split_s = 0.0 * tokens  # reduction passes of split-K GEMMs: fixed kernel time
        for g, mem_s in self._gemms:
            rows = logits if g.head else tokens
            comp_s = self._gemm_compute_s(rows, g)
            if self._tiling is not None and self._split_k_s:
                split_s = split_s + self._split_k_s * split_k_gemms(rows, g, self._tiling)
            gemm_mem_s = gemm_mem_s + mem_s
            gemm_comp_s = gemm_comp_s + comp_s
            gemm_s = gemm_s + combine_s(0.0, mem_s, comp_s, self._overlap, 0.0)
        terms = (gemm_mem_s, gemm_comp_s, gemm_s, split_s)
        if key is not None:
            if len(self._gemm_memo) >= _GEMM_MEMO:
                self._gemm_memo.clear()
            self._gemm_memo[key] = terms
        return terms

    def _gemm_compute_s(self, rows: Number, g: Gemm) -> Number:
        """Wave-quantised on a GPU; plain FLOPs over the usable peak on a dataflow device."""
        if self._tiling is not None:
            return gemm_compute_s(rows, g, self._tiling, self._unit_flops_per_s)
        return 2.0 * g.params * rows / self._linear_flops_per_s

    def _decode_kv_bw(self, decode_seqs: Number) -> Number:
        """Bandwidth decode attention reaches: full, or streams x per-stream where too few
        streams (sequences x KV heads on a device) run to fill a GPU."""
        if self._tiling is None:
            return self._kv_bw
        streams = self._streams_per_seq * decode_seqs
        if isinstance(streams, float | int):
            return min(self._kv_bw, max(streams, 1.0) * self._kv_stream_bw)
        return np.minimum(self._kv_bw, np.maximum(streams, 1.0) * self._kv_stream_bw)

    def _energy_j(
        self, weight_bytes: Number, kv_bytes: Number, link_bytes: Number, time_s: Number, tp: int
    ) -> Number:
        """Bytes x pJ/bit per tier and link, plus static power x time."""
        resident_bytes = kv_bytes + (0.0 if self._streamed else weight_bytes)
        dynamic_pj = resident_bytes * _BITS * self._resident_pj
        if self._streamed:
            dynamic_pj = dynamic_pj + weight_bytes * _BITS * self._stream_pj
        link_pj = self._scale_up.energy_pj_per_bit if tp > 1 else self._io.energy_pj_per_bit
        dynamic_pj = dynamic_pj + link_bytes * _BITS * link_pj
        return dynamic_pj * _PJ + self._static_w * time_s


def _draft_deployment(d: Deployment) -> Deployment:
    """The draft model on the target's devices: same layout, no speculation of its own."""
    spec = d.speculative
    assert spec is not None and spec.draft_model is not None, "only a drafting deployment"
    return replace(d, model=spec.draft_model, speculative=None, expert_parallel=1)


def _draft_work(w: Work) -> Work:
    """One draft step: each decoding sequence proposes one token over its context, a
    decode-only step (replayed as one; decode attention over the sequences' streams).

    Prefill chunks are not drafted (the draft model's own prefill is not modelled).
    """
    pairs_full = w.decode_read_full + w.decode_seqs
    pairs_window = w.decode_read_window + w.decode_seqs
    return Work(
        tokens=w.decode_seqs,
        logits=w.decode_seqs,
        kv_read_full=w.decode_read_full,
        kv_read_window=w.decode_read_window,
        pairs_full=pairs_full,
        pairs_window=pairs_window,
        decode_seqs=w.decode_seqs,
        decode_read_full=w.decode_read_full,
        decode_read_window=w.decode_read_window,
        decode_pairs_full=pairs_full,
        decode_pairs_window=pairs_window,
    )
