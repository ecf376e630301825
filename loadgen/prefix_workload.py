"""A shared-prefix workload: `groups` groups of requests whose prompts begin alike.

Every request belongs to one group; the prompts of a group share their first
`prefix_tokens` tokens and differ after them (the OpenAI targets build the prefix from
(salt, group) and the rest from (salt, request index); see `openai_target.payload`).
Groups are dealt round-robin and then shuffled with the injected generator, so the
requests interleave across groups and every group gets n/groups requests (+-1).

Draw order (part of the determinism contract): the shuffle of group ids, then all `n`
prompt lengths, then all `n` output lengths. A drawn prompt length is raised to
`prefix_tokens + 1` when shorter, so every prompt has at least one token of its own.

CLI: `memorywall bench --workload shared-prefix:GROUPS:PREFIX_TOKENS --input-len N ...`;
`--input-len` is the whole prompt (prefix included).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from memorywall.loadgen.records import RequestSpec
from memorywall.loadgen.workload import Length, check_count, is_int

__all__ = ["SCHEME", "SharedPrefixWorkload", "parse_shared_prefix"]

SCHEME = "shared-prefix"


@dataclass(frozen=True, slots=True)
class SharedPrefixWorkload:
    """`groups` prefix groups of `prefix_tokens` tokens; lengths as `SyntheticWorkload`."""

    groups: int
    prefix_tokens: int
    input: Length
    output: Length

    def __post_init__(self) -> None:
        if not is_int(self.groups) or self.groups < 1:
            raise ValueError(f"shared prefix: groups must be an integer >= 1, got {self.groups!r}")
        if not is_int(self.prefix_tokens) or self.prefix_tokens < 1:
            raise ValueError(
                f"shared prefix: prefix_tokens must be an integer >= 1, got {self.prefix_tokens!r}"
            )

    def specs(self, rng: np.random.Generator, n: int) -> list[RequestSpec]:
        n = check_count(n)
        groups = rng.permutation(np.arange(n) % self.groups)
        prompts = np.maximum(self.input.sample(rng, n), self.prefix_tokens + 1)
        outputs = self.output.sample(rng, n)
        return [
            RequestSpec(
                index=i,
                prompt_tokens=int(p),
                output_tokens=int(o),
                prefix_group=int(g),
                prefix_tokens=self.prefix_tokens,
            )
            for i, (g, p, o) in enumerate(zip(groups, prompts, outputs, strict=True))
        ]

    def __str__(self) -> str:
        return f"{SCHEME}:{self.groups}:{self.prefix_tokens}"


def parse_shared_prefix(text: str, input: Length, output: Length) -> SharedPrefixWorkload:
    """Parse 'shared-prefix:GROUPS:PREFIX_TOKENS'; a one-line ValueError otherwise."""
    parts = text.strip().split(":")
    if len(parts) != 3 or parts[0].lower() != SCHEME:
        raise ValueError(f"bad workload {text!r}: expected '{SCHEME}:<groups>:<prefix_tokens>'")
    try:
        groups, prefix = int(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(
            f"bad workload {text!r}: groups and prefix_tokens must be integers"
        ) from None
    try:
        return SharedPrefixWorkload(groups, prefix, input, output)
    except ValueError as e:
        raise ValueError(f"bad workload {text!r}: {e}") from None
