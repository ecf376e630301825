"""A prefill worker holds a request's KV until its transfer has landed.

The engine frees a finished request's blocks at once, and the prefill half's
one-token request finishes with its prefill; but until the KV has crossed the
link those blocks are still being read. `pin_prompt`, called as the request
finishes (before the engine plans another step, so nothing else has taken them),
takes them back: the prompt's cached full blocks by their hashes, so they stay
findable for prefix reuse, and fresh blocks for the rest. `KvPin.release` gives
them up when the KV has landed; cached ones then wait in the prefix cache as any
finished request's do.

It reaches into the engine core's block pool, which only the offline split fleet
(`cosim`) holds; the live prefill worker needs the engine hook described in
docs/disaggregation.md ("Prefill-side KV") to do the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from memorywall.server.engine.kv import BlockPool, blocks_for
from memorywall.server.engine.scheduler import EngineCore, Sequence


@dataclass(frozen=True, slots=True)
class KvPin:
    """Blocks held for a transfer, one reference each."""

    pool: BlockPool
    block_ids: list[int]

    def release(self) -> None:
        self.pool.release(self.block_ids)


def pin_prompt(core: EngineCore, seq: Sequence) -> KvPin:
    """Take back the prompt blocks `seq` held, right after `core` finished it."""
    pool, size = core.pool, core.config.block_size
    hits = []
    if core.config.enable_prefix_caching:
        hits = pool.lookup(seq.block_hashes, seq.prompt_len // size)
    pool.touch(hits)
    # The blocks it released are free now, so these fit (a block of its prefix that another
    # request also held was never freed, and needs none).
    rest = min(blocks_for(seq.prompt_len, size) - len(hits), pool.free_blocks)
    return KvPin(pool, hits + (pool.allocate(rest) or []))
