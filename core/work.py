"""What one engine step asks of the model, reduced to the sums its cost depends on.

A step's cost depends on its sequences only through a handful of totals
(tokens, cached tokens read, attention pairs), so the engine's batch and a
numpy sweep over (batch, context) grids both reduce to the same `Work`, and
one cost formula serves both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from memorywall.core.model import ModelShape

Number = float | np.ndarray


@dataclass(frozen=True, slots=True)
class PrefillChunk:
    """`new_tokens` of one prompt processed this step, after `cached_tokens` already in KV."""

    new_tokens: int
    cached_tokens: int = 0
    last: bool = True  # the chunk that ends the prompt, so it needs the LM head


@dataclass(frozen=True, slots=True)
class Batch:
    """One engine step: decoding sequences (by cached context length) plus prefill chunks."""

    decode_contexts: Sequence[int] = ()
    prefill: Sequence[PrefillChunk] = ()


@dataclass(frozen=True, slots=True)
class Work:
    """Totals for one step; each field a float, or an array for a sweep."""

    tokens: Number  # query tokens through every layer
    logits: Number  # tokens that need the LM head
    kv_read_full: Number  # cached tokens read, summed over sequences, full-attention layers
    kv_read_window: Number  # the same for windowed layers (capped at the window)
    pairs_full: Number  # (query, attended token) pairs, full-attention layers
    pairs_window: Number  # the same for windowed layers
    # The decoding sequences alone: what a speculative draft model runs over, and what
    # decode attention (its own kernels, beside the chunks' attention) costs.
    decode_seqs: Number = 0.0
    decode_read_full: Number = 0.0
    decode_read_window: Number = 0.0
    decode_pairs_full: Number = 0.0
    decode_pairs_window: Number = 0.0

    @staticmethod
    def of_batch(batch: Batch, model: ModelShape, queries_per_decode: int = 1) -> Work:
        """Sum a batch; each decoding sequence runs `queries_per_decode` tokens (speculation)."""
        window = model.window_tokens
        q = queries_per_decode
        n_decode = len(batch.decode_contexts)
        ctx_sum = sum(batch.decode_contexts)
        tokens = q * n_decode
        logits = tokens
        # A decode query attends its cached context plus the queries up to itself.
        own = q * (q + 1) // 2
        pairs_full = q * ctx_sum + own * n_decode
        if window:
            read_window = sum(min(c, window) for c in batch.decode_contexts)
            if q == 1:
                pairs_window = sum(min(c + 1, window) for c in batch.decode_contexts)
            else:
                pairs_window = sum(_window_pairs(c, q, window) for c in batch.decode_contexts)
        else:
            read_window = pairs_window = 0
        read_full = ctx_sum
        decode_read_window = read_window
        decode_pairs_full, decode_pairs_window = pairs_full, pairs_window
        for chunk in batch.prefill:
            n, c = chunk.new_tokens, chunk.cached_tokens
            tokens += n
            logits += 1 if chunk.last else 0
            read_full += c
            pairs_full += n * c + n * (n + 1) // 2
            if window:
                read_window += min(c, window)
                pairs_window += _window_pairs(c, n, window)
        return Work(
            tokens=float(tokens),
            logits=float(logits),
            kv_read_full=float(read_full),
            kv_read_window=float(read_window),
            pairs_full=float(pairs_full),
            pairs_window=float(pairs_window),
            decode_seqs=float(n_decode),
            decode_read_full=float(ctx_sum),
            decode_read_window=float(decode_read_window),
            decode_pairs_full=float(decode_pairs_full),
            decode_pairs_window=float(decode_pairs_window),
        )

    @staticmethod
    def decode_run(contexts: Sequence[int], steps: int, model: ModelShape) -> Work:
        """`steps` decode steps in a row of the sequences with cached `contexts`, each step's
        contexts one longer than the last's (one query per sequence, no speculation).

        Fields are arrays over the steps, except those that stay the same (floats); each
        step's values equal `of_batch` of its batch exactly, so costs agree bit for bit.
        """
        n = len(contexts)
        j = np.arange(steps, dtype=np.int64)
        ctx = np.asarray(contexts, dtype=np.int64)
        ctx_sum = (int(ctx.sum()) + n * j).astype(np.float64)
        window = model.window_tokens
        if window:
            grid = ctx[None, :] + j[:, None]
            read_window = np.minimum(grid, window).sum(axis=1).astype(np.float64)
            pairs_window = np.minimum(grid + 1, window).sum(axis=1).astype(np.float64)
        else:
            read_window = pairs_window = np.zeros(steps)
        return Work(
            tokens=float(n),
            logits=float(n),
            kv_read_full=ctx_sum,
            kv_read_window=read_window,
            pairs_full=ctx_sum + float(n),
            pairs_window=pairs_window,
            decode_seqs=float(n),
            decode_read_full=ctx_sum,
            decode_read_window=read_window,
            decode_pairs_full=ctx_sum + float(n),
            decode_pairs_window=pairs_window,
        )

    @staticmethod
    def uniform_decode(
        batch: np.ndarray, context: np.ndarray, model: ModelShape, queries_per_decode: int = 1
    ) -> Work:
        """`batch` sequences each decoding over `context` cached tokens (arrays broadcast)."""
        b = np.asarray(batch, dtype=np.float64)
        c = np.asarray(context, dtype=np.float64)
        q = queries_per_decode
        own = q * (q + 1) / 2
        w = model.window_tokens
        cw = np.minimum(c, w) if w else 0.0 * c
        pairs_full = b * (q * c + own)
        pairs_window = b * _window_pairs_array(c, q, w) if w else 0.0 * b * c
        return Work(
            tokens=q * b,
            logits=q * b,
            kv_read_full=b * c,
            kv_read_window=b * cw,
            pairs_full=pairs_full,
            pairs_window=pairs_window,
            decode_seqs=b,
            decode_read_full=b * c,
            decode_read_window=b * cw,
            decode_pairs_full=pairs_full,
            decode_pairs_window=pairs_window,
        )


def _window_pairs(cached: int, n: int, window: int) -> int:
    """sum over x in (cached+1 .. cached+n) of min(x, window): pairs of n queries under a window."""
    lo, hi = cached + 1, cached + n
    if hi <= window:
        return (lo + hi) * n // 2
    if lo > window:
        return n * window
    return (lo + window) * (window - lo + 1) // 2 + (hi - window) * window


def _window_pairs_array(cached: np.ndarray, n: int, window: int) -> np.ndarray:
    """`_window_pairs` for an array of cached lengths and a small n (speculation width)."""
    steps = np.arange(1, n + 1, dtype=np.float64)
    return np.minimum(cached[..., None] + steps, window).sum(axis=-1)
