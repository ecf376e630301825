"""Every published serving result, predicted in its own metric (per-user tok/s, ITL,
TTFT, aggregate tok/s, tok/s per device) from `calibration/published.toml`.

`benchmarks/published_table.py` prints the table; rows with `fit = true` are the
wafer fit's own data and come out at ~0% by construction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from memorywall.core.calibration import ErrorTable, load_published
from memorywall.core.cost import StepModel
from memorywall.core.deployment import Deployment, Speculative, plan_deployment
from memorywall.core.hardware import ExecutionMode, Hardware, load_hardware
from memorywall.core.model import ModelShape, load_model
from memorywall.core.precision import Precision
from memorywall.core.predict import predict
from memorywall.core.work import Batch, PrefillChunk


@dataclass(frozen=True)
class PublishedComparison:
    """One published number against the core's prediction of it, in the row's own metric."""

    label: str
    table_row: str
    metric: str
    published: float
    predicted: float
    how: str
    fit: bool

    @property
    def error(self) -> float:
        """Signed relative error of the prediction."""
        return self.predicted / self.published - 1.0


def fused_activation_bytes_per_hidden(model: ModelShape, tp: int) -> float:
    """Bytes per token per layer, per unit of hidden size, that a serving stack with fused
    elementwise kernels moves outside GEMMs and attention (bf16 activations):

        2 fused residual-add + RMSNorm kernels, each reading x and the residual and
        writing both: 2 x 4 x 2h; SiLU-and-multiply reading 2f and writing f: 3 x 2f;
        rotary embedding in place on q and k: 2 x 2 (q + k); f, q, k per device.

    A count of the kernels vLLM and TensorRT-LLM run (fused_add_rms_norm, silu_and_mul,
    rotary_embedding), not a fit; the unfused PyTorch layers the H100 fit was measured on
    move about four times as much (gpu-fit's `activation_bytes_per_hidden`).
    """
    h = model.hidden_size
    q, k = model.n_heads * model.head_dim, model.n_kv_heads * model.head_dim
    f = model.dense_intermediate
    return (16 * h + (6 * f + 4 * (q + k)) / tp) / h


def fused_stack(hardware: Hardware, model: ModelShape, tp: int) -> Hardware:
    """A compiled serving stack: fused elementwise kernels, and no host launch floor (its
    steps are CUDA graphs or launched from C++, not op by op from Python)."""
    kernels = replace(
        hardware.kernels, activation_bytes_per_hidden=fused_activation_bytes_per_hidden(model, tp)
    )
    return replace(
        hardware,
        kernels=kernels,
        latency=replace(hardware.latency, launch_per_layer_s=0.0),
        execution=ExecutionMode.GRAPHS,
    )


def published_deployment(row: dict) -> Deployment:
    """The row's deployment. Its device count is the source's (or a stated assumption), not
    chosen, so no KV reserve is demanded beyond the weights fitting. Rows with
    `kernels = "fused"` run on a compiled stack (`fused_stack`)."""
    spec = row.get("speculative")
    d = _plan(row, load_hardware(row["hardware"]), spec)
    if row.get("kernels") == "fused":
        d = _plan(row, fused_stack(d.hardware, d.model, d.tensor_parallel), spec)
    return d


def _plan(row: dict, hardware: Hardware, spec: dict | None) -> Deployment:
    return plan_deployment(
        hardware,
        load_model(row["model"]),
        devices=row["devices"],
        weight_precision=Precision.parse(row["weight_precision"], field="weight_precision"),
        kv_precision=Precision.parse(row.get("kv_precision", "bf16"), field="kv_precision"),
        speculative=Speculative(
            draft_tokens=spec["draft_tokens"],
            acceptance_rate=spec["acceptance_rate"],
            draft_model=load_model(spec["draft_model"]),
        )
        if spec
        else None,
        kv_reserve_fraction=0.0,
    )


def decode_context(row: dict) -> int:
    """Cached tokens an average decode step reads: `context`, else prompt + output / 2."""
    return row["context"] if "context" in row else row["prompt"] + row["output"] // 2


def _prefill_s(d: Deployment, prompt: int, n: int = 1) -> float:
    """One step that prefills `n` whole prompts (a token budget only splits it into chunks)."""
    return StepModel(d).step_cost(Batch(prefill=(PrefillChunk(prompt),) * n)).time_s


def _decode_step_s(d: Deployment, batch: int, context: int) -> float:
    """Seconds per decode step of `batch` sequences at `context`, per emitted token of each."""
    if batch * (context + 1) <= d.kv_capacity_tokens:
        p = predict(d, batch=batch, context=context)
        return p.decode_step_s / p.tokens_per_decode_step
    sm = StepModel(d)  # over KV capacity: the step's cost still, and the note says so
    return (
        sm.step_cost(Batch(decode_contexts=(context,) * batch)).time_s / sm.tokens_per_decode_step
    )


def _spec_note(d: Deployment) -> str:
    s = d.speculative
    if s is None:
        return ""
    draft = s.draft_model.name if s.draft_model else "no draft model"
    return (
        f"; speculative: {draft} drafts k={s.draft_tokens}, acceptance {s.acceptance_rate:g}, "
        f"{s.expected_tokens_per_step:.2f} tokens per step"
    )


def _capacity_note(d: Deployment, batch: int, tokens: int) -> str:
    cap = d.kv_capacity_tokens
    if batch * tokens <= cap:
        return ""
    return f"; KV holds {cap:,} tokens, only {cap // tokens} such sequences at once"


def _per_user(row: dict, d: Deployment) -> tuple[float, str]:
    """tok/s of one stream = tokens per decode step / decode step time (batch 1)."""
    ctx = decode_context(row)
    step = _decode_step_s(d, 1, ctx)
    how = f"1 / decode step, batch 1, context {ctx}{_spec_note(d)}"
    if d.speculative is not None:
        how += _speculative_bounds(row, d, ctx)
    return 1.0 / step, how


def _speculative_bounds(row: dict, d: Deployment, ctx: int) -> str:
    """What reaching the published speed would take: tokens per target step if drafting
    were free, and the most the assumed draft gives at acceptance 1 (k up to 16)."""
    target = StepModel(replace(d, speculative=None))
    one = target.step_cost(Batch(decode_contexts=(ctx,))).time_s
    needed = row["value"] * one
    assert d.speculative is not None, "only rows that speculate"
    best = 0.0
    for k in range(1, 17):
        perfect = replace(d.speculative, draft_tokens=k, acceptance_rate=1.0)
        sm = StepModel(replace(d, speculative=perfect))
        step = sm.step_cost(Batch(decode_contexts=(ctx,))).time_s
        best = max(best, sm.tokens_per_decode_step / step)
    return (
        f"; to publish {row['value']:,} tok/s the target must emit {needed:.1f} tokens "
        f"per {one * 1e3:.2f} ms step even with free drafting, and this draft at "
        f"acceptance 1 peaks at {best:,.0f} tok/s"
    )


def _itl(row: dict, d: Deployment) -> tuple[float, str]:
    """ITL = decode step time / tokens per step, batch = concurrency."""
    ctx, batch = decode_context(row), row["concurrency"]
    how = f"decode step, batch {batch}, context {ctx}{_spec_note(d)}"
    return _decode_step_s(d, batch, ctx), how + _capacity_note(d, batch, ctx + 1)


def _ttft(row: dict, d: Deployment) -> tuple[float, str]:
    """TTFT = prefill(prompt); at concurrency n, the mean wait of a burst of n prompts
    prefilled one after another, (n + 1) / 2 x prefill(prompt). No network, no queue else."""
    n, prompt = row["concurrency"], row["prompt"]
    prefill = predict(d, batch=1, context=prompt, prompt=prompt).ttft_s
    assert prefill is not None, "a prediction given a prompt has a prefill"
    if n == 1:
        return prefill, f"prefill of {prompt} tokens (published adds network)"
    return (n + 1) / 2 * prefill, f"burst of {n} prompts: ({n}+1)/2 x prefill({prompt})"


def max_batch(row: dict, d: Deployment) -> int:
    """Largest batch whose full sequences fit the KV cache, capped at the row's `max_batch`."""
    return min(row["max_batch"], d.kv_capacity_tokens // (row["prompt"] + row["output"]))


def _aggregate(row: dict, d: Deployment) -> tuple[float, str]:
    """Output tok/s = B x O / (prefill of B prompts + O x decode step(B, P + O / 2)).

    One request cycle of the whole batch: its B prompts prefilled, then O decode
    steps. B = concurrency, or `max_batch` for max-throughput rows. At B = 1 this is
    the definition behind NIM's aggregate, O / (TTFT + O x ITL).
    """
    prompt, output = row["prompt"], row["output"]
    batch = row["concurrency"] if "concurrency" in row else max_batch(row, d)
    ctx = decode_context(row)
    step = _decode_step_s(d, batch, ctx)
    prefill = _prefill_s(d, prompt, batch)
    how = f"B x O / (prefill(B x {prompt}) + O x step), B = {batch}, O = {output}, context {ctx}"
    if "concurrency" not in row:
        how += f" (B = min({row['max_batch']}, KV {d.kv_capacity_tokens:,} // {prompt + output}))"
    share = prefill / (prefill + output * step)
    how += f"; prefill {share:.0%} of the cycle"
    return batch * output / (prefill + output * step), how + _capacity_note(d, batch, ctx + 1)


def _per_device(row: dict, d: Deployment) -> tuple[float, str]:
    """Aggregate output tok/s over the row's devices."""
    total, how = _aggregate(row, d)
    return total / d.devices, f"aggregate / {d.devices} devices: {how}"


# How each metric is predicted: one function per kind, each returning (value, how).
PREDICTORS = {
    "tokens_per_s_per_user": _per_user,
    "itl_s": _itl,
    "ttft_s": _ttft,
    "aggregate_tokens_per_s": _aggregate,
    "tokens_per_s_per_device": _per_device,
}


def published_comparison(row: dict) -> PublishedComparison:
    """Predict one published row in its own metric (see `PREDICTORS`)."""
    value, how = PREDICTORS[row["metric"]](row, published_deployment(row))
    if row["fit"]:
        how = f"fit row (sets wse-fit's per-layer latency): ~0% by construction; {how}"
    return PublishedComparison(
        label=row["label"],
        table_row=row["table_row"],
        metric=row["metric"],
        published=float(row["value"]),
        predicted=value,
        how=how,
        fit=row["fit"],
    )


def published_comparisons(
    rows: list[dict] | None = None,
) -> ErrorTable[PublishedComparison]:
    """Every published row against the core's prediction, in file order."""
    rows = load_published() if rows is None else rows
    return ErrorTable("Published rows", tuple(published_comparison(r) for r in rows))
