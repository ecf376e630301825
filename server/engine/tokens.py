"""Synthetic but deterministic tokens: same seed and request, same output.

Prompt text is counted at about four characters per token (the usual rule
of thumb for BPE tokenizers on English text); output ids map to short words.
"""

from __future__ import annotations

import hashlib

import numpy as np

CHARS_PER_TOKEN = 4
# Output text is one of these words per token, each with a leading space. They
# are among the most frequent English words, so " word" is a single token in
# GPT-2's BPE and in Llama 3's tiktoken-derived vocabulary; both split text into
# pre-tokens at " word" boundaries, so a client that re-tokenizes the streamed
# text counts exactly the tokens the server reports.
_WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "that",
    "for",
    "it",
    "as",
    "with",
    "was",
    "on",
    "be",
    "by",
    "at",
    "this",
    "from",
    "or",
    "an",
    "are",
    "not",
    "but",
    "have",
    "all",
    "can",
    "more",
    "one",
    "time",
    "so",
    "we",
    "they",
    "he",
    "she",
    "you",
    "will",
    "has",
    "had",
]


def digest(*parts: object) -> int:
    """A stable 64-bit hash of the parts (Python's hash() is salted per process)."""
    h = hashlib.blake2b(repr(parts).encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little")


def count_text_tokens(text: str) -> int:
    return max(1, -(-len(text) // CHARS_PER_TOKEN))


def text_token_ids(text: str, vocab_size: int) -> tuple[int, ...]:
    """Stand-in ids for prompt text: one per four-character piece."""
    pieces = [text[i : i + CHARS_PER_TOKEN] for i in range(0, len(text), CHARS_PER_TOKEN)]
    return tuple(digest(p) % vocab_size for p in pieces) or (0,)


def synthetic_prompt(count: int, seed: int, vocab_size: int) -> tuple[int, ...]:
    rng = np.random.default_rng(seed)
    return tuple(int(x) for x in rng.integers(0, vocab_size, size=count))


def token_text(token_id: int) -> str:
    return " " + _WORDS[token_id % len(_WORDS)]


class TokenSource:
    """Output ids for one request: uniform over the vocabulary, never an EOS id.

    Draws in blocks: numpy's per-call overhead, not the draw, is the cost here,
    and the engine asks for a token per sequence per step.
    """

    BLOCK = 256

    def __init__(self, seed: int, vocab_size: int, eos_ids: frozenset[int]) -> None:
        self._rng = np.random.default_rng(seed)
        self._vocab = vocab_size
        self._eos = eos_ids
        self._ids: list[int] = []
        self._uniform: list[float] = []

    def next_ids(self, n: int) -> list[int]:
        ids = self._ids
        if len(ids) < n:
            # Popped from the end, so keep the block reversed to hand ids out in draw order.
            self._ids = ids = self._draw(self.BLOCK + n) + ids
        if n == 1:
            return [ids.pop()]
        return [ids.pop() for _ in range(n)]

    def next_each(self, k: int) -> list[int]:
        """The ids of `k` calls of `next_ids(1)`, in one call (the offline fast path)."""
        out: list[int] = []
        while k:
            ids = self._ids
            if not ids:
                self._ids = ids = self._draw(self.BLOCK + 1)
            m = min(k, len(ids))
            out.extend(reversed(ids[-m:]))
            del ids[-m:]
            k -= m
        return out

    def _draw(self, n: int) -> list[int]:
        """`n` fresh ids, EOS draws moved off EOS, in reverse draw order."""
        block = self._rng.integers(0, self._vocab, size=n)[::-1]
        if any((block == eos).any() for eos in self._eos):
            return [self._not_eos(i) for i in block.tolist()]
        return block.tolist()

    def _not_eos(self, token: int) -> int:
        """Move an EOS draw to the next non-EOS id, wrapping inside the vocabulary."""
        while token in self._eos:
            token = (token + 1) % self._vocab
        return token

    def natural_length(self, low: int, high: int) -> int:
        """Where an unconstrained sample would end: uniform in [low, high]."""
        return int(self._rng.integers(low, high + 1))

    def accepted_drafts(self, draft_tokens: int, acceptance: float) -> int:
        """Drafts accepted before the first rejection, each with probability `acceptance`."""
        accepted = 0
        while accepted < draft_tokens and self._uniform_draw() < acceptance:
            accepted += 1
        return accepted

    def _uniform_draw(self) -> float:
        if not self._uniform:
            self._uniform = self._rng.random(self.BLOCK).tolist()
        return self._uniform.pop()
