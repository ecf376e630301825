"""Cases shared by the twin client tests: status -> error class, and invalid arguments."""

from __future__ import annotations

import grpc

from memorywall.client import (
    AlreadyExists,
    Cancelled,
    ClientError,
    DeadlineExceeded,
    InvalidRequest,
    NotFound,
    ResourceExhausted,
    SamplingParams,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

S = grpc.StatusCode
ERROR_CASES = [
    (S.INVALID_ARGUMENT, InvalidRequest),
    (S.OUT_OF_RANGE, InvalidRequest),
    (S.FAILED_PRECONDITION, InvalidRequest),
    (S.NOT_FOUND, NotFound),
    (S.ALREADY_EXISTS, AlreadyExists),
    (S.RESOURCE_EXHAUSTED, ResourceExhausted),
    (S.UNAVAILABLE, Unavailable),
    (S.DEADLINE_EXCEEDED, DeadlineExceeded),
    (S.CANCELLED, Cancelled),
    (S.UNIMPLEMENTED, Unimplemented),
    (S.UNAUTHENTICATED, Unauthenticated),
    # Anything unlisted is the base class.
    (S.INTERNAL, ClientError),
    (S.PERMISSION_DENIED, ClientError),
    (S.DATA_LOSS, ClientError),
    (S.ABORTED, ClientError),
    (S.UNKNOWN, ClientError),
]

BAD_ARGS = [
    {"max_tokens": 4},
    {"prompt": "x", "prompt_tokens": 3, "max_tokens": 4},
    {"prompt": "", "max_tokens": 4},
    {"prompt_token_ids": [], "max_tokens": 4},
    {"prompt_token_ids": [1, -1], "max_tokens": 4},
    {"prompt_token_ids": "abc", "max_tokens": 4},
    {"prompt_tokens": 0, "max_tokens": 4},
    {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "max_tokens": True},
    {"prompt": "x", "max_tokens": 2.0},
    {"prompt": "x", "max_tokens": 4, "min_tokens": 5},
    {"prompt": "x", "max_tokens": 4, "request_id": ""},
    {"prompt": "x", "max_tokens": 4, "min_interval_s": -1.0},
    {"prompt": "x", "max_tokens": 4, "min_interval_s": float("nan")},
    {"prompt": "x", "max_tokens": 4, "timeout_s": 0},
    {"prompt": "x", "max_tokens": 4, "sampling": SamplingParams(seed=-1)},
    {"prompt": "x", "max_tokens": 4, "sampling": SamplingParams(temperature=float("inf"))},
    {"prompt": "x", "max_tokens": 4, "sampling": SamplingParams(stop=("",))},
    {"prompt": "x", "max_tokens": 4, "sampling": {"temperature": 1.0}},
]
