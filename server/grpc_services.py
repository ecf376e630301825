"""The worker protocols a server may speak on its gRPC port (`serve --grpc-services`).

Every one is a front over the same engine; what differs is which services a client
finds on the port. That matters to a gateway that picks its wire protocol by the
services a worker answers: smg 1.13 probes a gRPC worker for its engine, and a port
that answers both SGLang's and vLLM's service is SGLang to it, even under
`--backend vllm` (tried with smg 1.13). So the default is every service that can share
the port, today's: memorywall.v1, SGLang's scheduler (smg's default `--backend sglang`)
and KServe v2 (`kserve`, a protocol of its own that no smg engine probe reads, so it
goes with any of them). vLLM's and TensorRT-LLM's services are served when asked for,
alone or beside memorywall.v1 / KServe (`--grpc-services vllm` or `memorywall,vllm`),
never with SGLang's or each other's.

Kept free of grpc and the fronts: the CLI parses names before anything heavy loads.
"""

from __future__ import annotations

MEMORYWALL = "memorywall"
SGLANG = "sglang"
VLLM = "vllm"
TRTLLM = "trtllm"
KSERVE = "kserve"
GRPC_SERVICES = (MEMORYWALL, SGLANG, VLLM, TRTLLM, KSERVE)
# The smg engines: a port speaks for one of them at most.
SMG_ENGINES = (SGLANG, VLLM, TRTLLM)
DEFAULT_GRPC_SERVICES = (MEMORYWALL, SGLANG, KSERVE)
# smg 1.13's `--backend` for a worker speaking each engine's service; it has none for
# TensorRT-LLM, whose workers it detects by their service.
SMG_BACKEND = {SGLANG: "sglang", VLLM: "vllm"}


def parse_services(text: str) -> tuple[str, ...]:
    """`memorywall,vllm` -> ("memorywall", "vllm"), in the order given; ValueError naming
    what is wrong (an unknown name, an empty list, two smg engines)."""
    names = [n.strip() for n in text.split(",")]
    if not text.strip() or any(not n for n in names):
        raise ValueError(f"expected a comma-separated list of {', '.join(GRPC_SERVICES)}")
    out: list[str] = []
    for name in names:
        if name not in GRPC_SERVICES:
            raise ValueError(f"unknown service {name!r} (expected: {', '.join(GRPC_SERVICES)})")
        if name not in out:
            out.append(name)
    check_services(tuple(out))
    return tuple(out)


def check_services(services: tuple[str, ...]) -> None:
    """ValueError unless `services` is a set one port can serve."""
    if not services:
        raise ValueError("no gRPC service to serve (use --no-grpc for HTTP only)")
    unknown = [s for s in services if s not in GRPC_SERVICES]
    if unknown:
        raise ValueError(f"unknown service {unknown[0]!r} (expected: {', '.join(GRPC_SERVICES)})")
    engines = [s for s in services if s in SMG_ENGINES]
    if len(engines) > 1:
        raise ValueError(
            f"{' and '.join(engines)} on one port: a gateway that detects the engine by its "
            "services sees two engines; serve one of them"
        )


def smg_engine(services: tuple[str, ...]) -> str | None:
    """The smg engine a port with `services` looks like, or None."""
    return next((s for s in services if s in SMG_ENGINES), None)
