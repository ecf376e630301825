"""The weight GEMMs of a layer stack, and how long a GPU takes to compute one.

A GPU computes a GEMM's output in tiles of `tile_m` rows (tokens) by
`tile_n` columns, one tile per streaming multiprocessor (SM) at a time, so
the time goes in whole waves of tiles (wave quantisation):

    row tiles = max(rows / tile_m, 1)      (a remainder of rows costs its fill)
    tiles = row tiles x ceil(n / tile_n)
    tiles >= SMs:  ceil(tiles / SMs) waves, each one tile's work
    tiles <  SMs:  one wave; the library splits K over floor(SMs / tiles) slices

    tile work = 2 x tile_m x tile_n x k FLOPs at (peak x compute efficiency) / SMs

Padding a tile costs as much as filling it when a GEMM has fewer rows than one
tile (a decode batch). Rows beyond whole tiles are not padded to another full
tile: the library covers the remainder with narrower tiles (Hopper's wgmma
takes the token side in steps of 8), so 16 decode rows beside a 512-token chunk
cost their share, not a 25% jump (`h100-llama8b-mixed-steps.json`: 16 decoding
sequences add 2.2-2.3 ms to chunks of 256, 512 and 2048 alike). Splitting K is
what cuBLAS and CUTLASS do when a GEMM has too few tiles to fill the chip, and a
split GEMM then runs a reduction pass over its partial sums (`split_k_gemms`
counts them; the profile's `split_k_s` prices one). A one-row GEMM is a
matrix-vector product and does not split. Routed MoE experts
are not tiled here (their per-expert row counts vary); they use the plain
FLOP count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from memorywall.core.model import ModelShape
from memorywall.core.work import Number


@dataclass(frozen=True, slots=True)
class Gemm:
    """`count` GEMMs (one per layer) of k x n weights on each device."""

    name: str
    k: int
    n: int
    count: int
    head: bool = False  # the LM head: its rows are the step's logits, not its tokens

    @property
    def params(self) -> int:
        return self.k * self.n * self.count


@dataclass(frozen=True, slots=True)
class Tiling:
    """How a GPU spreads a GEMM: SM count and output tile shape."""

    units: int
    tile_m: int
    tile_n: int


def weight_gemms(model: ModelShape, tp: int) -> tuple[Gemm, ...]:
    """Every weight GEMM of one decode or prefill pass, per device under tensor parallelism.

    Column-parallel projections (QKV, gate/up) split n, row-parallel ones (O,
    down) split k; the MoE router is replicated. MLA's projections are taken
    as one GEMM of k = hidden.
    """
    h, nl = model.hidden_size, model.n_layers
    out: list[Gemm] = []
    if model.mla is None:
        q_cols = model.n_heads * model.head_dim
        kv_cols = 2 * model.n_kv_heads * model.head_dim
        out.append(Gemm("qkv", h, _split(q_cols + kv_cols, tp), nl))
        out.append(Gemm("o", _split(q_cols, tp), h, nl))
    else:
        out.append(Gemm("attention", h, _split(model.attention_params_per_layer() // h, tp), nl))
    if model.n_dense_layers:
        f = model.dense_intermediate
        out.append(Gemm("gate_up", h, _split(2 * f, tp), model.n_dense_layers))
        out.append(Gemm("down", _split(f, tp), h, model.n_dense_layers))
    if model.moe is not None:
        m = model.moe
        out.append(Gemm("router", h, m.n_experts, model.n_moe_layers))
        if m.n_shared_experts:
            f = m.n_shared_experts * m.shared_intermediate
            out.append(Gemm("shared_gate_up", h, _split(2 * f, tp), model.n_moe_layers))
            out.append(Gemm("shared_down", _split(f, tp), h, model.n_moe_layers))
    out.append(Gemm("lm_head", h, _split(model.vocab_size, tp), 1, head=True))
    return tuple(out)


def _split(n: int, tp: int) -> int:
    return max(1, -(-n // tp))


def gemm_compute_s(rows: Number, gemm: Gemm, tiling: Tiling, unit_flops_per_s: float) -> Number:
    """Wave-quantised compute time of `gemm.count` GEMMs of `rows` x k x n (module docstring).

    `unit_flops_per_s` is one SM's share of the usable peak. Zero rows take no time.
    """
    n_tiles = -(-gemm.n // tiling.tile_n)
    tile_s = 2.0 * tiling.tile_m * tiling.tile_n * gemm.k / unit_flops_per_s * gemm.count
    u = tiling.units
    if isinstance(rows, float | int):
        if rows <= 0:
            return 0.0
        tiles = row_tiles(rows, tiling) * n_tiles
        waves = math.ceil(tiles / u) if tiles >= u else 1.0 / (u // tiles)
        return waves * tile_s
    tile_counts = row_tiles(np.asarray(rows, dtype=np.float64), tiling) * n_tiles
    safe = np.maximum(tile_counts, 1.0)
    slices = np.maximum(np.floor(u / safe), 1.0)  # K slices when tiles < u
    wave_counts = np.where(tile_counts >= u, np.ceil(safe / u), 1.0 / slices)
    return np.where(tile_counts > 0, wave_counts * tile_s, 0.0)


def row_tiles(rows: Number, tiling: Tiling) -> Number:
    """Row tiles of a GEMM of `rows` rows: none for no rows, at least one (padded), else the
    rows at their fill (module docstring)."""
    if isinstance(rows, float | int):
        return max(rows / tiling.tile_m, 1.0) if rows > 0 else 0.0
    return np.where(rows > 0, np.maximum(rows / tiling.tile_m, 1.0), 0.0)


def split_k_gemms(rows: Number, gemm: Gemm, tiling: Tiling) -> Number:
    """How many of `gemm.count` GEMMs split K (at most half as many tiles as SMs, so at
    least two slices), and so run a reduction pass after the GEMM; one row is a
    matrix-vector product, which does not split."""
    n_tiles = -(-gemm.n // tiling.tile_n)
    if isinstance(rows, float | int):
        split = rows > 1 and 2 * row_tiles(rows, tiling) * n_tiles <= tiling.units
        return float(gemm.count) if split else 0.0
    r = np.asarray(rows, dtype=np.float64)
    splits = (r > 1) & (2 * row_tiles(r, tiling) * n_tiles <= tiling.units)
    return np.where(splits, float(gemm.count), 0.0)
