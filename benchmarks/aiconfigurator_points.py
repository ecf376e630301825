"""NVIDIA AIConfigurator's predictions for the measured H100 points (run in its own venv).

    python -m venv /tmp/aic && /tmp/aic/bin/pip install aiconfigurator==0.12.0
    /tmp/aic/bin/python benchmarks/aiconfigurator_points.py < points.json > predictions.json

Reads `[{"id", "kind": "decode"|"prefill", "batch", "context"|"prompt"}, ...]` on stdin
and writes, per (system, backend) database, each point's predicted seconds: the three
backends on h100_sxm, and vLLM's on h200_sxm and b200_sxm. A decode
step is `run_static(mode="static_gen")` with isl = context and osl = 2 (one generation
step, its TPOT); a prefill is `run_static(mode="static_ctx")` with batch 1, isl =
prompt (its context latency). Llama-3.1-8B, bf16 GEMMs, KV cache and attention, TP1.
Imports nothing from memorywall (AIConfigurator is not a memorywall dependency);
`benchmarks/accuracy.py --aiconfigurator PYTHON` runs it and stores the answer.
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version

from aiconfigurator.sdk import common, config
from aiconfigurator.sdk.backends.factory import get_backend
from aiconfigurator.sdk.models import get_model
from aiconfigurator.sdk.perf_database import get_database

MODEL = "meta-llama/Meta-Llama-3.1-8B"
VERSIONS = {"vllm": "0.24.0", "sglang": "0.5.14", "trtllm": "1.3.0rc20"}
DATABASES = [("h100_sxm", b) for b in VERSIONS] + [("h200_sxm", "vllm"), ("b200_sxm", "vllm")]


def predict(system: str, backend_name: str, points: list[dict]) -> dict[str, float]:
    db = get_database(system, backend_name, VERSIONS[backend_name])
    model_config = config.ModelConfig(
        tp_size=1,
        gemm_quant_mode=common.GEMMQuantMode.bfloat16,
        kvcache_quant_mode=common.KVCacheQuantMode.bfloat16,
        fmha_quant_mode=common.FMHAQuantMode.bfloat16,
    )
    model = get_model(MODEL, model_config, backend_name)
    backend = get_backend(backend_name)
    out = {}
    for p in points:
        if p["kind"] == "decode":
            rc = config.RuntimeConfig(batch_size=p["batch"], isl=p["context"], osl=2)
            s = backend.run_static(model, db, rc, mode="static_gen", stride=1)
            ms = s.get_summary_df()["tpot"].iloc[0]
        else:
            rc = config.RuntimeConfig(batch_size=1, isl=p["prompt"], osl=1)
            s = backend.run_static(model, db, rc, mode="static_ctx", stride=1)
            ms = s.get_summary_df()["context_latency"].iloc[0]
        out[p["id"]] = float(ms) / 1e3
    return out


def main() -> int:
    points = json.load(sys.stdin)
    result = {
        "aiconfigurator": version("aiconfigurator"),
        "model": MODEL,
        "databases": [
            {
                "system": system,
                "backend": backend,
                "version": VERSIONS[backend],
                "seconds": predict(system, backend, points),
            }
            for system, backend in DATABASES
        ],
    }
    json.dump(result, sys.stdout, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
