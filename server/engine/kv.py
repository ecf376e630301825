"""KV cache in fixed-size blocks with automatic prefix caching, as vLLM v1 keeps it.

A full block of a sequence's tokens is named by a hash chain: block i's hash
is `hash_block_tokens(hash of block i-1, its token ids)`, so equal hashes mean
equal prefixes. Blocks carry reference counts; a block whose count falls to 0
keeps its hash and waits in an LRU queue, still findable, and is evicted (its
hash dropped) only when a block is needed and no empty block is left. Unlike
vLLM, which keeps one queue, blocks holding nothing (never used, or freed
without a hash) are handed out before any cached block is evicted.

Hashes are Python's `hash` of `(parent_hash, token ids)`, signed 64-bit ints:
tuples of ints hash the same in every process of one Python version (no
`PYTHONHASHSEED` salt applies to ints), so runs are reproducible. It is not
collision resistant; a collision would only let one prompt reuse another's
modelled KV (the cost model), never change tokens.

Observers subscribe to `BlockStored` / `BlockRemoved` events (vLLM's
`kv_events` shapes); with no subscriber no event object is built.

`BlockPool` is the pure-Python reference; `CompiledBlockPool` keeps the same state in C
arrays (`_kernel.c`: the pool, its LRU and hash map, and the hash chain, computing
CPython's tuple hash itself so blocks keep the same names), and `make_block_pool` picks
it when the kernel is built (`kernel.py`). Both give the same blocks, hashes and events.
"""

from __future__ import annotations

import functools
import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, MutableSequence, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

from memorywall.server.engine import kernel

ROOT_HASH = 0x6D656D6F727977  # parent of a sequence's first block

# A sequence's block hashes, extended in place: an array('q') in the engine (a list works).
_Hashes = TypeVar("_Hashes", bound=MutableSequence[int])


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


def hash_block_tokens(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """The hash of a full block given its parent's (None for a sequence's first block)."""
    return hash((ROOT_HASH if parent_hash is None else parent_hash, token_ids))


@functools.lru_cache(maxsize=1024)  # once per adapter name, not a digest per request
def hash_root(lora_name: str | None) -> int:
    """The parent of a sequence's first block: `ROOT_HASH`, or one of its own for a LoRA
    adapter's sequences, whose KV differs from the base model's (vLLM adds the adapter's
    name to each block's hash). From the name's bytes, not `hash(str)`: Python salts string
    hashes per process, and a block's hash must be the same in every process (KV events,
    a router's view of the cache, runs repeated)."""
    if lora_name is None:
        return ROOT_HASH
    digest = hashlib.blake2b(lora_name.encode(), digest_size=8, person=b"memorywall-lora").digest()
    return hash((ROOT_HASH, int.from_bytes(digest, "little", signed=True)))


def extend_block_hashes(
    hashes: _Hashes,
    full_blocks: int,
    block_size: int,
    token_ids: Callable[[int, int], tuple[int, ...]],
    root: int = ROOT_HASH,
) -> _Hashes:
    """`hashes` (a sequence's block hashes so far) extended in place to its first
    `full_blocks` blocks; `token_ids(start, end)` gives the sequence's tokens, `root` the
    first block's parent (`hash_root`)."""
    done = len(hashes)
    if done >= full_blocks:
        return hashes
    # `hash_block_tokens`, inlined: a prompt's blocks are hashed on every admission.
    parent = hashes[-1] if hashes else root
    tokens = iter(token_ids(done * block_size, full_blocks * block_size))
    # zip cuts the blocks in C: a quarter faster than slicing each, the same tuples.
    for block in zip(*[tokens] * block_size, strict=True):
        parent = hash((parent, block))
        hashes.append(parent)
    return hashes


def tokens_of(
    prompt: tuple[int, ...], output: Sequence[int]
) -> Callable[[int, int], tuple[int, ...]]:
    """`token_ids(start, end)` over a sequence's prompt and generated tokens."""
    p = len(prompt)

    def token_ids(start: int, end: int) -> tuple[int, ...]:
        if end <= p:
            return prompt[start:end]
        if start >= p:
            return tuple(output[start - p : end - p])
        return prompt[start:] + tuple(output[: end - p])

    return token_ids


@dataclass
class PrefixCacheStats:
    """Prefix cache lookups, counted once per admission as vLLM counts them: `queries`
    and `hits` are tokens (a sequence's tokens at admission, and those found cached)
    of new requests; re-admissions after preemption count apart. Nothing is
    counted with prefix caching off."""

    requests: int = 0
    queries: int = 0
    hits: int = 0
    preempted_requests: int = 0
    preempted_queries: int = 0
    preempted_hits: int = 0

    @property
    def hit_rate(self) -> float | None:
        """Hits over queries since start (new requests); None before any lookup."""
        return self.hits / self.queries if self.queries else None


@dataclass(frozen=True, slots=True)
class BlockStored:
    """Full blocks entered the cache: consecutive in one sequence, `parent_block_hash`
    (None for a sequence's first block) before the first; `token_ids` are all of their
    tokens, `block_size` per block."""

    block_hashes: tuple[int, ...]
    parent_block_hash: int | None
    token_ids: tuple[int, ...]
    block_size: int


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    """Blocks left the cache (evicted, or dropped by `reset_prefix_cache`)."""

    block_hashes: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    """Every cached block was dropped at once (`BlockPool.reset_prefix_cache`)."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class PoolEvents:
    """KV events for a pool's subscribers (`BlockPool` and `CompiledBlockPool` share them)."""

    block_size: int

    def __init__(self) -> None:
        self._subscribers: list[Callable[[KVEvent], None]] = []

    def subscribe(self, callback: Callable[[KVEvent], None]) -> Callable[[], None]:
        """Call `callback(event)` for each KV event from now on, synchronously on the
        engine's thread (it must not block); returns a function that unsubscribes."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    @property
    def has_subscribers(self) -> bool:
        return bool(self._subscribers)

    def _emit(self, event: KVEvent) -> None:
        for callback in list(self._subscribers):
            callback(event)

    def _emit_stored(
        self,
        block_hashes: Sequence[int],
        stored: list[int],
        token_ids: Callable[[int, int], tuple[int, ...]],
    ) -> None:
        size = self.block_size
        run = [stored[0]]
        for i in [*stored[1:], None]:
            if i is not None and i == run[-1] + 1:
                run.append(i)
                continue
            first, last = run[0], run[-1]
            self._emit(
                BlockStored(
                    block_hashes=tuple(block_hashes[first : last + 1]),
                    parent_block_hash=block_hashes[first - 1] if first else None,
                    token_ids=token_ids(first * size, (last + 1) * size),
                    block_size=size,
                )
            )
            if i is not None:  # None: the end of the list
                run = [i]


class BlockPool(PoolEvents):
    """`total_blocks` blocks of `block_size` tokens, numbered 0..total_blocks-1.

    `used_blocks` counts blocks with a reference, `free_blocks` the rest (empty or
    cached with no reference); the two always sum to `total_blocks`. Block ids
    are created lazily, so a pool of millions of blocks costs nothing up front.
    """

    def __init__(self, total_blocks: int, block_size: int) -> None:
        super().__init__()
        self.total_blocks = total_blocks
        self.block_size = block_size
        self.free_blocks = total_blocks
        self.ref_counts: list[int] = []  # by block id
        self.block_hashes: list[int | None] = []  # by block id; None: holds no cached prefix
        self.cached: dict[int, int] = {}  # block hash -> block id
        self._empty: list[int] = []  # free blocks holding nothing, reused before eviction
        self._lru: OrderedDict[int, None] = OrderedDict()  # free cached blocks, oldest first

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self.free_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.total_blocks * self.block_size

    @property
    def cached_free_blocks(self) -> int:
        """Free blocks that still hold a cached prefix (evictable)."""
        return len(self._lru)

    # allocation

    def allocate(self, n: int) -> array[int] | None:
        """`n` blocks with one reference each, or None (nothing taken) if too few are free.

        Empty blocks go first (the most recently emptied first), then never-used ids, and
        only then are cached blocks evicted, least recently used first.
        """
        if n > self.free_blocks:
            return None
        self.free_blocks -= n
        refs = self.ref_counts
        empty = self._empty
        take = min(n, len(empty))
        ids = empty[: -take - 1 : -1] if take else []
        del empty[len(empty) - take :]
        fresh = min(n - take, self.total_blocks - len(refs))
        if fresh:
            ids += range(len(refs), len(refs) + fresh)
            refs += [0] * fresh
            self.block_hashes += [None] * fresh
        evict = n - take - fresh
        if evict:
            # One comprehension per field rather than one loop over blocks: evicting is the
            # pool's hottest path once the cache is full (every allocation evicts).
            pop = self._lru.popitem
            blocks = [pop(False)[0] for _ in range(evict)]
            hashes = self.block_hashes
            # Blocks in the LRU hold a cached prefix: each has a hash.
            gone = cast(list[int], [hashes[b] for b in blocks])
            for b in blocks:
                hashes[b] = None
            cached = self.cached
            for h in gone:
                del cached[h]
            if self._subscribers:
                for h in gone:
                    self._emit(BlockRemoved((h,)))
            ids += blocks
        for block in ids:
            refs[block] = 1
        return array("q", ids)  # a block table is machine integers, as the kernel's

    def release(self, block_ids: Sequence[int]) -> None:
        """Drop one reference on each block; last-first, so a sequence's tail is evicted
        before its prefix."""
        refs = self.ref_counts
        hashes = self.block_hashes
        freed = block_ids[::-1]
        if [refs[b] for b in freed].count(1) == len(freed) == len(set(freed)):
            for block in freed:  # the usual case: the sequence's own blocks, shared with none
                refs[block] = 0
        else:
            freed = []
            for block in reversed(block_ids):
                count = refs[block] - 1
                refs[block] = count
                if count <= 0:
                    if count < 0:
                        raise AssertionError(
                            f"KV block {block} released more often than referenced"
                        )
                    freed.append(block)
            if not freed:
                return
        self.free_blocks += len(freed)
        cached = [b for b in freed if hashes[b] is not None]
        if len(cached) < len(freed):
            self._empty += [b for b in freed if hashes[b] is None]
        lru = self._lru
        for block in cached:  # one by one: OrderedDict.update from a dict is twice as slow
            lru[block] = None

    # prefix caching

    def hash_blocks(
        self,
        hashes: _Hashes,
        full_blocks: int,
        prompt: tuple[int, ...],
        output: Sequence[int],
        root: int = ROOT_HASH,
    ) -> _Hashes:
        """`extend_block_hashes` over a sequence's prompt and generated tokens, from `root`."""
        return extend_block_hashes(
            hashes, full_blocks, self.block_size, tokens_of(prompt, output), root
        )

    def any_cached(self, block_hashes: Sequence[int]) -> bool:
        """Whether any of `block_hashes` names a cached block."""
        return not self.cached.keys().isdisjoint(block_hashes)

    def lookup(self, block_hashes: Sequence[int], max_blocks: int) -> list[int]:
        """Blocks caching the longest prefix of `block_hashes` (at most `max_blocks`);
        takes no reference."""
        hits = []
        cached = self.cached
        for block_hash in block_hashes[:max_blocks]:
            block = cached.get(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def free_among(self, block_ids: Sequence[int]) -> int:
        """How many of `block_ids` are free (referencing them uses up free blocks)."""
        refs = self.ref_counts
        return sum(1 for b in block_ids if refs[b] == 0)

    def take(self, hits: list[int], need: int) -> array[int] | None:
        """A reference on each of `hits` (a `lookup`'s cached blocks) and `need` fresh
        blocks after them, or None, with nothing taken, when too few blocks are free."""
        if need + self.free_among(hits) > self.free_blocks:
            return None
        self.touch(hits)
        fresh = self.allocate(need)
        assert fresh is not None  # room checked above
        return array("q", hits) + fresh

    def touch(self, block_ids: Sequence[int]) -> None:
        """Take one reference on each of `block_ids` (cache hits)."""
        refs = self.ref_counts
        for block in block_ids:
            if refs[block] == 0:
                del self._lru[block]
                self.free_blocks -= 1
            refs[block] += 1

    def cache(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[int],
        start: int,
        end: int,
        token_ids: Callable[[int, int], tuple[int, ...]],
    ) -> None:
        """Enter a sequence's full blocks `start..end-1` into the cache.

        A block whose hash is already cached elsewhere (the same prefix computed
        twice) stays uncached, so each hash names one block. `token_ids(first,
        end)` gives the sequence's tokens, wanted only for events.
        """
        stored = []
        hashes = self.block_hashes
        cached = self.cached
        for i in range(start, end):
            block = block_ids[i]
            if hashes[block] is not None:
                continue  # a hit: cached already
            block_hash = block_hashes[i]
            if block_hash in cached:
                continue
            hashes[block] = block_hash
            cached[block_hash] = block
            stored.append(i)
        if stored and self._subscribers:
            self._emit_stored(block_hashes, stored, token_ids)

    def reset_prefix_cache(self) -> bool:
        """Drop every cached hash, as vLLM's `reset_prefix_cache`: only when no block is
        referenced (returns False and changes nothing otherwise)."""
        if self.free_blocks != self.total_blocks:
            return False
        if self.cached:
            for block in self._lru:
                self.block_hashes[block] = None
                self._empty.append(block)
            self._lru.clear()
            self.cached.clear()
            if self._subscribers:
                self._emit(AllBlocksCleared())
        return True


class CompiledBlockPool(PoolEvents):
    """`BlockPool` with its state in the compiled kernel (`_kernel.Pool`): the same blocks,
    hashes, LRU order and events, at a fraction of the Python work per block.

    `ref_counts`, `block_hashes`, `cached`, `_lru` and `_empty` are snapshots (copies
    made on each read, for tests and checks), not the live state.
    """

    def __init__(self, total_blocks: int, block_size: int) -> None:
        super().__init__()
        assert kernel.compiled is not None
        self._c = kernel.compiled.Pool(total_blocks, block_size, ROOT_HASH)
        self.total_blocks = total_blocks
        self.block_size = block_size
        # The hot methods, bound once: a call through the wrapper adds a Python frame.
        self.release = self._c.release
        self.lookup = self._c.lookup
        self.free_among = self._c.free_among
        self.touch = self._c.touch
        self.any_cached = self._c.any_cached
        self.hash_blocks = self._c.hash_blocks

    @property
    def free_blocks(self) -> int:
        return self._c.free_blocks

    @property
    def used_blocks(self) -> int:
        return self.total_blocks - self._c.free_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.total_blocks * self.block_size

    @property
    def cached_free_blocks(self) -> int:
        return self._c.lru_len

    @property
    def ref_counts(self) -> list[int]:
        return self._c.ref_counts()

    @property
    def block_hashes(self) -> list[int | None]:
        return self._c.block_hashes()

    @property
    def cached(self) -> dict[int, int]:
        hashes = self._c.block_hashes()
        return {hashes[b]: b for b in range(len(hashes)) if hashes[b] is not None}

    @property
    def _lru(self) -> list[int]:
        return self._c.lru()

    @property
    def _empty(self) -> list[int]:
        return self._c.empty()

    def allocate(self, n: int) -> array[int] | None:
        if not self._subscribers:
            return self._c.allocate(n)
        evicted: list[int] = []
        ids = self._c.allocate(n, evicted)
        for h in evicted:
            self._emit(BlockRemoved((h,)))
        return ids

    def take(self, hits: list[int], need: int) -> array[int] | None:
        if not self._subscribers:
            return self._c.take(hits, need)
        evicted: list[int] = []
        ids = self._c.take(hits, need, evicted)
        for h in evicted:
            self._emit(BlockRemoved((h,)))
        return ids

    def cache(
        self,
        block_ids: Sequence[int],
        block_hashes: Sequence[int],
        start: int,
        end: int,
        token_ids: Callable[[int, int], tuple[int, ...]],
    ) -> None:
        stored = self._c.cache(block_ids, block_hashes, start, end)
        if stored and self._subscribers:
            self._emit_stored(block_hashes, stored, token_ids)

    def reset_prefix_cache(self) -> bool:
        done = self._c.reset()
        if done == 2 and self._subscribers:
            self._emit(AllBlocksCleared())
        return bool(done)


KVPool = BlockPool | CompiledBlockPool


def make_block_pool(total_blocks: int, block_size: int) -> KVPool:
    """The compiled pool where the kernel is on (`kernel.enabled`), else the reference."""
    if kernel.enabled():
        return CompiledBlockPool(total_blocks, block_size)
    kernel.notice()
    return BlockPool(total_blocks, block_size)
