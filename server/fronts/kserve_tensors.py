"""KServe v2 tensors for an LLM, the way Triton's vLLM backend and TensorRT-LLM ensemble take
them: named tensors to an engine `Request`, token groups back to output tensors.

No I/O and no wire library: `kserve_grpc.py` and `kserve_http.py` decode their wire
form into `Tensor`s and write the `Tensor`s this module builds.

Inputs (vLLM backend, `src/model.py`): BYTES `text_input` (required), BOOL `stream`,
BYTES `sampling_parameters` (a JSON object of vLLM `SamplingParams` fields; request
parameters stand in when it is absent, as in the backend), BOOL
`exclude_input_in_output` and `return_*` flags. TensorRT-LLM's ensemble names are
taken too: `max_tokens`, `stop_words`, `bad_words`, `min_length`, `random_seed`,
`end_id`, `pad_id`, `beam_width` and its sampling scalars. Outputs: `text_output`,
and as the `return_*` flags ask `finish_reason`, `num_input_tokens`,
`num_output_tokens`; memorywall adds `token_ids` and `modelled_times_s` for a client
that names them among its requested outputs.

Decisions where the emulator differs: stop strings and bad words are accepted and
never match synthetic text; sampling knobs are checked and have no effect; log
probabilities are refused (INVALID_ARGUMENT), as is beam_width > 1 or n > 1.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from memorywall.errors import InvalidRequestError, NotFoundError
from memorywall.server.engine.api import (
    Finished,
    FinishReason,
    ModelCard,
    Request,
    TokenGroup,
    token_text,
)
from memorywall.server.fronts.tokenizer import PromptTokenizer

DEFAULT_MAX_TOKENS = 16  # vLLM's SamplingParams default, which the backend inherits

INTEGER = frozenset({"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"})
NUMBER = INTEGER | {"FP16", "FP32", "FP64"}
NUMPY_DTYPE = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}
DATATYPES = frozenset({*NUMPY_DTYPE, "BYTES"})


@dataclass(frozen=True)
class Tensor:
    """One named tensor: `values` flat, in row-major order (str for BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    values: Sequence[Any]


@dataclass(frozen=True)
class TensorSpec:
    """An input or output the model publishes: name, KServe datatype, dims (-1: any)."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    accepts: frozenset[str]  # datatypes taken for it (inputs)
    optional: bool = True


def _spec(name: str, datatype: str, dims=(1,), accepts=None, optional=True) -> TensorSpec:
    return TensorSpec(name, datatype, dims, frozenset(accepts or {datatype}), optional)


FLAGS = (
    "exclude_input_in_output",
    "return_finish_reason",
    "return_cumulative_logprob",
    "return_logprobs",
    "return_num_input_tokens",
    "return_num_output_tokens",
)
INPUTS: dict[str, TensorSpec] = {
    s.name: s
    for s in (
        _spec("text_input", "BYTES", optional=False),
        _spec("stream", "BOOL"),
        _spec("sampling_parameters", "BYTES"),
        *(_spec(flag, "BOOL") for flag in FLAGS),
        # TensorRT-LLM's ensemble
        _spec("max_tokens", "INT32", accepts=INTEGER),
        _spec("stop_words", "BYTES", (-1,)),
        _spec("bad_words", "BYTES", (-1,)),
        _spec("min_length", "INT32", accepts=INTEGER),
        _spec("random_seed", "UINT64", accepts=INTEGER),
        _spec("end_id", "INT32", accepts=INTEGER),
        _spec("pad_id", "INT32", accepts=INTEGER),
        _spec("beam_width", "INT32", accepts=INTEGER),
        _spec("top_k", "INT32", accepts=INTEGER),
        _spec("top_p", "FP32", accepts=NUMBER),
        _spec("temperature", "FP32", accepts=NUMBER),
        _spec("repetition_penalty", "FP32", accepts=NUMBER),
        _spec("presence_penalty", "FP32", accepts=NUMBER),
        _spec("frequency_penalty", "FP32", accepts=NUMBER),
    )
}
OUTPUTS: dict[str, TensorSpec] = {
    s.name: s
    for s in (
        _spec("text_output", "BYTES", (-1,)),
        _spec("finish_reason", "BYTES", (-1,)),
        _spec("num_input_tokens", "UINT32"),
        _spec("num_output_tokens", "UINT32", (-1,)),
        _spec("token_ids", "INT64", (-1,)),  # memorywall
        _spec("modelled_times_s", "FP64", (-1,)),  # memorywall: seconds after arrival
    )
}
# Flags that add an output, as in the vLLM backend.
FLAG_OUTPUTS = {
    "return_finish_reason": "finish_reason",
    "return_num_input_tokens": "num_input_tokens",
    "return_num_output_tokens": "num_output_tokens",
}
# Request parameters Triton itself reads: never sampling parameters.
TRITON_PARAMETERS = frozenset(
    {
        "sequence_id",
        "sequence_start",
        "sequence_end",
        "priority",
        "timeout",
        "binary_data_output",
        "triton_enable_empty_final_response",
        "headers",
    }
)
# vLLM SamplingParams fields: each either acts, is checked and has no effect, or is refused.
SAMPLING_INT = {"max_tokens": 1, "min_tokens": 0, "top_k": -1, "n": 1, "best_of": 1}
SAMPLING_NUMBER = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)
SAMPLING_FLAG = (
    "ignore_eos",
    "detokenize",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
)
SAMPLING_OTHER = ("seed", "stop", "stop_token_ids", "bad_words", "logprobs", "prompt_logprobs")
SAMPLING_KEYS = frozenset((*SAMPLING_INT, *SAMPLING_NUMBER, *SAMPLING_FLAG, *SAMPLING_OTHER))
FINISH_TEXT: dict[FinishReason | None, str] = {  # None: not finished
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.ABORT: "abort",
}


@dataclass(frozen=True, kw_only=True)
class GenerateCall:
    """One parsed inference request: what to submit and how to answer."""

    request: Request
    stream: bool
    prompt_text: str
    prepend_prompt: bool  # the first response's text_output starts with the prompt
    outputs: tuple[str, ...]  # output tensors every response carries, in order
    empty_final: bool  # Triton's `triton_enable_empty_final_response`


def field_error(name: str, message: str) -> InvalidRequestError:
    return InvalidRequestError(f"{name}: {message}")


def check_tensor(t: Tensor) -> None:
    """The tensor is one this model takes, of a datatype it takes, with as many values as
    its shape says."""
    spec = INPUTS.get(t.name)
    if spec is None:
        raise field_error(
            f"input {t.name!r}", f"unknown tensor; this model takes {', '.join(INPUTS)}"
        )
    if t.datatype not in spec.accepts:
        raise field_error(
            f"input {t.name!r}",
            f"datatype {t.datatype!r} is not {' or '.join(sorted(spec.accepts))}",
        )
    if any(d < 0 for d in t.shape):
        raise field_error(f"input {t.name!r}", f"shape {list(t.shape)} has a negative dimension")
    if math.prod(t.shape) != len(t.values):
        raise field_error(f"input {t.name!r}", f"shape {list(t.shape)} but {len(t.values)} values")
    kind = _VALUE_TYPE["BYTES" if t.datatype == "BYTES" else t.datatype[:2]]
    for v in t.values:
        if not isinstance(v, kind) or (kind is not bool and isinstance(v, bool)):
            raise field_error(f"input {t.name!r}", f"{v!r} is not a {t.datatype} value")


# The Python type of a value of each datatype family (BOOL, INT/UINT, FP, BYTES).
_VALUE_TYPE: dict[str, type | tuple[type, ...]] = {
    "BO": bool,
    "IN": int,
    "UI": int,
    "FP": (int, float),
    "BYTES": str,
}


def _one(t: Tensor) -> Any:
    if len(t.values) != 1:
        raise field_error(f"input {t.name!r}", f"must hold one value, got {len(t.values)}")
    return t.values[0]


class KServeApi:
    """Converts KServe v2 inference requests for one served model; no per-request state."""

    def __init__(self, card: ModelCard, tokenizer: PromptTokenizer, *, protocol: str) -> None:
        """`protocol`: the wire its requests come on ("kserve-grpc", "kserve-http"), for metrics."""
        self.card = card
        self.tokenizer = tokenizer
        self.protocol = protocol

    def check_model(self, name: str, version: str = "") -> None:
        """NotFoundError unless `name` (and `version`, if given) is the model served here."""
        if name != self.card.model:
            raise NotFoundError(
                f"model {name!r} is not served here; this server serves {self.card.model!r}"
            )
        if version not in ("", "1"):
            raise NotFoundError(f"model {name!r} has version 1 only, not {version!r}")

    def to_call(
        self,
        inputs: Sequence[Tensor],
        parameters: Mapping[str, Any],
        requested_outputs: Sequence[str] = (),
        *,
        stream_default: bool = False,
    ) -> GenerateCall:
        """A request's tensors, parameters and requested outputs as a `GenerateCall`; any
        problem is an InvalidRequestError naming the tensor, parameter or field."""
        by_name: dict[str, Tensor] = {}
        for t in inputs:
            check_tensor(t)
            if t.name in by_name:
                raise field_error(f"input {t.name!r}", "given twice")
            by_name[t.name] = t
        if "text_input" not in by_name:
            raise field_error("input 'text_input'", "required (BYTES, the prompt text)")
        prompt_text = _one(by_name["text_input"])
        if not prompt_text:
            raise field_error("input 'text_input'", "empty")
        flags = {f: bool(_one(by_name[f])) if f in by_name else None for f in FLAGS}
        for f in ("return_cumulative_logprob", "return_logprobs"):
            if flags[f]:
                raise field_error(f"input {f!r}", "log probabilities are not emulated")
        stream = stream_default
        if "stream" in by_name:
            stream = bool(_one(by_name["stream"]))
        elif "stream" in parameters:
            stream = _param_flag(parameters, "stream")
        exclude = flags["exclude_input_in_output"]
        if stream and exclude is False:
            raise field_error(
                "input 'exclude_input_in_output'", "false is not allowed when streaming"
            )
        sampling = self._sampling(by_name, parameters)
        max_tokens = sampling.get("max_tokens", DEFAULT_MAX_TOKENS)
        if "max_tokens" in by_name:
            max_tokens = _int_value(by_name["max_tokens"], minimum=1)
        min_tokens = sampling.get("min_tokens", 0)
        if "min_length" in by_name:
            min_tokens = _int_value(by_name["min_length"], minimum=0)
        seed = sampling.get("seed")
        if "random_seed" in by_name:
            seed = _int_value(by_name["random_seed"], minimum=0)
        if "beam_width" in by_name and _int_value(by_name["beam_width"], minimum=1) != 1:
            raise field_error("input 'beam_width'", "only 1 is emulated")
        for name in ("top_k", "end_id", "pad_id"):
            if name in by_name:
                _int_value(by_name[name], minimum=-1)
        for name in ("top_p", "temperature", "repetition_penalty"):
            if name in by_name:
                _number_value(by_name[name])
        for name in ("presence_penalty", "frequency_penalty"):
            if name in by_name:
                _number_value(by_name[name])
        prompt = self.tokenizer.encode(prompt_text)
        if not prompt:
            raise field_error("input 'text_input'", "no tokens in the prompt text")
        request = Request(
            request_id=uuid.uuid4().hex,
            prompt_ids=prompt,
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            ignore_eos=sampling.get("ignore_eos", False),
            stop_token_ids=frozenset(sampling.get("stop_token_ids", ())),
            sampling_seed=seed,
            protocol=self.protocol,
        )
        return GenerateCall(
            request=request,
            stream=stream,
            prompt_text=prompt_text,
            prepend_prompt=not stream and not exclude,
            outputs=self._outputs(requested_outputs, flags),
            empty_final=_param_flag(parameters, "triton_enable_empty_final_response"),
        )

    def _sampling(self, by_name: Mapping[str, Tensor], parameters: Mapping[str, Any]) -> dict:
        if "sampling_parameters" in by_name:
            raw = _one(by_name["sampling_parameters"])
            name = "input 'sampling_parameters'"
            try:
                body = json.loads(raw) if raw else {}
            except ValueError as e:
                raise field_error(name, f"not valid JSON ({e})") from None
            if not isinstance(body, dict):
                raise field_error(name, "must be a JSON object")
            return self._check_sampling(body, name)
        # The backend reads sampling parameters from the request's parameters instead.
        body = {k: v for k, v in parameters.items() if k not in TRITON_PARAMETERS | {"stream"}}
        return self._check_sampling(body, "parameters")

    def _check_sampling(self, body: dict[str, Any], where: str) -> dict[str, Any]:
        for key, value in body.items():
            name = f"{where}.{key}"
            if key not in SAMPLING_KEYS:
                raise field_error(name, "unknown sampling parameter")
            if key in SAMPLING_INT:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise field_error(name, f"must be an integer, got {value!r}")
                if value < SAMPLING_INT[key]:
                    raise field_error(name, f"must be >= {SAMPLING_INT[key]}, got {value}")
            elif key in SAMPLING_NUMBER:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise field_error(name, f"must be a number, got {value!r}")
                if not math.isfinite(value):
                    raise field_error(name, f"must be finite, got {value!r}")
            elif key in SAMPLING_FLAG and not isinstance(value, bool):
                raise field_error(name, f"must be true or false, got {value!r}")
        for key in ("n", "best_of"):
            if body.get(key, 1) > 1:
                raise field_error(f"{where}.{key}", "only 1 is emulated")
        for key in ("logprobs", "prompt_logprobs"):
            if body.get(key) not in (None, 0):
                raise field_error(f"{where}.{key}", "log probabilities are not emulated")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise field_error(f"{where}.seed", f"must be an integer, got {seed!r}")
        stop = body.get("stop")
        if stop is not None and not (
            isinstance(stop, str)
            or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
        ):
            raise field_error(f"{where}.stop", "must be a string or a list of strings")
        vocab = self.card.vocab_size
        ids = body.get("stop_token_ids", [])
        if not isinstance(ids, list) or not all(
            not isinstance(t, bool) and isinstance(t, int) and 0 <= t < vocab for t in ids
        ):
            raise field_error(f"{where}.stop_token_ids", f"must be token ids below {vocab}")
        return body

    @staticmethod
    def _outputs(requested: Sequence[str], flags: Mapping[str, bool | None]) -> tuple[str, ...]:
        if requested:
            for name in requested:
                if name not in OUTPUTS:
                    raise field_error(
                        f"output {name!r}", f"unknown; this model gives {', '.join(OUTPUTS)}"
                    )
            return tuple(dict.fromkeys(requested))
        return ("text_output", *(out for flag, out in FLAG_OUTPUTS.items() if flags[flag]))


def _int_value(t: Tensor, *, minimum: int) -> int:
    v = int(_one(t))
    if v < minimum:
        raise field_error(f"input {t.name!r}", f"must be >= {minimum}, got {v}")
    return v


def _number_value(t: Tensor) -> float:
    v = float(_one(t))
    if not math.isfinite(v):
        raise field_error(f"input {t.name!r}", f"must be finite, got {v}")
    return v


def _param_flag(parameters: Mapping[str, Any], name: str) -> bool:
    v = parameters.get(name, False)
    if not isinstance(v, bool):
        raise field_error(f"parameters.{name}", f"must be true or false, got {v!r}")
    return v


# --- responses ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Piece:
    """Tokens one response carries."""

    token_ids: tuple[int, ...]
    text: str
    times_s: tuple[float, ...]
    prompt_tokens: int
    finish_reason: FinishReason | None


def piece_of(g: TokenGroup) -> Piece:
    return Piece(g.token_ids, g.text, g.times_s, g.prompt_tokens, g.finish_reason)


def per_token(g: TokenGroup) -> Iterable[Piece]:
    if len(g.token_ids) == 1:
        yield piece_of(g)
        return
    last = len(g.token_ids) - 1
    for i, (t, s) in enumerate(zip(g.token_ids, g.times_s, strict=True)):
        reason = g.finish_reason if i == last else None
        yield Piece((t,), token_text(t), (s,), g.prompt_tokens, reason)


def merge(pieces: list[Piece]) -> Piece:
    return Piece(
        tuple(t for p in pieces for t in p.token_ids),
        "".join(p.text for p in pieces),
        tuple(s for p in pieces for s in p.times_s),
        pieces[-1].prompt_tokens,
        pieces[-1].finish_reason,
    )


def output_tensors(call: GenerateCall, piece: Piece, *, first: bool) -> list[Tensor]:
    """The output tensors `call` asked for, for one response carrying `piece`."""
    out = []
    for name in call.outputs:
        n = len(piece.token_ids)
        if name == "text_output":
            text = call.prompt_text + piece.text if first and call.prepend_prompt else piece.text
            out.append(Tensor(name, "BYTES", (1,), (text,)))
        elif name == "finish_reason":
            reason = piece.finish_reason
            out.append(Tensor(name, "BYTES", (1,), (FINISH_TEXT.get(reason, "None"),)))
        elif name == "num_input_tokens":
            out.append(Tensor(name, "UINT32", (1,), (piece.prompt_tokens,)))
        elif name == "num_output_tokens":
            out.append(Tensor(name, "UINT32", (1,), (n,)))
        elif name == "token_ids":
            out.append(Tensor(name, "INT64", (n,), piece.token_ids))
        else:
            out.append(Tensor(name, "FP64", (n,), piece.times_s))
    return out


def summary_parameters(f: Finished) -> dict[str, str | int | float]:
    """memorywall's account of a finished request, as response parameters of the last
    response: usage and the modelled timeline."""
    return {
        "memorywall_finish_reason": FINISH_TEXT[f.reason],
        "memorywall_prompt_tokens": f.prompt_tokens,
        "memorywall_completion_tokens": f.completion_tokens,
        "memorywall_cached_tokens": f.cached_tokens,
        "memorywall_queue_s": f.queue_s,
        "memorywall_ttft_s": f.ttft_s,
        "memorywall_decode_s": f.decode_s,
        "memorywall_e2e_s": f.e2e_s,
        "memorywall_received_monotonic_ns": f.received_monotonic_ns,
        # Host stalls moved the timeline above this much later than the model alone.
        "memorywall_host_stall_s": f.host_stall_s,
    }


# --- raw tensor bytes (gRPC raw_*_contents, HTTP binary data) ------------------------------


def decode_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> list[Any]:
    """The values of a raw tensor: BYTES as 4-byte little-endian lengths each followed by
    that many bytes (decoded as UTF-8), the rest little-endian fixed width."""
    if datatype == "BYTES":
        values, i = [], 0
        while i < len(raw):
            if i + 4 > len(raw):
                raise field_error(f"input {name!r}", "raw BYTES data ends inside a length")
            size = int.from_bytes(raw[i : i + 4], "little")
            i += 4
            if i + size > len(raw):
                raise field_error(f"input {name!r}", "raw BYTES data shorter than its length")
            values.append(_utf8(name, raw[i : i + size]))
            i += size
        return values
    dtype = NUMPY_DTYPE.get(datatype)
    if dtype is None:
        raise field_error(f"input {name!r}", f"unknown datatype {datatype!r}")
    width = np.dtype(dtype).itemsize
    if len(raw) % width:
        raise field_error(f"input {name!r}", f"{len(raw)} raw bytes is not a whole {datatype}")
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).tolist()


def encode_raw(t: Tensor) -> bytes:
    """A tensor's values as raw bytes (see `decode_raw`)."""
    if t.datatype == "BYTES":
        parts: list[bytes] = []
        for v in t.values:
            b = v.encode() if isinstance(v, str) else bytes(v)
            parts += (len(b).to_bytes(4, "little"), b)
        return b"".join(parts)
    return np.asarray(t.values, dtype=np.dtype(NUMPY_DTYPE[t.datatype]).newbyteorder("<")).tobytes()


def _utf8(name: str, raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise field_error(f"input {name!r}", "BYTES values must be UTF-8 text") from None
