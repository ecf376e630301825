"""Model shapes read from unmodified Hugging Face `config.json` files.

Counts are in parameters and values; bytes come later, from the deployment's
precisions. Handles dense and GQA attention, MoE (routed + shared experts,
dense-first and interleaved layouts), MLA latent KV (DeepSeek) and
sliding-window or chunked local-attention layers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from memorywall.errors import ConfigError, NotFoundError

_ZOO = resources.files("memorywall.core") / "models"


@dataclass(frozen=True, kw_only=True)
class MLA:
    """Multi-head latent attention: the cache holds one latent vector per token and layer."""

    kv_lora_rank: int
    q_lora_rank: int | None
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True, kw_only=True)
class MoE:
    n_experts: int
    experts_per_token: int
    expert_intermediate: int
    n_shared_experts: int
    shared_intermediate: int


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """The sizes that set a transformer's bytes and FLOPs."""

    name: str
    n_layers: int
    hidden_size: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    dense_intermediate: int
    n_moe_layers: int
    moe: MoE | None
    mla: MLA | None
    n_window_layers: int
    window_tokens: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers

    @property
    def n_full_layers(self) -> int:
        return self.n_layers - self.n_window_layers

    def attention_params_per_layer(self) -> int:
        h, nq = self.hidden_size, self.n_heads
        if self.mla is None:
            return h * nq * self.head_dim * 2 + 2 * h * self.n_kv_heads * self.head_dim
        m = self.mla
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        q = h * m.q_lora_rank + m.q_lora_rank * nq * qk if m.q_lora_rank else h * nq * qk
        kv = h * (m.kv_lora_rank + m.qk_rope_head_dim)
        kv += m.kv_lora_rank * nq * (m.qk_nope_head_dim + m.v_head_dim)
        return q + kv + nq * m.v_head_dim * h

    def expert_params(self) -> int:
        """One routed expert's gate, up and down projections."""
        return 3 * self.hidden_size * self.moe.expert_intermediate if self.moe else 0

    def always_read_params(self) -> int:
        """Parameters every decode step reads whatever the routing: all but routed experts.

        Includes the LM head (read every step); excludes the embedding table
        (a lookup of a few rows).
        """
        h = self.hidden_size
        per_layer = self.attention_params_per_layer() + 2 * h
        total = self.n_layers * per_layer + self.n_dense_layers * 3 * h * self.dense_intermediate
        if self.moe:
            m = self.moe
            router = h * m.n_experts
            shared = m.n_shared_experts * 3 * h * m.shared_intermediate
            total += self.n_moe_layers * (router + shared)
        return total + self.vocab_size * h + h

    def total_params(self) -> int:
        """Every stored parameter, embedding table included (tied or not, stored once per use)."""
        experts = self.n_moe_layers * self.moe.n_experts * self.expert_params() if self.moe else 0
        return self.always_read_params() + experts + self.vocab_size * self.hidden_size

    def active_params_per_token(self) -> int:
        """Parameters one token multiplies through (sets FLOPs)."""
        routed = (
            self.n_moe_layers * self.moe.experts_per_token * self.expert_params() if self.moe else 0
        )
        return self.always_read_params() + routed

    def kv_values_per_token_per_layer(self) -> int:
        """Cached values per token per layer: K and V heads, or MLA's latent plus rope key."""
        if self.mla:
            return self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
        return 2 * self.n_kv_heads * self.head_dim

    def attention_flops_per_pair(self) -> int:
        """FLOPs per (query token, attended token) per layer: QK^T and PV, 2 FLOPs per MAC.

        MLA uses the absorbed form decode kernels run: scores over the latent
        plus rope key, values over the latent.
        """
        if self.mla:
            return 2 * self.n_heads * (2 * self.mla.kv_lora_rank + self.mla.qk_rope_head_dim)
        return 4 * self.n_heads * self.head_dim


def builtin_models() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in _ZOO.iterdir() if p.name.endswith(".json"))


def load_model(name_or_path: str) -> ModelShape:
    """A zoo model by name, or any Hugging Face `config.json` (or its folder) by path."""
    builtin = _ZOO / f"{name_or_path}.json"
    if builtin.is_file():
        return model_from_config(json.loads(builtin.read_text()), name=name_or_path)
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        valid = ", ".join(builtin_models())
        raise NotFoundError(
            f"unknown model {name_or_path!r} (built in: {valid}; or a config.json path)"
        )
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return model_from_config(config, name=path.parent.name or path.stem, origin=str(path))


def model_from_config(config: dict[str, Any], *, name: str, origin: str = "") -> ModelShape:
    """Build a shape from a config dict; multimodal configs use their `text_config`."""
    where = origin or name
    c = config.get("text_config", config)
    if not isinstance(c, dict):
        raise ConfigError(f"{where}: text_config: expected an object")

    def num(key: str, default: int | None = None) -> int:
        value = c.get(key, default)
        if value is None:
            raise ConfigError(f"{where}: {key}: missing")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{where}: {key}: expected a positive integer, got {value!r}")
        return value

    n_layers = num("num_hidden_layers")
    hidden = num("hidden_size")
    n_heads = num("num_attention_heads")
    n_kv = num("num_key_value_heads", n_heads)
    head_dim = num("head_dim", hidden // n_heads)
    if n_heads % n_kv:
        raise ConfigError(f"{where}: num_key_value_heads: {n_kv} does not divide {n_heads} heads")

    mla = None
    if "kv_lora_rank" in c:
        q_lora = c.get("q_lora_rank")
        mla = MLA(
            kv_lora_rank=num("kv_lora_rank"),
            q_lora_rank=num("q_lora_rank") if q_lora is not None else None,
            qk_rope_head_dim=num("qk_rope_head_dim"),
            qk_nope_head_dim=num("qk_nope_head_dim"),
            v_head_dim=num("v_head_dim"),
        )

    moe, n_moe_layers = _moe(c, num, n_layers)
    n_window, window = _windows(c, num, n_layers, where)
    eos = c.get("eos_token_id", config.get("eos_token_id"))
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    dense_intermediate = (
        num("intermediate_size_mlp") if "intermediate_size_mlp" in c else num("intermediate_size")
    )
    return ModelShape(
        name=name,
        n_layers=n_layers,
        hidden_size=hidden,
        n_heads=n_heads,
        n_kv_heads=1 if mla else n_kv,
        head_dim=head_dim,
        vocab_size=num("vocab_size"),
        max_context=num("max_position_embeddings"),
        dense_intermediate=dense_intermediate,
        n_moe_layers=n_moe_layers,
        moe=moe,
        mla=mla,
        n_window_layers=n_window,
        window_tokens=window,
        eos_token_ids=eos_ids,
    )


def _moe(c: dict[str, Any], num, n_layers: int) -> tuple[MoE | None, int]:
    """Routed experts and how many layers have them, across the HF naming variants."""
    key = next(
        (k for k in ("n_routed_experts", "num_local_experts", "num_experts") if k in c), None
    )
    if key is None or not c.get(key):
        return None, 0
    n_experts = num(key)
    top_k = num("num_experts_per_tok") if "num_experts_per_tok" in c else num("experts_per_token")
    expert_inter = (
        num("moe_intermediate_size") if "moe_intermediate_size" in c else num("intermediate_size")
    )
    n_shared = c.get("n_shared_experts")
    if n_shared is None and "intermediate_size_mlp" in c:
        n_shared = 1  # Llama 4: one shared expert beside the routed ones in every MoE layer
    n_shared = int(n_shared or 0)

    if "first_k_dense_replace" in c:  # DeepSeek: dense first, then MoE every moe_layer_freq
        first = int(c["first_k_dense_replace"])
        freq = int(c.get("moe_layer_freq", 1))
        moe_layers = sum(1 for i in range(first, n_layers) if i % freq == 0)
    elif "interleave_moe_layer_step" in c:  # Llama 4: every step-th layer
        step = num("interleave_moe_layer_step")
        moe_layers = sum(1 for i in range(n_layers) if (i + 1) % step == 0)
    else:  # Qwen3-MoE: every decoder_sparse_step-th layer not listed as MLP-only
        step = int(c.get("decoder_sparse_step", 1))
        mlp_only = set(c.get("mlp_only_layers") or ())
        moe_layers = sum(1 for i in range(n_layers) if i not in mlp_only and (i + 1) % step == 0)
    if top_k > n_experts:
        raise ConfigError(f"num_experts_per_tok: {top_k} exceeds {n_experts} experts")
    moe = MoE(
        n_experts=n_experts,
        experts_per_token=top_k,
        expert_intermediate=expert_inter,
        n_shared_experts=n_shared,
        shared_intermediate=expert_inter,
    )
    return moe, moe_layers


def _windows(c: dict[str, Any], num, n_layers: int, where: str) -> tuple[int, int | None]:
    """How many layers attend over a bounded window, and the window in tokens."""
    types = c.get("layer_types")
    if isinstance(types, list) and types:
        if len(types) != n_layers:
            raise ConfigError(f"{where}: layer_types: {len(types)} entries for {n_layers} layers")
        local = sum(1 for t in types if t in ("sliding_attention", "chunked_attention"))
        if local:
            key = "sliding_window" if "sliding_window" in c else "attention_chunk_size"
            return local, num(key)
        return 0, None
    if c.get("attention_chunk_size"):  # Llama 4 without layer_types: no_rope_layers marks chunked
        flags = c.get("no_rope_layers") or [int((i + 1) % 4 != 0) for i in range(n_layers)]
        return sum(1 for f in flags if f), num("attention_chunk_size")
    if c.get("use_sliding_window") and c.get("sliding_window"):
        return n_layers, num("sliding_window")
    return 0, None
