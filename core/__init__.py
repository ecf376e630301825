"""The performance core: (hardware, model, deployment, batch) -> step time, bound, bytes, energy.

Pure Python + numpy. No I/O beyond reading its own package data, no asyncio, no gRPC.
"""

from memorywall.core._toml import load_toml  # public: fleet specs read TOML as profiles do
from memorywall.core.cost import Bound, StepCost, StepModel, SweepCost
from memorywall.core.deployment import Deployment, Placement, Speculative, plan_deployment
from memorywall.core.hardware import Hardware, builtin_hardware, load_hardware
from memorywall.core.model import ModelShape, builtin_models, load_model, model_from_config
from memorywall.core.precision import Precision
from memorywall.core.predict import Prediction, predict
from memorywall.core.work import Batch, PrefillChunk, Work

__all__ = [
    "Batch",
    "Bound",
    "Deployment",
    "Hardware",
    "ModelShape",
    "Placement",
    "Precision",
    "Prediction",
    "PrefillChunk",
    "Speculative",
    "StepCost",
    "StepModel",
    "SweepCost",
    "Work",
    "builtin_hardware",
    "builtin_models",
    "load_hardware",
    "load_model",
    "load_toml",
    "model_from_config",
    "plan_deployment",
    "predict",
]
