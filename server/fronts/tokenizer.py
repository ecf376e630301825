"""Prompt text to token ids for the HTTP front: the ~4 characters/token rule, or a real tokenizer.

A real one is a local Hugging Face `tokenizer.json` (optional dependency
`tokenizers`, imported only when asked for; nothing is fetched from a hub).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from memorywall.errors import ConfigError
from memorywall.server.engine.api import text_token_ids


class PromptTokenizer(Protocol):
    def encode(self, text: str) -> tuple[int, ...]: ...


class ApproximateTokenizer:
    """The engine's rule of thumb: one stand-in id per four characters."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def encode(self, text: str) -> tuple[int, ...]:
        return text_token_ids(text, self.vocab_size)


class HuggingFaceTokenizer:
    """A `tokenizers.Tokenizer` loaded from PATH/tokenizer.json (or that file itself)."""

    def __init__(self, path: Path, vocab_size: int) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError(
                "--tokenizer needs the `tokenizers` package: pip install 'memorywall[tokenizer]'"
            ) from None
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ConfigError(f"--tokenizer: no tokenizer.json at {path}")
        try:
            self._tokenizer = Tokenizer.from_file(str(file))
        except Exception as e:  # the Rust side raises a bare Exception for bad files
            raise ConfigError(f"--tokenizer: cannot load {file}: {e}") from None
        size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        if size > vocab_size:
            raise ConfigError(
                f"--tokenizer: {file} has {size} tokens, more than the model's "
                f"vocabulary of {vocab_size}"
            )
        self.path = file

    def encode(self, text: str) -> tuple[int, ...]:
        return tuple(self._tokenizer.encode(text).ids)

    def decode(self, ids: tuple[int, ...]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=False)


def load_tokenizer(path: Path | None, vocab_size: int) -> PromptTokenizer:
    """The tokenizer at `path`, or the approximation when there is none."""
    if path is None:
        return ApproximateTokenizer(vocab_size)
    return HuggingFaceTokenizer(path, vocab_size)
