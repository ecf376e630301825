"""Synthetic prompt token ids, a function of (salt, request) only.

A request's own tokens come from a generator seeded by (salt, request index); a
shared-prefix group's first tokens from one seeded by (salt, group). The OpenAI
targets send these ids (completions) and the offline simulator feeds them to the
engine, so a shared-prefix workload hits the prefix cache the same way in both.
"""

from __future__ import annotations

import numpy as np

from memorywall.loadgen.records import RequestSpec

TOKEN_ID_LOW = 1000
TOKEN_ID_HIGH = 30000  # fits every common vocabulary


def prompt_rng(salt: int, index: int) -> np.random.Generator:
    """One request's prompt generator: a function of (salt, index) only."""
    return np.random.default_rng([salt, int(index < 0), abs(index)])


def prefix_rng(salt: int, group: int) -> np.random.Generator:
    """A shared-prefix group's generator: a function of (salt, group) only, apart from
    every request's own `prompt_rng`."""
    return np.random.default_rng([salt, 2, abs(int(group))])


def prompt_token_ids(n: int, rng: np.random.Generator) -> list[int]:
    return rng.integers(TOKEN_ID_LOW, TOKEN_ID_HIGH, size=n).tolist()


def shared_tokens(spec: RequestSpec) -> int:
    """How many of the prompt's first tokens its prefix group shares (0: no group)."""
    if spec.prefix_group is None:
        return 0
    return min(spec.prefix_tokens, spec.prompt_tokens)


def spec_token_ids(spec: RequestSpec, salt: int) -> list[int]:
    """All `spec.prompt_tokens` ids: the group's shared prefix, then the request's own."""
    shared = shared_tokens(spec)
    prefix = prompt_token_ids(shared, prefix_rng(salt, spec.prefix_group or 0)) if shared else []
    return prefix + prompt_token_ids(spec.prompt_tokens - shared, prompt_rng(salt, spec.index))
