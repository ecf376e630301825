"""The tokenizer an SGLang-API worker ships to the smg gateway (GetTokenizer).

The gateway needs no tokenizer of its own: it asks the worker for a zip of
Hugging Face tokenizer files and builds one from them.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass

from memorywall.server.engine.api import ModelCard, token_text

# A fixed timestamp inside the zip keeps its bytes, and so its fingerprint, reproducible.
_ZIP_TIME = (2025, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class TokenizerZip:
    data: bytes
    sha256: str  # hex digest of `data`


def tokenizer_zip(card: ModelCard) -> TokenizerZip:
    """tokenizer.json and tokenizer_config.json, deflated into one zip."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, text in tokenizer_files(card).items():
            info = zipfile.ZipInfo(name, date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, text)
    data = buf.getvalue()
    return TokenizerZip(data=data, sha256=hashlib.sha256(data).hexdigest())


def tokenizer_files(card: ModelCard) -> dict[str, str]:
    """A Hugging Face tokenizer under which the ids this server emits decode to its text.

    Output id i streams as `token_text(i)`, " " + one of a few common words, so
    many ids share a word. The model is WordLevel over the whole vocabulary: for
    each word the lowest non-EOS id with that word owns the plain byte-level
    string ("Ġthe"), every other id gets a unique alias ("Ġthe#40") whose suffix
    the decoder drops before the byte-level decoder turns "Ġ" into a space. So
    decode(ids) is the streamed text, and encoding it gives one token per word,
    the owning ids: counts match, ids are not all recovered. EOS ids are special
    tokens that decode to nothing (the engine streams no text for them). Prompt
    text splits at GPT-2's pre-token boundaries; a piece that is not one of the
    words encodes as the unknown token, the owner of the first word.
    """
    eos = set(card.eos_token_ids)
    owners: dict[str, int] = {}
    vocab: dict[str, int] = {}
    for i in range(card.vocab_size):
        if i in eos:
            vocab[f"<|eos_{i}|>"] = i
            continue
        piece = "Ġ" + token_text(i)[1:]
        if piece in owners:
            piece = f"{piece}#{i}"
        else:
            owners[piece] = i
        vocab[piece] = i
    unk = min(owners.items(), key=lambda kv: kv[1])[0]
    special = [
        {
            "id": i,
            "content": f"<|eos_{i}|>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
        for i in sorted(eos)
    ]
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"Regex": "#[0-9]+$"}, "content": ""},
                {"type": "ByteLevel", **byte_level},
            ],
        },
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": unk},
    }
    eos_token = special[0]["content"] if special else None
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": card.context_window,
        "eos_token": eos_token,
        "bos_token": None,
        "unk_token": unk,
        "added_tokens_decoder": {str(t["id"]): t for t in special},
        "chat_template": CHAT_TEMPLATE,
    }
    return {"tokenizer.json": json.dumps(tokenizer), "tokenizer_config.json": json.dumps(config)}


CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
)
