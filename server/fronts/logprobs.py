"""Synthetic log probabilities: deterministic, and a valid distribution at every position.

The emulator samples no distribution, so each position's is made up from a digest
of the token and its position: the chosen token gets probability p0 in
[0.40, 0.99], and the k-1 alternatives (other ids, from the same digest) get
(1 - p0) / 2, (1 - p0) / 4, ...: descending, the chosen token first, summing
below 1. Shapes are vLLM's: chat `ChatCompletionLogProbs` (`content` entries with
`bytes` and `top_logprobs`) and completions `Logprobs` (`tokens`,
`token_logprobs`, `top_logprobs` dicts, `text_offset`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from memorywall.server.engine.api import digest, token_text

MAX_TOP_LOGPROBS = 20  # vLLM's default --max-logprobs


def distribution(token: int, position: int, k: int, vocab: int) -> list[tuple[int, float]]:
    """`max(k, 1)` (id, logprob) pairs, the chosen `token` first, descending."""
    h = digest("logprob", token, position)
    p0 = 0.40 + 0.59 * ((h % 10_000) / 9_999)
    out = [(token, math.log(p0))]
    rest, alt = 1.0 - p0, h
    for j in range(1, k):
        alt = digest(alt, j) % vocab
        if alt == token:
            alt = (alt + 1) % vocab
        out.append((alt, math.log(rest * 0.5**j) if rest > 0 else -9999.0))
    return out


def chat_logprobs(
    ids: Sequence[int], texts: Sequence[str], start: int, top: int, vocab: int
) -> dict[str, Any]:
    """`choice.logprobs` of a chat chunk or body: one `content` entry per token."""
    content = []
    for i, (t, text) in enumerate(zip(ids, texts, strict=True)):
        dist = distribution(t, start + i, max(top, 1), vocab)
        entry = _chat_entry(text, dist[0][1])
        entry["top_logprobs"] = [
            _chat_entry(text if j == 0 else token_text(a), lp)
            for j, (a, lp) in enumerate(dist[:top])
        ]
        content.append(entry)
    return {"content": content}


def completion_logprobs(
    ids: Sequence[int | None],
    texts: Sequence[str],
    start: int,
    top: int,
    vocab: int,
    offset: int,
) -> dict[str, Any]:
    """`choice.logprobs` of a completion: parallel lists; a None id (the first echoed prompt
    token, which has no logprob) gets None entries, as in vLLM."""
    out: dict[str, Any] = {
        "text_offset": [],
        "token_logprobs": [],
        "tokens": [],
        "top_logprobs": [],
    }
    for i, (t, text) in enumerate(zip(ids, texts, strict=True)):
        out["text_offset"].append(offset)
        offset += len(text)
        out["tokens"].append(text)
        if t is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        dist = distribution(t, start + i, max(top, 1), vocab)
        out["token_logprobs"].append(dist[0][1])
        tops: dict[str, float] = {}
        for j, (a, lp) in enumerate(dist[:top]):
            tops.setdefault(text if j == 0 else token_text(a), lp)
        out["top_logprobs"].append(tops if top else None)
    return out


def _chat_entry(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}
