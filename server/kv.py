"""KV cache accounting in fixed-size blocks, as paged-attention engines allocate it."""

from __future__ import annotations

from dataclasses import dataclass


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


@dataclass
class BlockPool:
    """A count of free blocks; sequences hold whole blocks."""

    total_blocks: int
    block_size: int
    free_blocks: int = -1

    def __post_init__(self) -> None:
        if self.free_blocks < 0:
            self.free_blocks = self.total_blocks

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self.free_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.total_blocks * self.block_size

    def try_allocate(self, blocks: int) -> bool:
        if blocks > self.free_blocks:
            return False
        self.free_blocks -= blocks
        return True

    def release(self, blocks: int) -> None:
        self.free_blocks += blocks
        if self.free_blocks > self.total_blocks:
            raise AssertionError("released more KV blocks than were allocated")
